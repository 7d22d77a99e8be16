"""Test setup: 8 fake CPU devices, set before jax is imported anywhere, and one compilation cache per session."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A persistent XLA compilation cache for this session, made by the first process that loads this file (the xdist
# controller) and inherited through the environment by the workers and by every subprocess a test starts
# (`python -m lad_jax.train` runs, multi-host groups, kill-and-resume restarts). Those processes compile the same
# tiny-model programs again and again; with the cache each program is compiled once per session. The key hashes the
# whole optimised-for program, compile options, devices and jax/jaxlib versions, so a hit is the same executable
# (tests that compare runs bit for bit keep passing whether a process compiled or loaded). Fresh per session, so a
# run never reads executables from another checkout.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lad_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)  # its maker ends last
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
# XLA's CPU backend spends most of a tiny model's compile in LLVM optimisation passes that buy nothing at these
# sizes (a tiny_test run: 36 s -> 26 s wall). Every process of the session, subprocesses included, compiles with the
# same setting, so runs compared bit for bit stay comparable; semantics do not change, only fusion/rounding order.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The longest tests first (multi-process runs, kill-and-resume, end-to-end runs), so the two xdist workers do not
# end with one of them alone on a 2-minute test while the other is idle. Collection order is the same in every
# worker (xdist requires it), and no test depends on the order.
_SLOW_FIRST = ("test_multihost.py", "test_train_resume.py", "test_train_e2e.py", "test_sampler.py",
               "test_notebooks.py", "test_distributed.py", "test_sampler_continuous.py", "test_lora.py",
               "test_train_step.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return _SLOW_FIRST.index(name) if name in _SLOW_FIRST else len(_SLOW_FIRST)
    items.sort(key=rank)  # stable: the order within a module is kept

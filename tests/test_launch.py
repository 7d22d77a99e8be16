"""launch/ scripts: --dry-run output (exact argv), the remote scripts they build, and shellcheck.

The remote command that tpu_run.sh / tpu_stop.sh send over ssh is also executed here in a fake worker home
(with a stand-in venv python that records its argv and environment), so the quoting is proven end to end.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch") and p.name != "common.sh")


def run(script: str, *args: str, env: dict | None = None, cwd: Path = REPO, check: bool = True):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LAD_", "SLURM_"))}
    full_env["LAD_LOCAL_PYTHON"] = sys.executable
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60)
    if check:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def commands(proc) -> list[list[str]]:
    """Dry-run stdout: one shell-quoted command per line."""
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} appears {len(values)} times in {argv}"
    return values[0]


SCOPE = ["--dry-run", "--project", "my-proj", "--zone", "us-east5-a"]


def test_every_script_has_help():
    assert {"tpu_create.sh", "tpu_setup.sh", "tpu_run.sh", "tpu_logs.sh", "tpu_stop.sh", "tpu_delete.sh",
            "gpu_run.sh", "gpu_slurm.sbatch", "slurm_task.sh"} <= set(SCRIPTS)
    for script in SCRIPTS:
        if script.startswith("tpu_") or script.startswith("gpu_"):
            out = run(script, "--help").stdout
            assert "Flags" in out and "set -euo" not in out, script


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); scripts not linted")
    files = [str(LAUNCH / s) for s in SCRIPTS] + [str(LAUNCH / "common.sh")]
    proc = subprocess.run(["shellcheck", "-x", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_strict_bash():
    for script in SCRIPTS:
        text = (LAUNCH / script).read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "\nset -euo pipefail\n" in text, script


@pytest.mark.parametrize("accelerator, gcloud_type, runtime, workers", [
    ("v4-32", "v4-32", "tpu-ubuntu2204-base", 4),
    ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5p-64", "v5p-64", "v2-alpha-tpuv5", 8),
    ("v6e-256", "v6e-256", "v2-alpha-tpuv6e", 64),
])
def test_create_direct(accelerator, gcloud_type, runtime, workers):
    proc = run("tpu_create.sh", *SCOPE, "--accelerator", accelerator, "--run-name", "exp-1", "--preemptible")
    (argv,) = commands(proc)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "exp-1"]
    assert flag(argv, "--accelerator-type") == gcloud_type
    assert flag(argv, "--version") == runtime
    assert flag(argv, "--zone") == "us-east5-a" and flag(argv, "--project") == "my-proj"
    assert "--preemptible" in argv and "--spot" not in argv
    assert f"({workers} worker(s))" in proc.stderr


def test_create_queued_spot_from_environment():
    env = {"LAD_PROJECT": "env-proj", "LAD_ZONE": "europe-west4-a", "LAD_ACCELERATOR": "v6e-64",
           "LAD_RUN_NAME": "qwen7b", "LAD_TPU_NAME": "slice-a", "LAD_DRY_RUN": "1"}
    proc = run("tpu_create.sh", "--queued", "--spot", "--valid-until=6h", "--wait",
               "--runtime-version", "v2-alpha-tpuv6e", env=env)
    create, describe = commands(proc)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "slice-a"]
    assert flag(create, "--node-id") == "slice-a"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv6e"
    assert flag(create, "--accelerator-type") == "v6e-64"
    assert flag(create, "--project") == "env-proj" and flag(create, "--zone") == "europe-west4-a"
    assert flag(create, "--valid-until-duration") == "6h" and "--spot" in create
    assert flag(create, "--labels") == "lad-run=qwen7b"
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "slice-a"]
    # A flag beats the environment.
    proc = run("tpu_create.sh", "--zone", "us-central2-b", env=env)
    assert flag(commands(proc)[0], "--zone") == "us-central2-b"


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "v3-8"], "not one of v4-N"),
    (["--queued", "--preemptible"], "use --spot"),
    (["--spot", "--preemptible"], "at most one"),
    (["--wait"], "needs --queued"),
    (["--run-name", "Bad_Name"], "run name"),
    (["--bucket", "my-bucket"], "gs:// URL"),
    (["--frobnicate"], "unknown flag '--frobnicate'"),
])
def test_create_rejects_bad_input(args, message):
    proc = run("tpu_create.sh", *SCOPE, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_missing_zone_is_named():
    proc = run("tpu_delete.sh", "--dry-run", check=False)
    assert proc.returncode == 2 and "LAD_ZONE" in proc.stderr


def test_setup_copies_checkout_to_all_workers(tmp_path):
    proc = run("tpu_setup.sh", *SCOPE, "--tpu-name", "slice-a", env={"TMPDIR": str(tmp_path)})
    tar, scp, ssh = commands(proc)
    assert tar[:2] == ["tar", "-czf"] and tar[2] == str(tmp_path / "lad_jax_src.tar.gz")
    assert "--exclude=./.git" in tar and "--exclude=./.venv" in tar and tar[tar.index("-C") + 1] == str(REPO)
    assert not (tmp_path / "lad_jax_src.tar.gz").exists(), "--dry-run must not run anything"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [str(tmp_path / "lad_jax_src.tar.gz"), "slice-a:lad_jax_src.tar.gz"]
    assert flag(scp, "--worker") == "all"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "slice-a"] and flag(ssh, "--worker") == "all"
    remote = flag(ssh, "--command")
    assert "tar -xzf lad_jax_src.tar.gz -C lad_jax" in remote
    assert "uv venv --allow-existing --python 3.11 lad_venv" in remote
    assert "-e './lad_jax[tpu,gcs]'" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # the remote script parses


def test_setup_from_git():
    proc = run("tpu_setup.sh", *SCOPE, "--tpu-name", "slice-a", "--git", "https://example.com/lad jax.git",
               "--ref", "v0.1", "--python", "3.12")
    (ssh,) = commands(proc)
    remote = flag(ssh, "--command")
    assert "git clone --quiet 'https://example.com/lad jax.git' lad_jax" in remote
    assert "checkout --quiet v0.1" in remote and "--python 3.12" in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)


FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/argv.txt"
env > "$HOME/env.txt"
trap 'echo terminated > "$HOME/signal.txt"; exit 0' TERM
echo "training $*"
for _ in $(seq 300); do sleep 0.1; done
"""


def fake_worker(home: Path) -> Path:
    (home / "lad_jax").mkdir(parents=True)
    (home / "lad_venv" / "bin").mkdir(parents=True)
    python = home / "lad_venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return home


def run_remote(remote: str, home: Path):
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=30)


def wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            time.sleep(0.1)
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_run_multi_host_end_to_end(tmp_path):
    from lad_jax.config import load_config

    proc = run("tpu_run.sh", *SCOPE, "--accelerator", "v5p-64", "--run-name", "qwen7b-lad",
               "--bucket", "gs://my-bucket/lad/", "--env", "LIBTPU_INIT_ARGS=--xla_tpu_flag=true --other",
               "steps=7", "algorithm.eta=0.5", "data.system_prompt=It's a test")
    assert "valid" in proc.stderr  # the config was checked locally before launching
    (ssh,) = commands(proc)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qwen7b-lad"]
    assert flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == "us-east5-a"
    remote = flag(ssh, "--command")

    home = fake_worker(tmp_path / "home")
    first = run_remote(remote, home)
    assert first.returncode == 0, first.stderr
    assert "started qwen7b-lad" in first.stdout
    argv = wait_for(home / "argv.txt").splitlines()
    overrides = ["output_dir=gs://my-bucket/lad/runs", "run_name=qwen7b-lad", "mesh.distributed='on'", "steps=7",
                 "algorithm.eta=0.5", "data.system_prompt=It's a test"]
    assert argv == ["-m", "lad_jax.train", "--config", "configs/default.yaml", *overrides]
    env = dict(line.split("=", 1) for line in (home / "env.txt").read_text().splitlines() if "=" in line)
    assert env["LIBTPU_INIT_ARGS"] == "--xla_tpu_flag=true --other" and env["PYTHONUNBUFFERED"] == "1"
    pid = int((home / "lad_logs" / "qwen7b-lad.pid").read_text())
    assert "training -m lad_jax.train" in wait_for(home / "lad_logs" / "qwen7b-lad.log")

    # The overrides the workers receive are valid trainer overrides, with distributed start forced on.
    config = load_config("configs/default.yaml", overrides)
    assert config.mesh.distributed == "on" and config.run_dir == "gs://my-bucket/lad/runs/qwen7b-lad"

    try:
        again = run_remote(remote, home)  # a second start while it runs is refused
        assert again.returncode == 1 and "already running" in again.stderr

        stop = run("tpu_stop.sh", *SCOPE, "--tpu-name", "qwen7b-lad", "--run-name", "qwen7b-lad")
        (ssh_stop,) = commands(stop)
        assert flag(ssh_stop, "--worker") == "all"
        out = run_remote(flag(ssh_stop, "--command"), home)
        assert f"sent SIGTERM to {pid}" in out.stdout
        assert wait_for(home / "signal.txt").strip() == "terminated"
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_run_single_host_local_output_and_foreground():
    proc = run("tpu_run.sh", *SCOPE, "--accelerator", "v6e-8", "--run-name", "small", "--foreground",
               "--config", "configs/default.yaml")
    (ssh,) = commands(proc)
    remote = flag(ssh, "--command")
    assert "output_dir=runs run_name=small 2>&1 | tee ../lad_logs/small.log" in remote
    assert "mesh.distributed" not in remote  # single host: the trainer's auto detection decides


FAKE_PLAN_PYTHON = """#!/usr/bin/env bash
# stand-in local python: imports succeed, the config check passes, lad_jax.plan records its argv and exits $PLAN_RC
if [[ $1 == -m ]]; then printf '%s\\n' "$@" > "$PLAN_ARGV"; echo "largest: train_step -> DOES NOT FIT"; exit "$PLAN_RC"; fi
exit 0
"""


@pytest.mark.parametrize("rc", [0, 3])
def test_run_plans_the_accelerator_first(tmp_path, rc):
    python = tmp_path / "python"
    python.write_text(FAKE_PLAN_PYTHON)
    python.chmod(0o755)
    env = {"LAD_LOCAL_PYTHON": str(python), "PLAN_ARGV": str(tmp_path / "argv"), "PLAN_RC": str(rc)}
    args = [*SCOPE, "--accelerator", "v5e-16", "--run-name", "r", "--bucket", "gs://b",
            "--config", "configs/qwen2.5-math-1.5b_dapo_lad.yaml", "steps=3"]
    proc = run("tpu_run.sh", *args, env=env, check=False)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["-m", "lad_jax.plan", "--topology", "v5litepod-16", "--config",
                    "configs/qwen2.5-math-1.5b_dapo_lad.yaml", "output_dir=gs://b/runs", "run_name=r",
                    "mesh.distributed='on'", "steps=3"]
    if rc == 3:  # does not fit: nothing is launched
        assert proc.returncode == 2 and "does not fit v5litepod-16" in proc.stderr and proc.stdout == ""
    else:
        assert proc.returncode == 0 and commands(proc)[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    (tmp_path / "argv").unlink()
    skipped = run("tpu_run.sh", *args, "--skip-plan", env=env)
    assert not (tmp_path / "argv").exists() and commands(skipped)


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "v6e-64"], "pass --bucket"),
    (["--accelerator", "v6e-8", "no.such.key=1"], "unknown config key 'no'"),
    (["--accelerator", "v6e-8", "algorithm.eta=-1"], "algorithm.eta"),
    (["--accelerator", "v6e-8", "stray"], "key.sub=value"),
    (["--accelerator", "v6e-8", "--env", "1BAD=x"], "NAME=value"),
])
def test_run_rejects_bad_input(args, message):
    proc = run("tpu_run.sh", *SCOPE, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_logs_and_delete():
    logs = commands(run("tpu_logs.sh", *SCOPE, "--run-name", "exp", "--worker", "all", "--lines", "20"))[0]
    assert logs[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "exp"]
    assert flag(logs, "--worker") == "all" and flag(logs, "--command") == "cd; tail -n 20 -F lad_logs/exp.log"
    logs0 = commands(run("tpu_logs.sh", *SCOPE, "--run-name", "exp", "--no-follow"))[0]
    assert flag(logs0, "--worker") == "0" and flag(logs0, "--command") == "cd; tail -n 100 lad_logs/exp.log"

    (direct,) = commands(run("tpu_delete.sh", *SCOPE, "--tpu-name", "slice-a"))
    assert direct == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "slice-a", "--zone=us-east5-a",
                      "--project=my-proj", "--quiet"]
    (queued,) = commands(run("tpu_delete.sh", *SCOPE, "--tpu-name", "slice-a", "--queued", "--async"))
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "slice-a"]
    assert "--force" in queued and "--async" in queued and "--quiet" in queued


def test_gpu_single_node():
    proc = run("gpu_run.sh", "--dry-run", "--run-name", "g1", "--bucket", "gs://b", "--gpus", "0,1",
               "--config", "configs/default.yaml", "steps=2")
    (argv,) = commands(proc)
    i = argv.index("-m")
    assert argv[0] == "env" and argv[i + 1] == "lad_jax.train"
    env = dict(a.split("=", 1) for a in argv[1:i - 1])
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert argv[i + 2:] == ["--config", "configs/default.yaml", "output_dir=gs://b/runs", "run_name=g1",
                            "mesh.distributed='off'", "steps=2"]


def slurm_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-09]" ] || exit 1\n'
                        "printf 'gpu07\\ngpu08\\ngpu09\\n'\n")
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4321",
            "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("layout_args, tasks, processes", [([], 1, 3), (["--per-gpu"], 8, 24)])
def test_slurm_multi_node(tmp_path, layout_args, tasks, processes):
    # sbatch runs a copy of the script from a spool directory: it must find the repo via SLURM_SUBMIT_DIR.
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(LAUNCH / "gpu_slurm.sbatch", spool / "slurm_script")
    proc = subprocess.run(
        ["bash", str(spool / "slurm_script"), "--dry-run", *layout_args, "--run-name", "r2", "--bucket", "gs://b",
         "--config", "configs/default.yaml", "steps=3"],
        cwd=tmp_path, env={**os.environ, **slurm_env(tmp_path), "LAD_PYTHON": "/venv/bin/python"},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (argv,) = commands(proc)
    srun = argv.index("srun")
    env = dict(a.split("=", 1) for a in argv[1:srun])
    assert env["JAX_COORDINATOR_ADDRESS"] == "gpu07:24321"  # first node, port from the job id
    assert env["JAX_NUM_PROCESSES"] == str(processes) and env["LAD_GPUS_PER_NODE"] == "8"
    assert flag(argv, "--nodes") == "3" and flag(argv, "--ntasks-per-node") == str(tasks)
    task = argv.index(str(LAUNCH / "slurm_task.sh"))
    assert argv[task + 1:] == ["/venv/bin/python", "-m", "lad_jax.train", "--config", "configs/default.yaml",
                               "output_dir=gs://b/runs", "run_name=r2", "mesh.distributed='on'", "steps=3"]

    # What each task then sees: its rank and the GPUs it drives.
    task_env = {**os.environ, **env, "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    out = subprocess.run(["bash", str(LAUNCH / "slurm_task.sh"), "env"], env=task_env, capture_output=True,
                         text=True, check=True).stdout
    seen = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("JAX_"))
    assert seen["JAX_PROCESS_ID"] == "5"
    assert seen["JAX_LOCAL_DEVICE_IDS"] == ("1" if layout_args else "0,1,2,3,4,5,6,7")
    assert seen["JAX_COORDINATOR_ADDRESS"] == "gpu07:24321"


def test_slurm_outside_a_job_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--dry-run"], cwd=REPO,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "sbatch" in proc.stderr


DISTRIBUTED_PROBE = """
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
jax.distributed.initialize()  # no arguments, exactly as the trainer calls it
ranks = multihost_utils.process_allgather(jnp.array([jax.process_index()])).ravel().tolist()
print(f"rank {jax.process_index()} of {jax.process_count()} sees ranks {ranks}", flush=True)
jax.distributed.shutdown()
"""


def test_slurm_task_environment_starts_jax_distributed(tmp_path):
    """Two CPU processes started like srun starts slurm_task.sh agree on ranks through jax.distributed."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    probe = tmp_path / "probe.py"
    probe.write_text(DISTRIBUTED_PROBE)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))}
    base.update(JAX_PLATFORMS="cpu", SLURM_JOB_ID="77", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", LAD_GPUS_PER_NODE="1")
    procs = [subprocess.Popen(["bash", str(LAUNCH / "slurm_task.sh"), sys.executable, str(probe)],
                              env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (out, err) in enumerate(outs):
        assert procs[i].returncode == 0, err
        assert f"rank {i} of 2 sees ranks [0, 1]" in out


def test_remote_directories_must_be_plain_names():
    proc = run("tpu_setup.sh", *SCOPE, env={"LAD_REMOTE_DIR": "a/../../etc"}, check=False)
    assert proc.returncode == 2 and "LAD_REMOTE_DIR" in proc.stderr
    (ssh,) = commands(run("tpu_logs.sh", *SCOPE, "--run-name", "exp", env={"LAD_REMOTE_LOGS": "my_logs"}))
    assert flag(ssh, "--command").endswith("my_logs/exp.log")

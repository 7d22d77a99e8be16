"""Kill-and-resume exactness: a run SIGKILLed after a checkpoint and re-run with the same command ends with the
same metrics and parameters as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("time/", "throughput/", "compiles/")


def _env():
    # A guard only: runs were measured bitwise reproducible with multi-threaded Eigen too (lad_jax/trainer.py).
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    return dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=flags.strip())


def _cmd(out, name):
    return [sys.executable, "-m", "lad_jax.train", "--config", "configs/tiny_test.yaml", f"output_dir={out}",
            f"run_name={name}", "steps=8", "checkpoint.every=4", "task.sft_steps=5"]


def _metrics(run_dir):
    by_step = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        by_step[row["step"]] = {k: v for k, v in row.items() if not k.startswith(VOLATILE)}  # last write wins
    return by_step


def test_kill_and_resume_is_exact(tmp_path):
    env = _env()
    straight = subprocess.run(_cmd(tmp_path, "straight"), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "resumed"
    proc = subprocess.Popen(_cmd(tmp_path, "resumed"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # really killed mid-run
    killed_at = max(int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit())
    assert killed_at < 8

    resumed = subprocess.run(_cmd(tmp_path, "resumed"), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from" in resumed.stdout

    a, b = _metrics(tmp_path / "straight"), _metrics(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert a[step] == b[step], step
    pa = load_file(str(tmp_path / "straight" / "hf_export" / "model.safetensors"))
    pb = load_file(str(run_dir / "hf_export" / "model.safetensors"))
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


def test_sigterm_saves_and_exits(tmp_path):
    env = _env()
    cmd = _cmd(tmp_path, "term")[:-1] + ["task.sft_steps=0", "steps=200", "checkpoint.every=100"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    steps = [int(s) for s in os.listdir(tmp_path / "term" / "checkpoints") if s.isdigit()]
    assert steps and 2 <= max(steps) < 100  # the forced final save, not a periodic one


def test_results_do_not_depend_on_cpu_load(tmp_path):
    """The same command twice, once with busy-looping processes on every core beside it: bit-identical results."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # default XLA threading: what a user runs
    cmd = lambda name: _cmd(tmp_path, name)[:-3] + ["steps=4", "checkpoint.every=0", "task.sft_steps=20"]  # noqa: E731
    quiet = subprocess.run(cmd("quiet"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 2))]
    try:
        loaded = subprocess.run(cmd("loaded"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    a, b = _metrics(tmp_path / "quiet"), _metrics(tmp_path / "loaded")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a == b
    pa = load_file(str(tmp_path / "quiet" / "hf_export" / "model.safetensors"))
    pb = load_file(str(tmp_path / "loaded" / "hf_export" / "model.safetensors"))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])

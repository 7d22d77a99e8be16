"""Kill-and-resume exactness: a run SIGKILLed after a checkpoint and re-run with the same command (here beside busy
loops on every core) ends with the same metrics and parameters as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from multihost import process_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("time/", "throughput/", "compiles/")


def _env():
    # One device (what `python -m lad_jax.train` uses on a CPU) and XLA's default threading; the 8-device layout is
    # resumed in tests/test_multihost.py.
    return process_env(1)


def _cmd(out, name):
    return [sys.executable, "-m", "lad_jax.train", "--config", "configs/tiny_test.yaml", f"output_dir={out}",
            f"run_name={name}", "steps=8", "checkpoint.every=4", "task.sft_steps=5"]


def _metrics(run_dir):
    by_step = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        by_step[row["step"]] = {k: v for k, v in row.items() if not k.startswith(VOLATILE)}  # last write wins
    return by_step


def test_kill_and_resume_is_exact_and_load_independent(tmp_path):
    """SIGKILL after a checkpoint, re-run the same command beside busy loops on every core: the run ends with the
    metrics (each step logged once) and weights of an uninterrupted run on a quiet machine, bit for bit."""
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

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        resumed = subprocess.run(_cmd(tmp_path, "resumed"), cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=600)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # the killed attempt's steps after the checkpoint are not repeated
    a, b = _metrics(tmp_path / "straight"), _metrics(run_dir)
    for step in a:
        assert a[step] == b[step], f"step {step} differs after a resume under CPU load"
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


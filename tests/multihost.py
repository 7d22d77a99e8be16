"""Run N local processes as one `jax.distributed` job (coordinator on 127.0.0.1), each with its own fake CPU
devices, always under a deadline: a collective that one process skips would otherwise hang the others (and CI).

    group = ProcessGroup.start(lambda i, port: [sys.executable, "-m", "lad_jax.train", ...,
                                                f"mesh.coordinator_address=127.0.0.1:{port}",
                                                "mesh.num_processes=2", f"mesh.process_id={i}"],
                               num_processes=2, devices_per_process=4)
    results = group.wait(timeout=600)   # [(returncode, stdout, stderr)], every process killed on timeout
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, extra_flags: str = "") -> dict[str, str]:
    """This environment with exactly `devices` fake CPU devices (the test session's own count is replaced)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    flags = f"{flags} --xla_force_host_platform_device_count={devices} {extra_flags}".split()
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        env.pop(key, None)
    return env


class ProcessGroup:
    def __init__(self, procs: Sequence[subprocess.Popen], logs: Sequence[tuple]):
        self.procs = list(procs)
        self._logs = list(logs)

    @classmethod
    def start(cls, argv: Callable[[int, int], list[str]], *, num_processes: int, devices_per_process: int,
              cwd: str = REPO, log_dir: str | os.PathLike | None = None, extra_flags: str = "",
              pythonpath: str | None = None) -> "ProcessGroup":
        """Starts `argv(i, port)` for i in range(num_processes); output goes to files (no pipe can fill up)."""
        import tempfile

        port = free_port()
        log_dir = tempfile.mkdtemp(prefix="lad_jax_mp_") if log_dir is None else os.fspath(log_dir)
        os.makedirs(log_dir, exist_ok=True)
        procs, logs = [], []
        env = process_env(devices_per_process, extra_flags)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
        for i in range(num_processes):
            out = open(os.path.join(log_dir, f"p{i}.out"), "w+")
            err = open(os.path.join(log_dir, f"p{i}.err"), "w+")
            procs.append(subprocess.Popen(argv(i, port), cwd=cwd, env=env, stdout=out, stderr=err, text=True,
                                          start_new_session=True))
            logs.append((out, err))
        return cls(procs, logs)

    def kill(self, index: int | None = None) -> None:
        """SIGKILL one process (or all), and wait for it."""
        for i, p in enumerate(self.procs):
            if (index is None or i == index) and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def output(self, index: int) -> tuple[str, str]:
        out, err = self._logs[index]
        out.flush(), err.flush()
        return open(out.name).read(), open(err.name).read()

    def wait(self, timeout: float) -> list[tuple[int, str, str]]:
        """[(returncode, stdout, stderr)] once all exit; on timeout every process is killed and the test fails."""
        deadline = time.time() + timeout
        while any(p.poll() is None for p in self.procs):
            if time.time() > deadline:
                self.kill()
                tails = "\n".join(f"--- process {i} stderr ---\n{self.output(i)[1][-2000:]}"
                                  for i in range(len(self.procs)))
                raise AssertionError(f"processes still running after {timeout} s (killed):\n{tails}")
            time.sleep(0.1)
        return [(p.returncode, *self.output(i)) for i, p in enumerate(self.procs)]


def check_all_ok(results) -> None:
    bad = [(i, rc, err) for i, (rc, _, err) in enumerate(results) if rc != 0]
    assert not bad, "\n".join(f"process {i} exited {rc}:\n{err[-3000:]}" for i, rc, err in bad)


def main() -> None:  # python tests/multihost.py N DEVICES -- command ... ({i} and {port} substituted)
    n, devices = int(sys.argv[1]), int(sys.argv[2])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    group = ProcessGroup.start(lambda i, port: [a.format(i=i, port=port) for a in cmd], num_processes=n,
                               devices_per_process=devices, cwd=os.getcwd())
    for i, (rc, out, err) in enumerate(group.wait(timeout=float(os.environ.get("MP_TIMEOUT", 900)))):
        print(f"=== process {i}: exit {rc}\n{out[-3000:]}\n{err[-3000:]}")


if __name__ == "__main__":
    main()

"""Run untrusted programs in an isolated child process; the parent never executes model code in-process.

Each job (one program + its test inputs) starts a fresh `python -I -S` running `_sandbox_runner.py` in a new session.
Mechanisms, strongest first; each is reported per run in `SandboxResult.isolation`:
- privilege drop: when the parent is root the runner switches to a random unprivileged uid/gid used by this job only
  (so RLIMIT_NPROC, which Linux does not enforce for root, holds; the uid owns no files; and a final kill(-1) reaps
  everything the program started), with no_new_privs (setuid binaries cannot regain root) and non-dumpable;
- namespaces (root only, where the kernel allows): new network namespace (no interfaces up, so no network, not even
  127.0.0.1), new mount namespace with a private size-capped tmpfs over every world-writable directory and over
  the working directory (nothing written is visible outside, and it vanishes with the run), new PID namespace (the
  runner is PID 1: when it dies the kernel kills every process the program started, even ones that left the
  session, and the program cannot see or signal outside processes);
- rlimits: CPU seconds per test, address space, process count, file size, no core files, 256 open files;
- wall clock: per test in the runner, and for the whole job in the parent, which kills the process group;
- environment: only PATH and LANG; `-I -S` also ignores PYTHON* variables, user site and site-packages;
- output: stdout read with a cap per test (the writer is killed when exceeded), stderr tail only.
Best effort when not root (e.g. a developer laptop): rlimits except the process count, wall clock, scrubbed
environment, a temporary working directory; no network/filesystem isolation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_STARTUP_S = 5.0  # allowance for interpreter start on a loaded machine, on top of the test budget


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-job limits. `timeout_s` is wall clock per test; `total_timeout_s` caps the whole job."""

    timeout_s: float = 5.0
    total_timeout_s: float = 60.0
    cpu_s: int | None = None  # default: ceil(timeout_s) + 1
    memory_mb: int = 1024
    max_processes: int = 32
    file_mb: int = 16
    tmpfs_mb: int = 64
    max_output_bytes: int = 1 << 20
    isolate_network: bool = True
    isolate_mounts: bool = True
    isolate_pids: bool = True

    def __post_init__(self):
        for name in ("timeout_s", "total_timeout_s", "memory_mb", "max_processes", "file_mb", "tmpfs_mb",
                     "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclasses.dataclass
class TestRun:
    """Outcome of one test input. status: ok | runtime_error | timeout | output_limit | fork_failed | not_run."""

    status: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class SandboxResult:
    runs: list[TestRun]
    isolation: dict[str, Any]
    seconds: float
    killed: bool = False  # the job ended before reporting every test (total timeout or the runner died)
    stopped_early: bool = False  # on_result asked to stop (e.g. first failure under all-or-nothing scoring)


def _pick_uid() -> int | None:
    """A random uid/gid from the mapped id range, unused by any account; None when we cannot switch users."""
    if os.geteuid() != 0:
        return None
    lo, hi = 1 << 20, (1 << 31) - 2
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
        spans = [(inner, inner + count - 1) for inner, _, count in ranges if inner + count - 1 >= lo]
        if not spans:  # narrow user-namespace map: fall back to the top of the largest range
            inner, _, count = max(ranges, key=lambda r: r[2])
            return inner + count - 1 if count > 1 else None
        start, end = max(spans, key=lambda s: s[1] - s[0])
        lo, hi = max(lo, start), min(hi, end)
    except OSError:
        pass
    return lo + secrets.randbelow(hi - lo + 1)


def run_tests(code: str, tests: Sequence[dict], limits: SandboxLimits = SandboxLimits(), *,
              on_result: Callable[[int, TestRun], bool] | None = None) -> SandboxResult:
    """Run `code` on each test input in one sandbox. Tests: {"kind": "stdin", "input": str} or
    {"kind": "functional", "fn_name": str, "args": list}. `on_result(i, run)` may return False to stop early."""
    start = time.monotonic()
    uid = _pick_uid()
    workdir = tempfile.mkdtemp(prefix="lad_sbx_")
    cpu_s = limits.cpu_s if limits.cpu_s is not None else int(limits.timeout_s) + 1
    job = {
        "code": code, "tests": list(tests), "uid": uid, "gid": uid, "workdir": workdir,
        "timeout_s": limits.timeout_s, "cpu_s": cpu_s, "memory_mb": limits.memory_mb,
        "max_processes": limits.max_processes, "file_mb": limits.file_mb, "tmpfs_mb": limits.tmpfs_mb,
        "max_output_bytes": limits.max_output_bytes,
        "isolate": {"net": limits.isolate_network, "mount": limits.isolate_mounts, "pid": limits.isolate_pids},
    }
    if uid is not None:
        os.chown(workdir, uid, uid)
    runs: list[TestRun] = [TestRun("not_run") for _ in tests]
    isolation: dict[str, Any] = {}
    budget = min(limits.total_timeout_s, _STARTUP_S + len(runs) * (limits.timeout_s + 0.5))
    deadline = start + budget
    killed = False
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=dict(_ENV), cwd=workdir, start_new_session=True, close_fds=True)
    try:
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        # Runner lines are ours, but cap them anyway: each carries at most one capped stdout (JSON-escaped).
        line_cap = 8 * limits.max_output_bytes + 65536
        buf, done = bytearray(), 0
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        stop = False
        while not stop:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                killed = True
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf = bytearray(rest)
                msg = json.loads(line)
                if "isolation" in msg:
                    isolation = msg["isolation"]
                    continue
                run = TestRun(msg["status"], msg["stdout"], msg["stderr"], msg["seconds"])
                runs[msg["i"]] = run
                done += 1
                if on_result is not None and on_result(msg["i"], run) is False:
                    stop = done < len(runs)
                    break
            if len(buf) > line_cap:
                killed = True
                break
        sel.close()
        killed = killed or (done < len(runs) and not stop)
    finally:
        _kill_group(proc)
        if uid is not None and isolation.get("pid") is not True:
            _kill_uid(uid)
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(runs, isolation, time.monotonic() - start, killed, stop)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.stdout.close()
    proc.wait()


def _kill_uid(uid: int) -> None:
    """Without a PID namespace, processes that left the session are found by their uid (this job's alone)."""
    try:
        subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env=dict(_ENV),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except OSError:  # no kill(1) binary: the CPU limit still ends busy leftovers
        pass


def run_program(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> TestRun:
    """Run one program on one stdin in the sandbox; convenience for tests and tools."""
    return run_tests(code, [{"kind": "stdin", "input": stdin}], limits).runs[0]


def run_many(jobs: Sequence[tuple[str, Sequence[dict]]], limits: SandboxLimits = SandboxLimits(), *,
             workers: int | None = None,
             on_result: Callable[[int, int, TestRun], bool] | None = None) -> list[SandboxResult]:
    """Run (code, tests) jobs with at most `workers` sandboxes at once (threads each drive one subprocess)."""
    workers = workers or os.cpu_count() or 1

    def one(j: int) -> SandboxResult:
        code, tests = jobs[j]
        callback = None if on_result is None else (lambda i, run: on_result(j, i, run))
        return run_tests(code, tests, limits, on_result=callback)

    if len(jobs) <= 1 or workers == 1:
        return [one(j) for j in range(len(jobs))]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(one, range(len(jobs))))

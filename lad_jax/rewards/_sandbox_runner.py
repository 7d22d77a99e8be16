"""Sandbox runner: executed as `python -I -S _sandbox_runner.py` by lad_jax.rewards.sandbox, never imported.

Stdlib only (it runs without site-packages). It reads one JSON job from stdin: the program, the test inputs (never
the expected outputs, so model code cannot read them), the limits and the unprivileged uid/gid. Starting as root it
isolates itself (new network, mount and PID namespaces where the kernel allows; private tmpfs over every
world-writable directory), sets resource limits, drops to the job's uid with no_new_privs, then runs each test in a
forked child and streams one JSON line per test to stdout. It never compares outputs: the parent does.
"""
import builtins
import ctypes
import io
import json
import os
import resource
import selectors
import signal
import sys
import time

# Imported before privileges are dropped so model code can use them even if the stdlib is unreadable to the uid.
import bisect, collections, copy, decimal, fractions, functools, heapq, itertools, math, operator  # noqa: E401,F401
import random, re, statistics, string, typing  # noqa: E401,F401

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE = 38, 4
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
FUNCTIONAL_PRELUDE = (
    "from typing import *\nfrom collections import *\nfrom itertools import *\nfrom functools import *\n"
    "from heapq import *\nfrom bisect import *\nimport math, re, string, sys, random, collections, itertools, "
    "functools, heapq, bisect\n"
)

_libc = ctypes.CDLL(None, use_errno=True)


def _call(fn, *args):
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount(source, target, fstype, flags, data):
    _call(_libc.mount, source.encode(), target.encode(), fstype.encode() if fstype else None,
          ctypes.c_ulong(flags), data.encode() if data else None)


def _isolate(job, report):
    """Root-only steps. Returns after forking into the new PID namespace (the caller is then PID 1 there)."""
    wanted = {"net": CLONE_NEWNET, "mount": CLONE_NEWNS, "pid": CLONE_NEWPID}
    for name, flag in wanted.items():
        if not job["isolate"].get(name, True):
            continue
        try:
            _call(_libc.unshare, flag)
            report[name] = True
        except OSError as e:
            report[name] = f"unavailable: {e}"
    if report.get("pid") is True:
        pid = os.fork()
        if pid:  # root-side waiter outside the namespace: relay the exit status; nothing else.
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    if report.get("mount") is True:
        _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
        covered = []
        for d in WORLD_WRITABLE:
            if os.path.isdir(d) and not os.path.islink(d):
                try:
                    _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={job['tmpfs_mb']}m,mode=1777")
                    covered.append(d)
                except OSError:
                    pass
        report["private_tmp"] = covered
        _expose_stdlib(report)
        if report.get("pid") is True:
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV, None)
                report["proc"] = True
            except OSError:
                pass
        workdir = job["workdir"]
        os.makedirs(workdir, 0o700, exist_ok=True)
        if not any(workdir.startswith(d + "/") for d in covered):
            _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={job['tmpfs_mb']}m,mode=700")
        os.chown(workdir, job["uid"], job["gid"])


def _world_readable(path):
    """True when an unprivileged user can reach `path` (every parent traversable by others)."""
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts) + 1):
        mode = os.stat("/".join(parts[:i]) or "/").st_mode
        if not mode & 0o001:
            return False
    return True


def _expose_stdlib(report):
    """The interpreter may live under a private directory (e.g. /root/.pyenv): bind its stdlib read-only into the
    private /tmp so imports still work after the privilege drop. Only in our mount namespace."""
    exposed = []
    for i, entry in enumerate(sys.path):
        if not os.path.isdir(entry) or _world_readable(entry):
            continue
        target = f"/tmp/.lad_stdlib/{i}"
        os.makedirs(target, 0o755, exist_ok=True)
        os.chmod("/tmp/.lad_stdlib", 0o755)
        _mount(entry, target, None, MS_BIND, None)
        _mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        sys.path[i] = target
        exposed.append((entry, target))
    if exposed:
        for module in list(sys.modules.values()):  # packages already imported keep searching their old __path__
            paths = getattr(module, "__path__", None)
            if isinstance(paths, list):
                for old, new in exposed:
                    paths[:] = [new + p[len(old):] if p == old or p.startswith(old + "/") else p for p in paths]
        sys.path_importer_cache.clear()
        report["stdlib_rebound"] = [old for old, _ in exposed]


def _drop_privileges(job):
    os.setgroups([])
    os.setresgid(job["gid"], job["gid"], job["gid"])
    os.setresuid(job["uid"], job["uid"], job["uid"])


def _set_limits(job):
    mb = 1 << 20
    limits = [
        (resource.RLIMIT_AS, job["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, job["file_mb"] * mb),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_NPROC, job["max_processes"]),
    ]
    if job["max_processes"] == resource.RLIM_INFINITY:
        limits.pop()
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def _child(test, job, out_w, err_w):
    """Runs in the forked child: one test of model code. Never returns."""
    try:
        os.setpgid(0, 0)
        cpu = job["cpu_s"]
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        if test["kind"] == "stdin":
            fd = os.memfd_create("stdin")
            os.write(fd, test["input"].encode())
            os.lseek(fd, 0, os.SEEK_SET)
        else:
            fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1024)
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)))
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        code = compile(job["code"], "<solution>", "exec")
        if test["kind"] == "stdin":
            status = 0
            try:
                exec(code, {"__name__": "__main__", "__builtins__": builtins})
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush()
            os._exit(status)
        result_fd = os.dup(1)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # prints from the function are discarded; only the return value is reported
        ns = {"__name__": "solution", "__builtins__": builtins}
        exec(FUNCTIONAL_PRELUDE, ns)
        exec(code, ns)
        name = test["fn_name"]
        if isinstance(ns.get("Solution"), type) and hasattr(ns["Solution"], name):
            fn = getattr(ns["Solution"](), name)
        elif callable(ns.get(name)):
            fn = ns[name]
        else:
            raise NameError(f"function {name!r} not defined by the program")
        value = fn(*test["args"])
        text = json.dumps(value, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else repr(o))
        os.write(result_fd, text.encode() + b"\n")
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - every failure of model code is just a failed test
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
        try:
            os.write(2, f"{type(e).__name__}: {e}"[-2000:].encode(errors="replace"))
        except BaseException:  # noqa: BLE001
            pass
        os._exit(1)


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _run_test(test, job):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    try:
        pid = os.fork()
    except OSError as e:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        return {"status": "fork_failed", "stdout": "", "stderr": str(e), "seconds": 0.0}
    if pid == 0:
        _child(test, job, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    cap, deadline = job["max_output_bytes"], start + job["timeout_s"]
    out, err, status = bytearray(), bytearray(), None
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ)
    sel.register(err_r, selectors.EVENT_READ)
    open_fds = 2
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = "timeout"
            break
        for key, _ in sel.select(remaining):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                open_fds -= 1
            elif key.fd == out_r:
                out += chunk
                if len(out) > cap:
                    status = "output_limit"
            elif len(err) < 4096:
                err += chunk
        if status:
            break
    sel.close()
    if status:
        for target in (-pid, pid):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _, wstatus = os.waitpid(pid, 0)
    os.close(out_r)
    os.close(err_r)
    if job["sweep"]:  # the uid is this job's alone: kill everything the test left behind (never ourselves)
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap()
    if status is None:
        code = os.waitstatus_to_exitcode(wstatus)
        if code == 0:
            status = "ok"
        elif code in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        else:
            status = "runtime_error"
    return {"status": status, "stdout": bytes(out[:cap]).decode(errors="replace"),
            "stderr": bytes(err[-2000:]).decode(errors="replace"), "seconds": time.monotonic() - start}


def main():
    job = json.loads(sys.stdin.buffer.read())
    result_fd = os.dup(1)
    report = {"uid": os.getuid()}
    if os.getuid() == 0 and job.get("uid") is not None:
        _isolate(job, report)
        os.chdir(job["workdir"])
        _set_limits(job)
        _drop_privileges(job)
        report["uid"] = os.getuid()
        job["sweep"] = True
    else:  # not root: limits only; the process-count limit would count the caller's own processes, so skip it
        os.chdir(job["workdir"])
        job["max_processes"] = resource.RLIM_INFINITY
        _set_limits(job)
        job["sweep"] = report.get("pid") is True
    try:
        _call(_libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _call(_libc.prctl, PR_SET_DUMPABLE, 0, 0, 0, 0)
        report["no_new_privs"] = True
    except OSError as e:
        report["no_new_privs"] = f"unavailable: {e}"
    os.write(result_fd, (json.dumps({"isolation": report}) + "\n").encode())
    for i, test in enumerate(job["tests"]):
        result = _run_test(test, job)
        result["i"] = i
        os.write(result_fd, (json.dumps(result) + "\n").encode())


if __name__ == "__main__":
    main()

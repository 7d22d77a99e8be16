"""Code reward and sandbox: both test shapes, and hostile programs that must score 0 while nothing escapes."""
import json
import os
import socket
import time
import uuid

import numpy as np
import pytest

from lad_jax.rewards import SandboxLimits, code_reward, code_reward_batch, normalize_tests, run_program, run_tests

FAST = SandboxLimits(timeout_s=2.0, total_timeout_s=20.0, max_output_bytes=1 << 16)
# Containment relies on dropping root to a private uid (CI runs as root); without root only rlimits apply.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox isolation needs root (CI runs as root)")


@pytest.fixture(scope="module")
def isolation():
    return run_tests("", [{"kind": "stdin", "input": ""}], FAST).isolation


def block(src: str) -> str:
    return f"Here is my solution.\n```python\n{src}\n```\n"


APPS_STDIN = {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7"]}
APPS_FN = {"fn_name": "add", "inputs": [[1, 2], [10, -3]], "outputs": [[3], [7]]}  # TACO wraps outputs in lists
LCB_STDIN = [{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"},
             {"input": "1\n5\n", "output": "5", "testtype": "stdin"}]
LCB_FN = [{"input": "[1, 2, 3]\n2", "output": "[2, 4, 6]", "testtype": "functional",
           "metadata": {"func_name": "scale"}},
          {"input": "[]\n5", "output": "[]", "testtype": "functional", "metadata": {"func_name": "scale"}}]

SUM2 = "a, b = map(int, input().split())\nprint(a + b)   "
SUM2_BAD = "a, b = map(int, input().split())\nprint(a - b)"
ADD = "def add(a, b):\n    return a + b"
ADD_BAD = "def add(a, b):\n    return a * b"
SUMN = "import sys\ndata = sys.stdin.buffer.read().split()\nprint(sum(map(int, data[1:])))"
SUMN_BAD = "n = int(input())\nprint(n)"
SCALE = ("class Solution:\n    def scale(self, nums: List[int], k: int) -> List[int]:\n"  # List: from the prelude
         "        return [x * k for x in nums]")
SCALE_BAD = "class Solution:\n    def scale(self, nums, k):\n        return [x + k for x in nums]"


def test_both_shapes_correct_and_incorrect():
    completions = [block(p) for p in (SUM2, SUM2_BAD, ADD, ADD_BAD, SUMN, SUMN_BAD, SCALE, SCALE_BAD)]
    tests = [APPS_STDIN, APPS_STDIN, APPS_FN, APPS_FN, LCB_STDIN, LCB_STDIN, LCB_FN, json.dumps(LCB_FN)]
    rewards, metrics = code_reward_batch(completions, tests, limits=FAST, workers=4)
    assert rewards.dtype == np.float32
    assert rewards.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert metrics["code/batch_seconds"] > 0 and metrics["code/program_found_frac"] == 1.0


def test_single_entry_point_fraction_and_extraction():
    half = block("a, b = map(int, input().split())\nprint(3)")
    assert code_reward(half, APPS_STDIN, limits=FAST) == 0.0
    assert code_reward(half, APPS_STDIN, fraction=True, limits=FAST) == 0.5
    assert code_reward("no code here: print(3)", APPS_STDIN, limits=FAST) == 0.0
    # the last python block counts; other languages are ignored
    two = block(SUM2_BAD) + "Better:\n```python\n" + SUM2 + "\n```\n```text\nprint(0)\n```"
    assert code_reward(two, json.dumps(APPS_STDIN), limits=FAST) == 1.0


def test_float_tolerance_and_whitespace():
    tests = {"inputs": [""], "outputs": ["0.3333333   \n\n"]}
    prog = block("print(1/3)")
    assert code_reward(prog, tests, limits=FAST) == 0.0
    assert code_reward(prog, tests, float_tol=1e-6, limits=FAST) == 1.0


def test_bad_tests_are_clear_errors():
    with pytest.raises(ValueError, match="inputs"):
        normalize_tests({"outputs": []})
    with pytest.raises(ValueError, match="fn_name"):
        normalize_tests([{"input": "1", "output": "1", "testtype": "functional"}])
    with pytest.raises(ValueError, match="JSON"):
        normalize_tests("{not json")
    with pytest.raises(ValueError, match="empty"):
        normalize_tests({"inputs": [], "outputs": []})
    with pytest.raises(ValueError, match="unknown keys"):
        code_reward(block(SUM2), APPS_STDIN, limits={"timeout": 1})
    assert code_reward(block(SUM2), APPS_STDIN, limits={"timeout_s": 3.0}) == 1.0


@needs_root
def test_isolation_in_effect(isolation):
    assert isolation["uid"] != 0 and isolation["no_new_privs"] is True
    # namespaces: reported so a platform without them (e.g. a container without CAP_SYS_ADMIN) is visible
    assert {k: isolation.get(k) for k in ("net", "mount", "pid")} == {"net": True, "mount": True, "pid": True}, \
        isolation


@needs_root
def test_hostile_programs_score_zero_and_stay_contained(monkeypatch):
    secret = "lad-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("LAD_TEST_SECRET", secret)
    probe = f"/tmp/lad_escape_{uuid.uuid4().hex}"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    me = os.getpid()
    hostile = {
        "infinite_loop": ("while True:\n    pass", "done"),
        "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "x"),
        "memory_bomb": ("a = []\nwhile True:\n    a.append(bytearray(1 << 26))", "x"),
        "write_outside": (f"open({probe!r}, 'w').write('x')\nprint('ok')\nraise SystemExit(3)", "ok"),
        "read_parent_env": ("import os\nprint(os.environ.get('LAD_TEST_SECRET'))", secret),
        "network": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')",
                    "connected"),
        "print_gigabytes": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.stdout.write(chunk)",
                            "x"),
        "kill_parent": (f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill({me}, signal.SIGKILL)\n"
                        "print('done')", "done"),
    }
    names = list(hostile)
    completions = [block(hostile[n][0]) for n in names]
    tests = [{"inputs": [""], "outputs": [hostile[n][1]]} for n in names]
    start = time.monotonic()
    rewards, metrics = code_reward_batch(completions, tests, limits=FAST, workers=len(names))
    elapsed = time.monotonic() - start
    assert dict(zip(names, rewards.tolist())) == {n: 0.0 for n in names}
    assert elapsed < 20.0  # every job ended within its limits (2 s per test + start-up on a busy machine)
    assert not os.path.exists(probe)
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    assert os.getpid() == me  # still here
    assert metrics["code/timeouts"] >= 2 and metrics["code/output_limit"] == 1


def _processes_of(uid: int) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in f):
                    found.append(pid)
        except OSError:
            pass
    return found


@needs_root
def test_sandbox_limits_are_enforced():
    """Direct probes of each mechanism (these would print other values if a limit were missing)."""
    forks = run_program("import os, time\nn = 0\nfor _ in range(300):\n    try:\n        pid = os.fork()\n"
                        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n"
                        "        os._exit(0)\n"
                        "    n += 1\nprint(n, flush=True)\nos._exit(0)",
                        limits=SandboxLimits(timeout_s=2.0, max_processes=16))
    assert int(forks.stdout.split()[0]) < 16  # RLIMIT_NPROC holds (root would be exempt: we dropped privileges)
    mem = run_program("x = bytearray(4 << 30)", limits=FAST)
    assert mem.status == "runtime_error" and "MemoryError" in mem.stderr
    env = run_program("import os\nprint(sorted(os.environ))", limits=FAST)
    assert env.stdout.strip() == "['LANG', 'PATH']"
    big = run_program("open('f', 'wb').write(b'x' * (64 << 20))", limits=SandboxLimits(file_mb=1))
    assert big.status == "runtime_error"  # RLIMIT_FSIZE (SIGXFSZ is ignored by Python, so the write fails)
    cwd = run_program("import os\nprint(os.listdir('.'), os.getuid())", limits=FAST)
    listing, uid = cwd.stdout.rsplit(" ", 1)
    assert listing == "[]" and (os.geteuid() != 0 or int(uid) != 0)  # fresh empty dir, never root
    # a daemon that leaves the session (setsid + double fork) is still killed when the job ends
    daemon = run_program("import os, time\nprint(os.getuid(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n"
                         "    if os.fork() == 0:\n        time.sleep(120)\n    os._exit(0)\n", limits=FAST)
    daemon_uid = int(daemon.stdout.split()[0])
    assert daemon_uid != 0 and not _processes_of(daemon_uid)
    ok = run_program("print(input()[::-1])", "abc\n", limits=FAST)
    assert (ok.status, ok.stdout) == ("ok", "cba\n")

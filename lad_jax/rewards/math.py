"""Math rewards: extract the final answer, decide equivalence with math-verify in a persistent process pool.

math-verify times out with SIGALRM, which only works in a process's main thread and cannot interrupt long C-level
sympy work, so checks run in persistent worker processes (`_math_worker.py`, started once) and the parent enforces a
hard per-item deadline, killing and replacing a worker that overruns. A timeout or exception scores 0 and is counted.
"""
from __future__ import annotations

import atexit
import json
import math as _math
import os
import re
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Sequence

import numpy as np

from lad_jax.rewards.extract import extract_math_answer, last_boxed

_SPACES = re.compile(r"\s+")
# run by path with -P so this directory (which has a math.py) is not put on the worker's sys.path
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")
_START_TIMEOUT_S = 120.0  # a worker's import of math-verify/sympy, on a loaded machine


def normalize_answer(answer: str) -> str:
    """Cheap canonical form used only for the exact-match fast path (equal forms are certainly equivalent)."""
    a = answer.strip().strip("$").strip()
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    a = a.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    return _SPACES.sub("", a).rstrip(".")


class VerifierPool:
    """Persistent worker processes with a hard per-item deadline (overrunning workers are killed and replaced)."""

    def __init__(self, workers: int | None = None):
        self.size = workers or os.cpu_count() or 1
        self._workers: list[subprocess.Popen | None] = [None] * self.size
        self._buffers = [b""] * self.size
        self._ready = [False] * self.size
        self._lock = threading.Lock()

    def _spawn(self, k: int) -> None:
        # A fresh interpreter (not fork: the trainer is multi-threaded; not multiprocessing: it would re-import the
        # trainer's __main__ in every worker).
        self._workers[k] = subprocess.Popen(
            [sys.executable, "-P", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self._buffers[k] = b""
        self._ready[k] = False

    def _kill(self, k: int) -> None:
        proc = self._workers[k]
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        self._workers[k] = None

    def _read(self, k: int) -> list | None:
        """Messages now available from worker k; None when it died."""
        chunk = os.read(self._workers[k].stdout.fileno(), 1 << 16)
        if not chunk:
            return None
        self._buffers[k] += chunk
        *lines, self._buffers[k] = self._buffers[k].split(b"\n")
        return [json.loads(line) for line in lines]

    def check(self, items: Sequence[tuple[str, str]], timeout_s: float) -> list[str | bool]:
        """For each (answer, reference): True/False, or "timeout"/"error"."""
        inner = max(1, _math.ceil(timeout_s / 2))  # parse answer, compare (gold parse is cached): alarm each
        results: list[Any] = [None] * len(items)
        with self._lock:
            queue = list(range(len(items)))[::-1]
            busy: dict[int, tuple[int, float]] = {}  # worker -> (item, deadline)
            starting: dict[int, float] = {}  # worker -> deadline for its import (not charged to any item)
            failed_starts = 0
            while queue or busy:
                for k in range(self.size):
                    if self._workers[k] is None and queue:
                        self._spawn(k)
                        starting[k] = time.monotonic() + _START_TIMEOUT_S
                    if queue and self._ready[k] and k not in busy:
                        i = queue.pop()
                        try:
                            self._workers[k].stdin.write(json.dumps([i, *items[i], inner]).encode() + b"\n")
                            self._workers[k].stdin.flush()
                            busy[k] = (i, time.monotonic() + timeout_s)
                        except BrokenPipeError:
                            queue.append(i)
                            self._kill(k)
                if not busy and not starting:
                    continue
                files = {self._workers[k].stdout: k for k in (*busy, *starting)}
                next_deadline = min([d for _, d in busy.values()] + list(starting.values()))
                for f in wait(list(files), timeout=max(0.0, next_deadline - time.monotonic())):
                    k = files[f]
                    messages = self._read(k)
                    if messages is None:  # the worker died
                        if k in starting:
                            failed_starts += 1
                            if failed_starts > 2 * self.size:
                                raise RuntimeError("math verifier workers die on start; is math-verify installed? "
                                                   f"try: {sys.executable} -P {_WORKER}")
                        elif k in busy:
                            results[busy[k][0]] = "error"
                        self._kill(k)
                        busy.pop(k, None)
                        starting.pop(k, None)
                        continue
                    for msg in messages:
                        if msg == "ready":
                            self._ready[k] = True
                            starting.pop(k, None)
                        elif k in busy and msg[0] == busy[k][0]:
                            results[msg[0]] = msg[2] if msg[1] == "ok" else msg[1]
                            del busy[k]
                now = time.monotonic()
                for k, (i, deadline) in list(busy.items()):
                    if now >= deadline:
                        results[i] = "timeout"
                        self._kill(k)
                        del busy[k]
                for k, deadline in list(starting.items()):
                    if now >= deadline:
                        self._kill(k)
                        del starting[k]
        return results

    def close(self) -> None:
        for k in range(self.size):
            if self._workers[k] is not None:
                self._kill(k)


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(workers: int | None = None) -> VerifierPool:
    """The process-wide pool, started lazily and warmed (workers import math-verify before the first batch)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or (workers is not None and workers != _POOL.size):
            if _POOL is not None:
                _POOL.close()
            _POOL = VerifierPool(workers)
            atexit.register(_POOL.close)
        return _POOL


_GSM8K_FINAL = re.compile(r"####\s*(\S[^\n]*?)\s*$")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def _reference_answer(reference: str) -> str:
    """A reference that is a worked solution is reduced to its final answer: the last boxed answer (MATH style), or
    the text after the trailing '#### ' line (GSM8K's `answer` field: '...steps...\\n#### 72'). The bare answer takes
    the exact-match fast path instead of asking math-verify to guess which number in the solution is final."""
    if "\\boxed" in reference or "\\fbox" in reference:
        return last_boxed(reference) or reference
    final = _GSM8K_FINAL.search(reference)
    if final is None:
        return reference
    answer = final.group(1)
    return answer.replace(",", "") if _THOUSANDS.fullmatch(answer) else answer  # "1,000" (thousands) -> "1000"


def overlong_penalty(num_tokens: int, max_tokens: int, buffer_tokens: int, factor: float = 1.0) -> float:
    """DAPO soft overlong punishment: 0 up to max-buffer tokens, then linear down to -factor at max, -factor past."""
    if not 0 < buffer_tokens <= max_tokens:
        raise ValueError(f"overlong buffer_tokens must be in (0, max_tokens={max_tokens}], got {buffer_tokens}")
    free = max_tokens - buffer_tokens
    if num_tokens <= free:
        return 0.0
    if num_tokens <= max_tokens:
        return factor * (free - num_tokens) / buffer_tokens
    return -factor


def math_reward_batch(completions: Sequence[str], references: Sequence[Any], *,
                      num_tokens: Sequence[int] | None = None,
                      extractors: tuple[str, ...] = ("boxed", "answer_line"), timeout_s: float = 5.0,
                      correct_reward: float = 1.0, incorrect_reward: float = 0.0, format_reward: float = 0.0,
                      overlong_max_tokens: int | None = None, overlong_buffer_tokens: int | None = None,
                      overlong_factor: float = 1.0, max_answer_chars: int = 1000,
                      workers: int | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards [N] float32. Per item: correct_reward if the extracted answer is equivalent to the reference (a list
    of references means any of them), else incorrect_reward; plus format_reward when an answer was extracted; plus
    the DAPO overlong penalty when overlong_max_tokens and overlong_buffer_tokens are set (needs num_tokens)."""
    n = len(completions)
    if len(references) != n:
        raise ValueError(f"math_reward_batch: {n} completions but {len(references)} references")
    use_overlong = overlong_max_tokens is not None or overlong_buffer_tokens is not None
    if use_overlong and (overlong_max_tokens is None or overlong_buffer_tokens is None):
        raise ValueError("set both overlong_max_tokens and overlong_buffer_tokens (or neither)")
    if use_overlong and (num_tokens is None or len(num_tokens) != n):
        raise ValueError("the overlong penalty needs num_tokens (response length in tokens) for every completion")
    start = time.monotonic()
    answers = [extract_math_answer(c, extractors) for c in completions]
    answers = [a if a is not None and len(a) <= max_answer_chars else None for a in answers]
    correct = np.zeros(n, bool)
    pending: list[tuple[int, str, str]] = []
    for i, (answer, ref) in enumerate(zip(answers, references)):
        if answer is None:
            continue
        refs = [_reference_answer(str(r)) for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
        if any(normalize_answer(answer) == normalize_answer(r) for r in refs):
            correct[i] = True
        else:
            pending.extend((i, answer, r) for r in refs)
    outcomes = get_pool(workers).check([(a, r) for _, a, r in pending], timeout_s) if pending else []
    timeouts = errors = 0
    for (i, _, _), outcome in zip(pending, outcomes):
        correct[i] |= outcome is True
        timeouts += outcome == "timeout"
        errors += outcome == "error"
    found = np.array([a is not None for a in answers], bool)
    rewards = np.where(correct, correct_reward, incorrect_reward) + format_reward * found
    penalty = np.zeros(n)
    if use_overlong:
        penalty = np.array([overlong_penalty(int(t), overlong_max_tokens, overlong_buffer_tokens, overlong_factor)
                            for t in num_tokens])
        rewards = rewards + penalty
    metrics = {
        "math/accuracy": float(correct.mean()) if n else 0.0,
        "math/answer_found_frac": float(found.mean()) if n else 0.0,
        "math/verifier_calls": float(len(pending)),
        "math/timeouts": float(timeouts),
        "math/errors": float(errors),
        "math/overlong_penalty_mean": float(penalty.mean()) if n else 0.0,
        "math/batch_seconds": time.monotonic() - start,
    }
    return rewards.astype(np.float32), metrics


def math_reward(completion: str, reference: Any, **kwargs) -> float:
    """Reward of one completion (see math_reward_batch for options)."""
    rewards, _ = math_reward_batch([completion], [reference], **kwargs)
    return float(rewards[0])


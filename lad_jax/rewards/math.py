"""Math rewards: extract the final answer, decide equivalence with math-verify in a persistent process pool.

math-verify times out with SIGALRM, which only works in a process's main thread and cannot interrupt long C-level
sympy work, so checks run in worker processes (forkserver: no fork of a threaded trainer) and the parent enforces a
hard per-item deadline, killing and replacing a worker that overruns. A timeout or exception scores 0 and is counted.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Sequence

import numpy as np

from lad_jax.rewards.extract import extract_math_answer

_SPACES = re.compile(r"\s+")
_START_TIMEOUT_S = 120.0  # a worker's import of math-verify/sympy, on a loaded machine


def normalize_answer(answer: str) -> str:
    """Cheap canonical form used only for the exact-match fast path (equal forms are certainly equivalent)."""
    a = answer.strip().strip("$").strip()
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    a = a.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    return _SPACES.sub("", a).rstrip(".")


def _check(answer: str, reference: str, inner_timeout: int) -> bool:
    """Runs in a worker: math-verify equivalence of two answer strings."""
    from math_verify import parse, verify

    gold = _parse_gold(reference, inner_timeout)
    pred = parse(f"${answer}$", parsing_timeout=inner_timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=inner_timeout))


_GOLD_CACHE: dict[tuple[str, int], Any] = {}


def _parse_gold(reference: str, inner_timeout: int):
    from math_verify import parse

    key = (reference, inner_timeout)
    if key not in _GOLD_CACHE:  # a reference is shared by the G completions of its prompt
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[key] = parse(f"${reference}$", parsing_timeout=inner_timeout)
    return _GOLD_CACHE[key]


def _worker_main(conn) -> None:
    import math_verify  # noqa: F401 - import once, before the first task

    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        idx, answer, reference, inner_timeout = task
        try:
            conn.send((idx, "ok", _check(answer, reference, inner_timeout)))
        except BaseException as e:  # noqa: BLE001 - any verifier failure is a counted 0
            kind = "timeout" if type(e).__name__ == "TimeoutException" else "error"
            conn.send((idx, kind, False))


class VerifierPool:
    """Persistent worker processes with a hard per-item deadline (overrunning workers are killed and replaced)."""

    def __init__(self, workers: int | None = None):
        self.size = workers or os.cpu_count() or 1
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(method)
        if method == "forkserver":  # workers fork from a server that already imported math-verify
            self._ctx.set_forkserver_preload(["math_verify"])
        self._workers: list[tuple[Any, Any] | None] = [None] * self.size
        self._ready = [False] * self.size
        self._lock = threading.Lock()

    def _spawn(self, k: int) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        proc.start()
        child.close()
        self._workers[k] = (proc, parent)
        self._ready[k] = False

    def _kill(self, k: int) -> None:
        proc, conn = self._workers[k]
        proc.kill()
        proc.join()
        conn.close()
        self._workers[k] = None

    def check(self, items: Sequence[tuple[str, str]], timeout_s: float) -> list[str | bool]:
        """For each (answer, reference): True/False, or "timeout"/"error"."""
        inner = max(1, int(timeout_s))
        results: list[Any] = [None] * len(items)
        with self._lock:
            queue = list(range(len(items)))[::-1]
            busy: dict[int, tuple[int, float]] = {}  # worker -> (item, deadline)
            starting: dict[int, float] = {}  # worker -> deadline for its import (not charged to any item)
            while queue or busy:
                for k in range(self.size):
                    if self._workers[k] is None and queue:
                        self._spawn(k)
                        starting[k] = time.monotonic() + _START_TIMEOUT_S
                    if queue and self._ready[k] and k not in busy and self._workers[k] is not None:
                        i = queue.pop()
                        self._workers[k][1].send((i, items[i][0], items[i][1], inner))
                        busy[k] = (i, time.monotonic() + timeout_s)
                if not busy and not starting:
                    raise RuntimeError("math verifier pool could not start any worker")
                conns = {self._workers[k][1]: k for k in (*busy, *starting)}
                next_deadline = min([d for _, d in busy.values()] + list(starting.values()))
                for conn in wait(list(conns), timeout=max(0.0, next_deadline - time.monotonic())):
                    k = conns[conn]
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg == "ready":
                        self._ready[k] = True
                        del starting[k]
                        continue
                    if msg is None:  # worker died
                        if k in busy:
                            results[busy[k][0]] = "error"
                        self._kill(k)
                    else:
                        i, kind, ok = msg
                        results[i] = ok if kind == "ok" else kind
                    busy.pop(k, None)
                    starting.pop(k, None)
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
        return _POOL


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
        refs = [str(r) for r in ref] if isinstance(ref, (list, tuple)) else [str(ref)]
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


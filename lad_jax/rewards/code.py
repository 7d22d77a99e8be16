"""Code rewards: extract the program, run it on the tests in the sandbox, compare outputs in the parent.

Test shapes accepted (also as a JSON string of either):
- APPS/TACO: {"inputs": [...], "outputs": [...], "fn_name": optional}. Without fn_name each input is stdin text and
  each output the expected stdout; with fn_name each input is the argument list and each output the return value
  (a one-element list wrapping the value is also accepted, as in TACO).
- LiveCodeBench/DeepCoder: [{"input", "output", "testtype": "stdin" | "functional"}, ...]; functional inputs are
  newline-separated JSON arguments and the function name comes from `fn_name`, `metadata.func_name` or the kwarg.
Functional tests call `Solution().<fn_name>` when the program defines class Solution, else the top-level function.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np

from lad_jax.rewards.extract import last_code_block
from lad_jax.rewards.sandbox import SandboxLimits, TestRun, run_many

_STDIN_TYPES = {"stdin", "stdin_stdout", "stdio"}
_FUNCTIONAL_TYPES = {"functional", "function_call", "call_based"}


@dataclasses.dataclass(frozen=True)
class CodeTest:
    kind: str  # "stdin" | "functional"
    input: Any  # stdin text, or the argument list
    expected: Any  # expected stdout text, or the expected return value
    fn_name: str | None = None

    def runner_input(self) -> dict:
        if self.kind == "stdin":
            return {"kind": "stdin", "input": self.input}
        return {"kind": "functional", "fn_name": self.fn_name, "args": self.input}


def _text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def normalize_tests(tests: Any, fn_name: str | None = None) -> list[CodeTest]:
    """Convert either test convention (or its JSON string) into CodeTest records; errors name the bad field."""
    cases = _normalize(tests, fn_name)
    if not cases:
        raise ValueError("code tests: the test set is empty (a program cannot be verified without tests; filter "
                         "such rows out of the dataset)")
    return cases


def _normalize(tests: Any, fn_name: str | None) -> list[CodeTest]:
    if isinstance(tests, (str, bytes)):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"code tests: string is not valid JSON ({e})") from None
    if isinstance(tests, dict):
        if "inputs" not in tests or "outputs" not in tests:
            raise ValueError(f"code tests dict needs 'inputs' and 'outputs' (APPS/TACO); got keys {sorted(tests)}")
        inputs, outputs = tests["inputs"], tests["outputs"]
        if len(inputs) != len(outputs):
            raise ValueError(f"code tests: {len(inputs)} inputs but {len(outputs)} outputs")
        name = tests.get("fn_name") or fn_name
        if name:
            return [CodeTest("functional", list(i) if isinstance(i, (list, tuple)) else [i], o, name)
                    for i, o in zip(inputs, outputs)]
        return [CodeTest("stdin", _text(i), _text(o)) for i, o in zip(inputs, outputs)]
    if isinstance(tests, list):
        out = []
        for k, t in enumerate(tests):
            if not isinstance(t, dict) or "input" not in t or "output" not in t:
                raise ValueError(f"code tests[{k}] must be a dict with 'input' and 'output'; got {t!r:.200}")
            kind = str(t.get("testtype", t.get("type", "stdin"))).lower()
            if kind in _STDIN_TYPES:
                out.append(CodeTest("stdin", _text(t["input"]), _text(t["output"])))
            elif kind in _FUNCTIONAL_TYPES:
                name = t.get("fn_name") or (t.get("metadata") or {}).get("func_name") or fn_name
                if not name:
                    raise ValueError(f"code tests[{k}] is functional but has no fn_name/metadata.func_name; "
                                     "pass fn_name=...")
                args = t["input"]
                if isinstance(args, str):
                    args = [json.loads(line) for line in args.split("\n") if line.strip()]
                expected = json.loads(t["output"]) if isinstance(t["output"], str) else t["output"]
                out.append(CodeTest("functional", args, expected, name))
            else:
                raise ValueError(f"code tests[{k}].testtype {kind!r} is not one of stdin/functional")
        return out
    raise ValueError(f"code tests must be a dict (APPS/TACO), a list of records (LiveCodeBench) or a JSON string "
                     f"of either; got {type(tests).__name__}")


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def _close(a: Any, b: Any, tol: float | None) -> bool:
    if tol is not None and isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    return a == b


def _float_tokens_equal(got: str, want: str, tol: float) -> bool:
    g, w = got.split(), want.split()
    if len(g) != len(w):
        return False
    for x, y in zip(g, w):
        if x == y:
            continue
        try:
            if not math.isclose(float(x), float(y), rel_tol=tol, abs_tol=tol):
                return False
        except ValueError:
            return False
    return True


def outputs_match(test: CodeTest, run: TestRun, float_tol: float | None = None) -> bool:
    """Whether a sandbox run passed `test`: exit ok and output equal (trailing whitespace per line ignored)."""
    if run.status != "ok":
        return False
    if test.kind == "stdin":
        got, want = _lines(run.stdout), _lines(test.expected)
        return got == want or (float_tol is not None and _float_tokens_equal("\n".join(got), "\n".join(want),
                                                                             float_tol))
    try:
        value = json.loads(run.stdout)
    except json.JSONDecodeError:
        return False
    expected = json.loads(json.dumps(test.expected))  # tuples -> lists, like the returned value
    return _close(value, expected, float_tol) or _close([value], expected, float_tol)


def code_reward_batch(completions: Sequence[str], tests: Sequence[Any], *, fraction: bool = False,
                      float_tol: float | None = None, fn_names: Sequence[str | None] | None = None,
                      languages: tuple[str, ...] | None = ("python", "py", "python3"),
                      allow_untagged: bool = False, limits: SandboxLimits | Mapping[str, Any] = SandboxLimits(),
                      workers: int | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards [N] float32: 1 when every test passes (or the passed fraction when `fraction`), else 0.
    `limits` may be a SandboxLimits or a mapping of its fields (as written in a config)."""
    if not isinstance(limits, SandboxLimits):
        unknown = set(limits) - {f.name for f in dataclasses.fields(SandboxLimits)}
        if unknown:
            raise ValueError(f"code reward limits: unknown keys {sorted(unknown)}; valid: "
                             f"{[f.name for f in dataclasses.fields(SandboxLimits)]}")
        limits = SandboxLimits(**limits)
    if len(completions) != len(tests):
        raise ValueError(f"code_reward_batch: {len(completions)} completions but {len(tests)} test sets")
    start = time.monotonic()
    cases = [normalize_tests(t, None if fn_names is None else fn_names[i]) for i, t in enumerate(tests)]
    programs = [last_code_block(c, languages, allow_untagged) for c in completions]
    todo = [i for i, p in enumerate(programs) if p is not None]
    passed = np.zeros(len(completions), np.int64)

    def on_result(j: int, k: int, run: TestRun) -> bool:
        ok = outputs_match(cases[todo[j]][k], run, float_tol)
        passed[todo[j]] += ok
        return ok or fraction  # all-or-nothing stops at the first failure

    results = run_many([(programs[i], [c.runner_input() for c in cases[i]]) for i in todo], limits,
                       workers=workers, on_result=on_result)
    rewards = np.zeros(len(completions), np.float32)
    for i in todo:
        rewards[i] = passed[i] / len(cases[i]) if fraction else float(passed[i] == len(cases[i]))
    statuses = [run.status for r in results for run in r.runs]
    n = max(len(completions), 1)
    metrics = {
        "code/reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "code/all_passed_frac": float(sum(passed[i] == len(cases[i]) for i in todo) / n),
        "code/program_found_frac": float(sum(p is not None for p in programs) / n),
        "code/test_runs": float(sum(s != "not_run" for s in statuses)),
        "code/timeouts": float(statuses.count("timeout")),
        "code/runtime_errors": float(statuses.count("runtime_error")),
        "code/output_limit": float(statuses.count("output_limit")),
        "code/jobs_killed": float(sum(r.killed for r in results)),
        "code/jobs_stopped_early": float(sum(r.stopped_early for r in results)),
        "code/batch_seconds": time.monotonic() - start,
    }
    return rewards, metrics


def code_reward(completion: str, tests: Any, **kwargs) -> float:
    """Reward of one completion against one test set (see code_reward_batch for options)."""
    rewards, _ = code_reward_batch([completion], [tests], **kwargs)
    return float(rewards[0])

"""Reward throughput on this machine: math-verify checks/s and sandboxed code runs/s. Prints one JSON object.

Usage: python benchmarks/rewards.py [--math N] [--code N]
"""
import argparse
import json
import os
import time

from lad_jax.rewards import code_reward_batch, math_reward_batch
from lad_jax.rewards.math import get_pool

# Pairs that miss the string fast path, so every item is a real math-verify call.
MATH_PAIRS = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("(1, 2]", "(1,2]"), ("x^2+2x+1", "(x+1)^2"),
              ("\\{1,2\\}", "\\{2,1\\}"), ("5 \\text{ cm}", "5"), ("3.14", "\\pi"), ("41", "42"),
              ("\\dfrac{\\sqrt{3}}{2}", "\\sqrt{3}/2"), ("x = 5", "5")]


def bench_math(n: int) -> dict:
    get_pool().check([("1", "2")], 5.0)  # start the workers outside the timed region
    completions = [f"Reasoning... so the answer is $\\boxed{{{MATH_PAIRS[i % len(MATH_PAIRS)][0]}}}$ (item {i})"
                   for i in range(n)]
    # distinct references per item (like distinct prompts) so the worker's gold-parse cache does not flatter us
    references = [f"{MATH_PAIRS[i % len(MATH_PAIRS)][1]}" + ("" if i < len(MATH_PAIRS) else " " * (i // 10))
                  for i in range(n)]
    start = time.monotonic()
    _, metrics = math_reward_batch(completions, references, timeout_s=5.0)
    seconds = time.monotonic() - start
    return {"math_items": n, "math_verifier_calls": metrics["math/verifier_calls"], "math_seconds": seconds,
            "math_checks_per_s": metrics["math/verifier_calls"] / seconds, "math_timeouts": metrics["math/timeouts"],
            "math_workers": get_pool().size}


def bench_code(n: int) -> dict:
    prog = "```python\nn = int(input())\nprint(sum(int(x) for x in input().split()[:n]))\n```"
    tests = {"inputs": ["3\n1 2 3\n", "2\n5 5\n", "1\n9\n"], "outputs": ["6", "10", "9"]}
    start = time.monotonic()
    rewards, metrics = code_reward_batch([prog] * n, [tests] * n)
    seconds = time.monotonic() - start
    assert rewards.min() == 1.0, "benchmark program must pass"
    return {"code_programs": n, "code_tests_per_program": 3, "code_seconds": seconds,
            "code_programs_per_s": n / seconds, "code_test_runs_per_s": metrics["code/test_runs"] / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--math", type=int, default=400)
    parser.add_argument("--code", type=int, default=64)
    args = parser.parse_args()
    out = {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}
    out.update(bench_math(args.math))
    out.update(bench_code(args.code))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Verifiable rewards: math answer checking, sandboxed code execution, and the reward registry."""
from lad_jax.rewards.code import code_reward, code_reward_batch, normalize_tests
from lad_jax.rewards.extract import answer_line, extract_math_answer, last_boxed, last_code_block
from lad_jax.rewards.math import math_reward, math_reward_batch, overlong_penalty
from lad_jax.rewards.registry import build_reward_fn, per_item, register_reward, registered_rewards, resolve_reward
from lad_jax.rewards.sandbox import SandboxLimits, run_program, run_tests

__all__ = [
    "SandboxLimits", "answer_line", "build_reward_fn", "code_reward", "code_reward_batch", "extract_math_answer",
    "last_boxed", "last_code_block", "math_reward", "math_reward_batch", "normalize_tests", "overlong_penalty",
    "per_item", "register_reward", "registered_rewards", "resolve_reward", "run_program", "run_tests",
]

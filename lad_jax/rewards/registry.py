"""Reward registry: rewards selected by name or import path, combined with weights.

A registered reward is a batch function `fn(completions, rows, **kwargs) -> (rewards [N], metrics)` where rows are
the dataset rows (dicts). `per_item` adapts a simple `fn(completion, row) -> float`. `build_reward_fn(specs)` with
specs of (name_or_"pkg.mod:function", weight, kwargs) returns the trainer's
`fn(completions, rows, *, num_tokens=None) -> (rewards float32 [N], metrics)`.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lad_jax.rewards.code import code_reward_batch
from lad_jax.rewards.extract import extract_math_answer
from lad_jax.rewards.math import math_reward_batch, normalize_answer

BatchReward = Callable[..., tuple[np.ndarray, dict[str, float]]]
_REGISTRY: dict[str, BatchReward] = {}


def register_reward(name: str) -> Callable[[BatchReward], BatchReward]:
    """Decorator registering a batch reward under `name` (re-registering the same name is an error)."""
    def deco(fn: BatchReward) -> BatchReward:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn
    return deco


def per_item(fn: Callable[[str, Mapping[str, Any]], float]) -> BatchReward:
    """Adapt `fn(completion, row) -> float` to the batch interface."""
    @functools.wraps(fn)
    def batch(completions, rows, **kwargs):
        kwargs.pop("num_tokens", None)
        return np.array([fn(c, r, **kwargs) for c, r in zip(completions, rows)], np.float32), {}
    return batch


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _field(rows: Sequence[Mapping[str, Any]], key: str, reward: str) -> list[Any]:
    for k, row in enumerate(rows):
        if key not in row:
            raise KeyError(f"reward {reward!r}: row {k} has no field {key!r} (fields: {sorted(row)}); "
                           f"set the reward's answer_key/tests_key kwarg to the dataset's column")
    return [row[key] for row in rows]


@register_reward("math")
def math_rows(completions, rows, *, answer_key: str = "answer", num_tokens=None, **kwargs):
    return math_reward_batch(completions, _field(rows, answer_key, "math"), num_tokens=num_tokens, **kwargs)


@register_reward("code")
def code_rows(completions, rows, *, tests_key: str = "tests", fn_name_key: str | None = None, num_tokens=None,
              **kwargs):
    fn_names = None if fn_name_key is None else [row.get(fn_name_key) for row in rows]
    return code_reward_batch(completions, _field(rows, tests_key, "code"), fn_names=fn_names, **kwargs)


@register_reward("exact_match")
def exact_match_rows(completions, rows, *, answer_key: str = "answer", extract: bool = True,
                     extractors: tuple[str, ...] = ("boxed", "answer_line"), num_tokens=None):
    """1 when the extracted answer (or the whole stripped completion, when none is found or extract=False)
    equals str(row[answer_key]) after whitespace normalisation."""
    refs = _field(rows, answer_key, "exact_match")
    out = np.zeros(len(completions), np.float32)
    for i, (c, ref) in enumerate(zip(completions, refs)):
        got = (extract_math_answer(c, extractors) if extract else None) or c.strip()
        out[i] = float(normalize_answer(got) == normalize_answer(str(ref)))
    return out, {"exact_match/accuracy": float(out.mean()) if len(out) else 0.0}


def resolve_reward(name_or_path: str) -> BatchReward:
    """A registered name, or "package.module:function" (a batch reward; wrap per-item callables with per_item)."""
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    if ":" not in name_or_path:
        raise ValueError(f"unknown reward {name_or_path!r}; registered: {registered_rewards()}, or give an import "
                         f"path 'package.module:function'")
    module_name, _, attr = name_or_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name_or_path!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward {name_or_path!r}: module {module_name!r} has no callable {attr!r}")
    return fn


_GENERIC_ATTRS = ("reward", "reward_fn", "rewards", "score", "fn")


def reward_label(name_or_path: str) -> str:
    """The short name a reward's metrics go under: the registered name, else the function's name, or its module's
    last component when the function has a generic name ("lad_jax.tasks.numbers:reward_fn" -> "numbers")."""
    if ":" not in name_or_path:
        return name_or_path
    module, _, attr = name_or_path.partition(":")
    return module.rsplit(".", 1)[-1] if attr in _GENERIC_ATTRS else attr


def build_reward_fn(specs: Sequence[tuple[str, float, Mapping[str, Any] | None]]):
    """Weighted sum of rewards. Returns fn(completions, rows, *, num_tokens=None) -> (float32 [N], metrics).

    Metrics: each reward's mean under its `reward_label` ("math"), the weighted total under "total", plus the
    rewards' own metrics ("math/accuracy"); the trainer logs them all under "reward/".
    """
    if not specs:
        raise ValueError("build_reward_fn needs at least one (name, weight, kwargs) spec")
    parts = []
    labels: list[str] = []
    for spec in specs:
        if len(spec) != 3:
            raise ValueError(f"reward spec {spec!r} must be (name_or_path, weight, kwargs)")
        name, weight, kwargs = spec
        fn = resolve_reward(name)
        takes_tokens = "num_tokens" in inspect.signature(fn).parameters or any(
            p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
        label = reward_label(name)
        label = label if label not in labels and label != "total" else f"{label}_{len(labels)}"
        labels.append(label)
        parts.append((label, float(weight), dict(kwargs or {}), fn, takes_tokens))

    def reward_fn(completions: Sequence[str], rows: Sequence[Mapping[str, Any]], *,
                  num_tokens: Sequence[int] | None = None) -> tuple[np.ndarray, dict[str, float]]:
        if len(completions) != len(rows):
            raise ValueError(f"reward_fn: {len(completions)} completions but {len(rows)} rows")
        total = np.zeros(len(completions), np.float32)
        metrics: dict[str, float] = {}
        for name, weight, kwargs, fn, takes_tokens in parts:
            extra = {"num_tokens": num_tokens} if takes_tokens else {}
            values, m = fn(list(completions), list(rows), **kwargs, **extra)
            values = np.asarray(values, np.float32)
            if values.shape != (len(completions),):
                raise ValueError(f"reward {name!r} returned shape {values.shape}, expected ({len(completions)},)")
            total += weight * values
            metrics.update({k: float(v) for k, v in m.items()})
            metrics[name] = float(values.mean()) if len(values) else 0.0
        metrics["total"] = float(total.mean()) if len(total) else 0.0
        return total, metrics
    return reward_fn

"""Built-in experiment tasks: everything a run needs besides the model, behind one small interface.

A `Task` generates its train/eval data files and its tokenizer (both pure functions of the config, so every host and
every restart makes the same ones), names its reward, and may warm-start the policy before RL. The trainer, the
evaluator and the planner only talk to `get_task(config.task.name)`; `task.name=none` (None here) means the run's
own files, tokenizer and reward come from `data.*`, `model.tokenizer` / `init_from` and `reward.functions`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    # (out_dir, the config's task section, seed) -> (train file, eval file)
    write_data: Callable[[str, Any, int], tuple[str, str]]
    # out_dir or None -> a transformers tokenizer (saved to out_dir when given)
    build_tokenizer: Callable[[str | None], Any]
    # the reward when reward.functions is empty: a "module:function" name for `lad_jax.rewards`
    reward: str
    # (graphdef, params, tokenizer, task section, seed, log) -> (params as host arrays, final loss), or None when the
    # task section asks for no warm start; None = the task has none
    warm_start: Callable[..., tuple[Any, float] | None] | None = None


def _numbers() -> Task:
    from lad_jax.tasks import numbers

    return numbers.TASK


# name -> factory (imports stay lazy: `lad_jax.config` imports this package's names before jax is needed)
_REGISTRY: dict[str, Callable[[], Task]] = {"numbers": _numbers}


def get_task(name: str) -> Task | None:
    """The built-in task `name`, or None for "none"."""
    if name == "none":
        return None
    if name not in _REGISTRY:
        raise ValueError(f"task.name={name!r} is not a built-in task; use none or one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def task_names() -> tuple[str, ...]:
    return ("none", *_REGISTRY)

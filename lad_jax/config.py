"""Typed, frozen run configuration: YAML file + dotted `key.sub=value` overrides, validated at start-up.

`load_config(path, overrides)` builds a `Config` from the dataclass defaults, then the YAML file, then the
overrides (each value parsed as a YAML scalar/flow value). Unknown keys, wrong types and impossible combinations
raise `ConfigError` naming the key and the fix. Checks that need the device count (mesh shape, batch vs data
axes) run in `check_devices(config, num_devices)`, which `load_config(..., num_devices=n)` also calls.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lad_jax.losses import AGGREGATIONS, DIVERGENCES, LOSSES, RATIO_LEVELS  # noqa: E402  (one source of names)

ADVANTAGES = ("grpo", "drgrpo", "rloo")
OLD_LOGPROBS = ("sampler", "recompute")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")
TASKS = ("none", "numbers")
DISTRIBUTED = ("auto", "on", "off")
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # Architecture of a from-scratch model; must stay null when `init_from` names an HF checkpoint.
    model_type: str | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 512
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    tokenizer: str | None = None  # HF tokenizer dir; null = from init_from or built by the task
    logprob_chunk_size: int = 256


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    distributed: str = "auto"  # auto: jax.distributed.initialize() when the environment names a multi-process job


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    prompts_per_step: int = 8
    num_samples: int = 8  # G responses per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    old_logprobs: str = "sampler"  # sampler | recompute


@dataclasses.dataclass(frozen=True)
class AlgorithmSection:
    loss: str = "lad"
    divergence: str = "js"
    eta: float = 0.25  # kappa = 1 / eta = 4
    ratio_level: str = "token"
    aggregation: str = "token-mean"
    advantage: str = "grpo"
    advantage_eps: float = 1e-6
    filter_zero_signal: bool = False
    mu: int = 1  # passes over each rollout
    minibatch_size: int = 64  # sequences per optimizer update
    micro_batch_size: int = 64  # sequences per forward/backward (gradient accumulation inside the step)
    clip_eps_low: float = 0.2  # GRPO/GSPO ratio clip [1 - low, 1 + high]
    clip_eps_high: float = 0.2
    log_ratio_clip: float | None = None  # optional LAD clamp of the log-ratio (ours, not the paper's)


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    lr: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataSection:
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"
    extra_fields: tuple[str, ...] = ()
    on_bad_row: str = "error"
    use_chat_template: bool = False
    system_prompt: str | None = None
    max_prompt_tokens: int = 64
    num_epochs: int | None = None


@dataclasses.dataclass(frozen=True)
class RewardSection:
    # Passed to lad_jax.rewards.build_reward_fn; each entry is a mapping with at least "name".
    functions: tuple[dict, ...] = ()
    correct_threshold: float = 1.0  # a response counts as correct when its reward >= this


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 50
    keep: int = 2
    dir: str | None = None  # null = <run dir>/checkpoints
    resume: bool = True
    export_hf: bool = True  # save_pretrained of the final policy to <run dir>/hf_export


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = True
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
    enabled: bool = True  # false: no evaluation at all (before, during or after training)
    every: int = 0  # 0 = only before and after training
    num_samples: int = 16  # k for pass@k / avg@k
    max_prompts: int = 64
    temperature: float = 1.0
    at_start: bool = True
    ngram: int = 4  # n of the distinct-n-gram diversity ratio (whitespace words)


@dataclasses.dataclass(frozen=True)
class TaskSection:
    name: str = "none"  # numbers: the built-in "number with property P" task (data, tokenizer, reward, SFT)
    num_train_prompts: int = 2000
    num_eval_prompts: int = 64
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_correct_fraction: float = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
    run_name: str = "default"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 100
    init_from: str | None = None
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    rollout: RolloutSection = RolloutSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    optimizer: OptimizerSection = OptimizerSection()
    data: DataSection = DataSection()
    reward: RewardSection = RewardSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    eval: EvalSection = EvalSection()
    task: TaskSection = TaskSection()

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.run_name)

    @property
    def checkpoint_dir(self) -> str:
        """Absolute (orbax needs it) unless it is a URL such as gs://bucket/dir."""
        path = self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        return path if "://" in path else os.path.abspath(path)

    @property
    def batch_size(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.num_samples

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write it as [a, b] in YAML")
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__}); quote it")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")  # a bug in this module, not in the YAML


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, text = override.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {text!r} as YAML ({e})") from None
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}' in override {override!r}")
        node = child
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key '{key}' in override {override!r}; valid keys here: "
                          f"{', '.join(node)}")
    node[parts[-1]] = value


def _choice(value, options, key: str):
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not valid; use one of {', '.join(options)}")


def _positive(value, key: str, fix: str = "set a positive value"):
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value!r} must be > 0; {fix}")


def validate(c: Config) -> None:
    """Device-independent checks; raises ConfigError naming the key."""
    m, r, a, o = c.model, c.rollout, c.algorithm, c.optimizer
    for key in ("steps",):
        if getattr(c, key) < 0:
            raise ConfigError(f"{key}={getattr(c, key)} must be >= 0")
    if not c.run_name or "/" in c.run_name:
        raise ConfigError(f"run_name={c.run_name!r} must be a non-empty name without '/'")
    if c.init_from is not None:
        set_arch = [k for k in ARCH_FIELDS if getattr(m, k) is not None]
        if set_arch:
            raise ConfigError(f"model.{set_arch[0]} is set but init_from={c.init_from!r} defines the architecture; "
                              f"remove model.{set_arch[0]} (set it to null) or unset init_from")
    else:
        missing = [k for k in ARCH_FIELDS if getattr(m, k) is None]
        if missing:
            raise ConfigError(f"model.{missing[0]} is required for a from-scratch model; set it or set init_from "
                              "to an HF checkpoint directory")
        for k in ARCH_FIELDS[1:]:
            _positive(getattr(m, k), f"model.{k}")
        if m.num_heads % m.num_kv_heads:
            raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads="
                              f"{m.num_kv_heads}")
    _choice(m.param_dtype, DTYPES, "model.param_dtype")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(m.remat, ("none", "full", "dots"), "model.remat")
    _positive(m.logprob_chunk_size, "model.logprob_chunk_size")
    if c.task.name == "none" and m.tokenizer is None and c.init_from is None:
        raise ConfigError("model.tokenizer is null, init_from is null and task.name='none': nothing provides a "
                          "tokenizer; set model.tokenizer to an HF tokenizer dir")
    for k in ("data", "fsdp", "tensor"):
        v = getattr(c.mesh, k)
        if v != -1 and v < 1:
            raise ConfigError(f"mesh.{k}={v} must be >= 1 or -1 (fill with the remaining devices)")
    if [c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1 (fill)")
    _choice(c.mesh.distributed, DISTRIBUTED, "mesh.distributed")
    _positive(r.prompts_per_step, "rollout.prompts_per_step")
    _positive(r.num_samples, "rollout.num_samples")
    _positive(r.max_new_tokens, "rollout.max_new_tokens")
    _positive(r.temperature, "rollout.temperature")
    if r.top_k < 0:
        raise ConfigError(f"rollout.top_k={r.top_k} must be >= 0 (0 = off)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    _choice(r.old_logprobs, OLD_LOGPROBS, "rollout.old_logprobs")
    _choice(a.loss, LOSSES, "algorithm.loss")
    _choice(a.divergence, DIVERGENCES, "algorithm.divergence")
    _choice(a.ratio_level, RATIO_LEVELS, "algorithm.ratio_level")
    _choice(a.aggregation, AGGREGATIONS, "algorithm.aggregation")
    _choice(a.advantage, ADVANTAGES, "algorithm.advantage")
    _positive(a.eta, "algorithm.eta", "eta = 1/kappa, e.g. 0.25 for kappa = 4")
    _positive(a.mu, "algorithm.mu", "mu is the number of passes over each rollout, >= 1")
    _positive(a.minibatch_size, "algorithm.minibatch_size")
    _positive(a.micro_batch_size, "algorithm.micro_batch_size")
    if a.advantage == "rloo" and r.num_samples < 2:
        raise ConfigError("algorithm.advantage='rloo' needs rollout.num_samples >= 2")
    if not 0 <= a.clip_eps_low < 1 or a.clip_eps_high < 0:
        raise ConfigError(f"algorithm.clip_eps_low={a.clip_eps_low} must be in [0, 1) and algorithm.clip_eps_high="
                          f"{a.clip_eps_high} >= 0")
    if c.batch_size % a.minibatch_size:
        raise ConfigError(
            f"algorithm.minibatch_size={a.minibatch_size} must divide rollout.prompts_per_step * "
            f"rollout.num_samples = {c.batch_size}; pick a divisor of {c.batch_size}")
    if a.minibatch_size % a.micro_batch_size:
        raise ConfigError(f"algorithm.micro_batch_size={a.micro_batch_size} must divide algorithm.minibatch_size="
                          f"{a.minibatch_size}")
    if a.filter_zero_signal and a.minibatch_size % r.num_samples:
        raise ConfigError("algorithm.filter_zero_signal=true drops whole groups: algorithm.minibatch_size="
                          f"{a.minibatch_size} must be a multiple of rollout.num_samples={r.num_samples}")
    _positive(o.lr, "optimizer.lr")
    _choice(o.schedule, SCHEDULES, "optimizer.schedule")
    if o.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
    if o.schedule == "cosine" and o.warmup_steps > c.steps:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} exceeds steps={c.steps} with a cosine "
                          "schedule; lower the warm-up or use optimizer.schedule=constant")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.max_grad_norm <= 0:
        raise ConfigError(f"optimizer.max_grad_norm={o.max_grad_norm} must be > 0")
    _choice(c.data.on_bad_row, ("error", "skip"), "data.on_bad_row")
    _positive(c.data.max_prompt_tokens, "data.max_prompt_tokens")
    if c.task.name == "none" and not c.data.train_files:
        raise ConfigError("data.train_files is empty; list JSONL/Parquet files (or use task.name=numbers, which "
                          "generates its own)")
    if c.task.name == "none" and not c.reward.functions:
        raise ConfigError("reward.functions is empty; list at least one reward, e.g. [{name: math}]")
    for i, spec in enumerate(c.reward.functions):
        if "name" not in spec:
            raise ConfigError(f"reward.functions[{i}] has no 'name'; write e.g. {{name: math, weight: 1.0}}")
        unknown = sorted(set(spec) - {"name", "weight", "kwargs"})
        if unknown:
            raise ConfigError(f"reward.functions[{i}] has unknown keys {unknown}; use name, weight, kwargs")
    if c.checkpoint.every < 0 or c.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 (0 = only at the end) and checkpoint.keep >= 1")
    if c.eval.every < 0:
        raise ConfigError(f"eval.every={c.eval.every} must be >= 0 (0 = only before/after training)")
    _positive(c.eval.num_samples, "eval.num_samples")
    _positive(c.eval.max_prompts, "eval.max_prompts")
    _positive(c.eval.ngram, "eval.ngram")
    _choice(c.task.name, TASKS, "task.name")
    if not 0 <= c.task.sft_correct_fraction <= 1:
        raise ConfigError(f"task.sft_correct_fraction={c.task.sft_correct_fraction} must be in [0, 1]")


def mesh_shape(c: Config, num_devices: int) -> tuple[int, int, int]:
    sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh: the fixed axes multiply to {fixed}, which does not divide the {num_devices} "
                              "devices; change mesh.data / mesh.fsdp / mesh.tensor")
        sizes[sizes.index(-1)] = num_devices // fixed
    if sizes[0] * sizes[1] * sizes[2] != num_devices:
        raise ConfigError(f"mesh.data*mesh.fsdp*mesh.tensor = {sizes[0] * sizes[1] * sizes[2]} but {num_devices} "
                          "devices are available; make the product equal or set one axis to -1 (fill)")
    return tuple(sizes)


def check_devices(c: Config, num_devices: int) -> tuple[int, int, int]:
    """Checks the mesh against the device count and the batch sizes against the batch axes; returns the shape."""
    d, f, _ = mesh_shape(c, num_devices)
    n = d * f  # batch rows are sharded over data x fsdp
    a = c.algorithm
    for key, value in (("algorithm.micro_batch_size", a.micro_batch_size),
                       ("rollout.prompts_per_step * rollout.num_samples", c.batch_size)):
        if value % n:
            raise ConfigError(f"{key}={value} is not divisible by the batch axes mesh.data*mesh.fsdp={n}; "
                              f"use a multiple of {n} or a smaller mesh")
    return d, f, _


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def resolve_config_path(path: str | os.PathLike | None) -> Path:
    """`None` -> the default config; relative names also resolve against the repo (any cwd works)."""
    if path is None:
        path = "configs/default.yaml"
    p = Path(path)
    if p.exists():
        return p
    for base in (repo_root(), Path(__file__).resolve().parent):
        cand = base / p
        if cand.exists():
            return cand
    cand = Path(__file__).resolve().parent / "configs" / p.name
    if cand.exists():
        return cand
    raise ConfigError(f"config file {str(path)!r} not found (looked in the cwd, {repo_root()} and the package)")


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (), *,
                num_devices: int | None = None, use_file: bool = True) -> Config:
    """Defaults <- YAML file (default configs/default.yaml) <- `key.sub=value` overrides; validated."""
    raw = Config().to_dict()
    if use_file:
        p = resolve_config_path(path)
        with open(p) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of config keys")
        _check_keys(raw, loaded, "")
        raw = _merge(raw, loaded)
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, "")
    validate(config)
    if num_devices is not None:
        check_devices(config, num_devices)
    return config


def _check_keys(defaults: dict, loaded: dict, prefix: str) -> None:
    for key, value in loaded.items():
        if key not in defaults:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(defaults)}")
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            _check_keys(defaults[key], value, f"{prefix}{key}.")


def save_config(config: Config, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)

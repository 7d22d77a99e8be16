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

import yaml

from lad_jax.config_checks import (  # noqa: F401  (re-exported: one place for names and checks)
    ADVANTAGES, AGGREGATIONS, ARCH_FIELDS, ATTENTION_IMPLS, DISTRIBUTED, DIVERGENCES, DTYPES, LOSSES, OLD_LOGPROBS,
    RATIO_LEVELS, SCHEDULES, TASKS, ConfigError, check_devices, mesh_shape, validate)


@dataclasses.dataclass(frozen=True)
class LoraSection:
    # LoRA (lad_jax/models/lora.py): rank 0 = full fine-tuning. With rank > 0 only the adapters are trained, held in
    # the optimizer and checkpointed; the base stays as init_from (or the from-scratch init) loaded it.
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # only 0 (see config_checks: dropout would make pi_theta != pi_old on-policy)
    targets: str = "wq|wk|wv|wo|w_gate|w_up|w_down"  # regex, full match over our projection names
    quantize_base: str = "none"  # none | int8 | nf4: the frozen base's projections stored quantized (QLoRA)


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
    # attention kernel: auto | dense | blockwise | splash (TPU) | cudnn (GPU); see lad_jax/models/attention.py
    attention: str = "auto"
    tokenizer: str | None = None  # HF tokenizer dir; null = from init_from or built by the task
    logprob_chunk_size: int = 256
    lora: LoraSection = LoraSection()


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # auto: jax.distributed.initialize() when the environment names a multi-process job or coordinator_address is
    # set. YAML reads a bare on/off as true/false, so booleans are accepted too (true -> "on", false -> "off").
    distributed: str = dataclasses.field(default="auto", metadata={"from_bool": ("off", "on")})
    # Launches without a cluster manager (localhost rehearsal, bare VMs): process 0's HOST:PORT, the process count
    # and this process's id. null = detected by jax.distributed (TPU pods, SLURM, MPI) or JAX_COORDINATOR_ADDRESS.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    prompts_per_step: int = 8
    num_samples: int = 8  # G responses per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    old_logprobs: str = "sampler"  # sampler | recompute
    # auto: chosen from the batch size and free device memory (`lad_jax.decode_memory`: static when every request
    # gets a slot, else the most slots that fit); 0: static batches (every row of the rollout decodes at once);
    # N > 0: continuous batching over N decode slots (`sampler_continuous`; same tokens for the same seed, a
    # finished row's slot takes the next pending row)
    decode_slots: int | str = "auto"
    decode_memory_fraction: float = 0.8  # of a device's free memory (train state resident) that auto may fill


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
    # Optional regularizers (LAD needs neither; verl/TRL-style options): kl_coef * KL(pi_theta || pi_ref) per token,
    # pi_ref a frozen copy of the initial policy (only built when kl_coef > 0), estimator k1 | k2 | k3 (Schulman);
    # entropy_coef * the current policy's per-token entropy is subtracted from the loss.
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0


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
class WandbSection:
    """Weights & Biases logging (the optional `wandb` extra): same scalars as TensorBoard, from process 0 only."""
    mode: str = "disabled"  # disabled | online | offline (offline: files under <run_dir>/wandb, no network)
    project: str = "lad_jax"
    entity: str | None = None  # None: the logged-in user's default entity
    run_name: str | None = None  # None: the config's run_name


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = True
    progress_bar: bool = True
    wandb: WandbSection = WandbSection()


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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(names)}")
        from_bool = fields[key].metadata.get("from_bool")
        if from_bool is not None and isinstance(value, bool):
            value = from_bool[value]  # (false, true) -> the field's string values
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


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def package_configs() -> Path:
    """The shipped configs: `lad_jax/configs`, a symlink to the repository's `configs/` in a checkout and a real
    directory (package data) in an installed wheel, so both hold the same files."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | os.PathLike | None) -> Path:
    """`None` -> the shipped configs/default.yaml; a relative path that is not under the cwd also resolves against
    the repository and the shipped configs (so `configs/NAME.yaml` works from any cwd and from a wheel)."""
    if path is None:
        return package_configs() / "default.yaml"
    p = Path(path)
    if p.exists():
        return p
    candidates = [repo_root() / p, package_configs() / p]
    if p.parent in (Path("configs"), Path(".")):
        candidates.append(package_configs() / p.name)
    for cand in candidates:
        if cand.exists():
            return cand
    raise ConfigError(f"config file {str(path)!r} not found (looked in the cwd, {repo_root()} and "
                      f"{package_configs()})")


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (), *,
                num_devices: int | None = None, use_file: bool = True) -> Config:
    """Defaults <- YAML file (default configs/default.yaml) <- `key.sub=value` overrides; validated."""
    raw = Config().to_dict()
    if use_file:
        p = resolve_config_path(path)
        with open(p) as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"{p}:{where}: malformed YAML ({problem}); fix the file") from None
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
    """Writes the resolved config as YAML to a local path or a URL (gs://...)."""
    from lad_jax import run_files

    run_files.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

"""Config checks: names of the valid choices and the start-up validation of a `lad_jax.config.Config`.

`validate(config)` runs the device-independent checks; `check_devices(config, n)` checks the mesh against the
device count and the batch sizes against the batch axes. Every error names the key and the fix.
"""
from __future__ import annotations

# one source of names
from lad_jax.losses import AGGREGATIONS, DIVERGENCES, KL_ESTIMATORS, LOSSES, RATIO_LEVELS  # noqa: E402
from lad_jax.tasks import task_names

ADVANTAGES = ("grpo", "drgrpo", "rloo")
OLD_LOGPROBS = ("sampler", "recompute")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")
TASKS = task_names()  # lad_jax.tasks registry
DISTRIBUTED = ("auto", "on", "off")
WANDB_MODES = ("disabled", "online", "offline")
# attention kernels (lad_jax.models.attention): auto = dense for short sequences, else blockwise / splash on TPU
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "splash", "cudnn")
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def _choice(value, options, key: str):
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not valid; use one of {', '.join(options)}")


def _positive(value, key: str, fix: str = "set a positive value"):
    if value is None or value <= 0:
        raise ConfigError(f"{key}={value!r} must be > 0; {fix}")


def validate(c) -> None:
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
    _choice(m.attention, ATTENTION_IMPLS, "model.attention")
    _positive(m.logprob_chunk_size, "model.logprob_chunk_size")
    _check_lora(c)
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
    _check_processes(c.mesh)
    _positive(r.prompts_per_step, "rollout.prompts_per_step")
    _positive(r.num_samples, "rollout.num_samples")
    _positive(r.max_new_tokens, "rollout.max_new_tokens")
    _positive(r.temperature, "rollout.temperature")
    if r.top_k < 0:
        raise ConfigError(f"rollout.top_k={r.top_k} must be >= 0 (0 = off)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    _choice(r.old_logprobs, OLD_LOGPROBS, "rollout.old_logprobs")
    if r.decode_slots != "auto" and not (isinstance(r.decode_slots, int) and r.decode_slots >= 0):
        raise ConfigError(f"rollout.decode_slots={r.decode_slots!r} must be auto, 0 (static batches) or a slot count "
                          f"N > 0")
    if not 0 < r.decode_memory_fraction <= 1:
        raise ConfigError(f"rollout.decode_memory_fraction={r.decode_memory_fraction} must be in (0, 1]")
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
    _choice(a.kl_estimator, KL_ESTIMATORS, "algorithm.kl_estimator")
    for key in ("kl_coef", "entropy_coef"):
        if not getattr(a, key) >= 0:  # also rejects nan
            raise ConfigError(f"algorithm.{key}={getattr(a, key)} must be >= 0 (0 = off)")
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
    _choice(c.logging.wandb.mode, WANDB_MODES, "logging.wandb.mode")
    if not 0 <= c.task.sft_correct_fraction <= 1:
        raise ConfigError(f"task.sft_correct_fraction={c.task.sft_correct_fraction} must be in [0, 1]")


def _check_processes(mesh) -> None:
    explicit = {k: getattr(mesh, k) for k in ("coordinator_address", "num_processes", "process_id")
                if getattr(mesh, k) is not None}
    if explicit and mesh.distributed == "off":
        raise ConfigError(f"mesh.{next(iter(explicit))} is set but mesh.distributed=off; remove it or set "
                          "mesh.distributed=auto")
    if (mesh.num_processes is None) != (mesh.process_id is None):
        given, missing = (("num_processes", "process_id") if mesh.process_id is None
                          else ("process_id", "num_processes"))
        raise ConfigError(f"mesh.{given} is set but mesh.{missing} is not; give both (every process the same "
                          "mesh.num_processes, each its own mesh.process_id from 0)")
    if mesh.coordinator_address is not None:
        host, _, port = mesh.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"mesh.coordinator_address={mesh.coordinator_address!r} must be HOST:PORT, e.g. "
                              "127.0.0.1:12345 (process 0's address)")
        if mesh.num_processes is None:
            raise ConfigError("mesh.coordinator_address is set but mesh.num_processes / mesh.process_id are not; "
                              "JAX reads only the address from it, so give the count and this process's id too")
    if mesh.num_processes is not None:
        if mesh.num_processes < 1:
            raise ConfigError(f"mesh.num_processes={mesh.num_processes} must be >= 1")
        if not 0 <= mesh.process_id < mesh.num_processes:
            raise ConfigError(f"mesh.process_id={mesh.process_id} must be in [0, mesh.num_processes="
                              f"{mesh.num_processes})")


def mesh_shape(c, num_devices: int) -> tuple[int, int, int]:
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


# kernels that exist on one platform only; `auto` never picks them elsewhere
_ATTENTION_PLATFORM = {"splash": "tpu", "cudnn": "gpu"}


def check_devices(c, num_devices: int, platform: str | None = None) -> tuple[int, int, int]:
    """Checks the mesh against the device count and the batch sizes against the batch axes; returns the shape.

    With `platform` (jax's backend name), also that `model.attention` can run there.
    """
    needs = _ATTENTION_PLATFORM.get(c.model.attention)
    if platform is not None and needs is not None and platform != needs:
        raise ConfigError(f"model.attention={c.model.attention!r} runs only on {needs.upper()} but this run's "
                          f"devices are {platform!r}; use model.attention=auto (or blockwise / dense)")
    d, f, _ = mesh_shape(c, num_devices)
    n = d * f  # batch rows are sharded over data x fsdp
    a = c.algorithm
    for key, value in (("algorithm.micro_batch_size", a.micro_batch_size),
                       ("rollout.prompts_per_step * rollout.num_samples", c.batch_size)):
        if value % n:
            raise ConfigError(f"{key}={value} is not divisible by the batch axes mesh.data*mesh.fsdp={n}; "
                              f"use a multiple of {n} or a smaller mesh")
    return d, f, _


def _check_lora(c) -> None:
    import re

    from lad_jax.models.lora import PROJECTIONS, QUANTIZE_BASE, resolve_targets

    lo = c.model.lora
    if lo.rank < 0:
        raise ConfigError(f"model.lora.rank={lo.rank} must be >= 0 (0 = full fine-tuning)")
    if lo.rank == 0:
        return
    _positive(lo.alpha, "model.lora.alpha")
    if lo.dropout != 0.0:
        raise ConfigError(f"model.lora.dropout={lo.dropout} is not supported: dropout in the training forward makes "
                          "pi_theta differ from the sampler's pi_old on-policy, which biases the LAD/GRPO ratios; "
                          "set model.lora.dropout=0")
    try:
        targets = resolve_targets(lo.targets)
    except re.error as e:
        raise ConfigError(f"model.lora.targets={lo.targets!r} is not a valid regex ({e})") from None
    if not targets:
        raise ConfigError(f"model.lora.targets={lo.targets!r} matches none of the projections {PROJECTIONS}; "
                          "e.g. 'wq|wv' or 'w[qkvo]|w_(gate|up|down)'")
    _choice(lo.quantize_base, QUANTIZE_BASE, "model.lora.quantize_base")
    if c.task.name != "none" and c.task.sft_steps > 0:
        raise ConfigError(f"model.lora.rank={lo.rank} with task.sft_steps={c.task.sft_steps}: the warm start trains "
                          "the base weights, which a LoRA run neither trains nor checkpoints; set task.sft_steps=0 "
                          "(or export a warm-started model and pass it as init_from)")

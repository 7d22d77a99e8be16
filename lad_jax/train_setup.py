"""Trainer set-up: distributed start, mesh, task files, tokenizer, model, reward, data loader, train state.

Everything here runs once before the loop; `build(config)` returns a `Setup` holding the pieces.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from lad_jax import distributed, run_files
from lad_jax import train_step as ts
from lad_jax.config import Config, ConfigError, check_devices, save_config
from lad_jax.sharding import make_mesh

@dataclasses.dataclass
class Setup:
    config: Config
    mesh: Any
    tokenizer: Any
    graphdef: Any
    model_config: Any
    params: Any  # initial params (pure dict, sharded)
    reward_fn: Callable
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    tx: Any
    schedule: Callable
    shardings: dict
    stop_ids: tuple[int, ...]
    loader: Any  # data.PromptLoader over the train files (validated before the model is built)
    eval_rows: list[dict]


def task_files(c: Config) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """(train files, eval files, tokenizer dir) — generated into the run dir by a built-in task (`lad_jax.tasks`).

    The task's files are a pure function of the config, so every host and every restart makes the same ones.
    Process 0 writes them into a local run dir; the other processes (which may share that directory, as in a
    localhost rehearsal) and every process of a remote run dir (gs://...) write into a local temporary directory,
    from which process 0 copies them up.
    """
    from lad_jax.tasks import get_task

    task = get_task(c.task.name)
    if task is not None:
        base = c.run_dir
        if run_files.is_remote(base) or jax.process_index() != 0:
            import tempfile

            base = tempfile.mkdtemp(prefix="lad_jax_task_")
        train, evalf = task.write_data(os.path.join(base, "data"), c.task, c.seed)
        tok_dir = os.path.join(base, "tokenizer")
        task.build_tokenizer(tok_dir)
        if run_files.is_remote(c.run_dir) and jax.process_index() == 0:
            for name in ("data", "tokenizer"):
                run_files.upload_dir(os.path.join(base, name), run_files.join(c.run_dir, name))
        return (c.data.train_files or (train,)), (c.data.eval_files or (evalf,)), c.model.tokenizer or tok_dir
    return c.data.train_files, c.data.eval_files, c.model.tokenizer or c.init_from


def reward_specs(c: Config) -> list[tuple[str, float, dict]]:
    specs = []
    for i, spec in enumerate(c.reward.functions):
        unknown = set(spec) - {"name", "weight", "kwargs"}
        if unknown:
            raise ConfigError(f"reward.functions[{i}] has unknown keys {sorted(unknown)}; use name, weight, kwargs")
        specs.append((str(spec["name"]), float(spec.get("weight", 1.0)), dict(spec.get("kwargs") or {})))
    if not specs and c.task.name != "none":
        from lad_jax.tasks import get_task

        specs = [(get_task(c.task.name).reward, 1.0, {})]
    return specs


def lora_spec(c: Config):
    """The model's `LoraSpec` from `model.lora`, or None (rank 0: full fine-tuning)."""
    from lad_jax.models.lora import LoraSpec, resolve_targets

    lo = c.model.lora
    if lo.rank == 0:
        return None
    return LoraSpec(rank=lo.rank, alpha=lo.alpha, targets=resolve_targets(lo.targets),
                    quantize_base=lo.quantize_base)


def build_model(c: Config, tokenizer, mesh):
    from lad_jax.models import create_model, from_pretrained

    m = c.model
    if c.init_from is not None:
        model = from_pretrained(c.init_from, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat,
                                attention=m.attention, lora_spec=lora_spec(c), seed=c.seed)
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but init_from's vocab_size is "
                              f"{model.config.vocab_size}; use the checkpoint's own tokenizer (model.tokenizer)")
        return model
    cfg = scratch_model_config(c, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    return create_model(cfg, seed=c.seed, mesh=mesh)


def scratch_model_config(c: Config, vocab_size: int, eos_id: int, pad_id: int | None):
    """The ModelConfig of a from-scratch model (init_from=null): the `model` section plus the tokenizer's sizes."""
    from lad_jax.models import ModelConfig

    m = c.model
    return ModelConfig(model_type=m.model_type, vocab_size=vocab_size, hidden_size=m.hidden_size,
                       intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, rope_theta=m.rope_theta,
                       max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_word_embeddings,
                       qkv_bias=m.model_type == "qwen2", qk_norm=m.model_type == "qwen3",
                       eos_token_ids=(eos_id,), pad_token_id=pad_id,
                       param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention,
                       lora=lora_spec(c))


def train_objects(c: Config, model, mesh):
    """(graphdef, params pure dict, optax tx, lr schedule, train-state shardings) for `model` on `mesh`; params are
    all the model's (`train_step.init_train_state` splits off the frozen base under LoRA)."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    params_sh = ts.param_shardings(state, mesh)
    schedule = ts.make_schedule(c)
    tx = ts.make_optimizer(c, schedule)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return graphdef, params, tx, schedule, ts.train_state_shardings(tx, abstract, params_sh, mesh,
                                                                    lora_adapters=model.config.lora is not None)


def build(c: Config) -> Setup:
    distributed.initialize(c.mesh)
    shape = check_devices(c, jax.device_count(), jax.default_backend())
    mesh = make_mesh(*shape)
    try:
        run_files.makedirs(c.run_dir)
    except OSError as e:
        raise ConfigError(f"output_dir={c.output_dir!r}: cannot create the run directory {c.run_dir} ({e}); choose a "
                          "writable output_dir") from None
    if jax.process_index() == 0:
        save_config(c, run_files.join(c.run_dir, "config.yaml"))
    train_files, eval_files, tok_path = task_files(c)
    from lad_jax.rewards import build_reward_fn
    from lad_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Data before the model: a bad file fails in seconds, not after the weights are built.
    loader = make_loader(c, train_files, tokenizer)
    evals = eval_rows(c, eval_files) if c.eval.enabled else []
    from lad_jax.experience import prompt_bucket

    bucket = prompt_bucket(c)
    model = build_model(c, tokenizer, mesh)
    limit = model.config.max_position_embeddings
    if c.eval.enabled:
        bucket = max(bucket, 16)  # lad_jax.evaluate pads prompts to at least 16 slots
    if bucket + c.rollout.max_new_tokens > limit:
        raise ConfigError(f"data.max_prompt_tokens (prompt slots {bucket}) + rollout.max_new_tokens="
                          f"{c.rollout.max_new_tokens} exceeds the model's max_position_embeddings={limit}; "
                          "lower them or raise model.max_position_embeddings")
    graphdef, params, tx, schedule, shardings = train_objects(c, model, mesh)
    stop = tuple(model.config.eos_token_ids) or (tokenizer.eos_token_id,)
    return Setup(c, mesh, tokenizer, graphdef, model.config, params, build_reward_fn(reward_specs(c)),
                 tuple(train_files), tuple(eval_files), tx, schedule, shardings, tuple(int(s) for s in stop), loader,
                 evals)


def _load(c: Config, files, what: str):
    from lad_jax.data import DataError, load_rows

    rows, stats = load_rows(list(files), prompt_field=c.data.prompt_field, answer_field=c.data.answer_field,
                            extra_fields=c.data.extra_fields, on_bad_row=c.data.on_bad_row)
    if not rows:
        skipped = f" ({stats['bad_rows']} bad rows skipped)" if stats["bad_rows"] else ""
        raise DataError(f"{', '.join(map(str, files))}: no {what} prompts{skipped}; check the file(s) "
                        f"(data.{what}_files) and data.prompt_field={c.data.prompt_field!r}")
    return rows, stats


def make_loader(c: Config, train_files, tokenizer):
    from lad_jax.data import PromptLoader

    rows, stats = _load(c, train_files, "train")
    # One global iterator, the same on every host (each host holds the whole prompt batch; see trainer.py), so
    # every host's checkpointed iterator state is the same and all hosts resume at the same place.
    return PromptLoader(rows, tokenizer=tokenizer, batch_size=c.rollout.prompts_per_step,
                        seed=c.seed, max_prompt_tokens=c.data.max_prompt_tokens,
                        use_chat_template=c.data.use_chat_template, num_epochs=c.data.num_epochs,
                        system_prompt=c.data.system_prompt, load_stats=stats)


def eval_rows(c: Config, eval_files) -> list[dict]:
    if not eval_files:
        return []
    return _load(c, eval_files, "eval")[0][: c.eval.max_prompts]


def step_key(seed: int, step: int):
    """The rollout RNG of `step`: a pure function of (seed, step), so a resumed run draws the same samples."""
    return jax.random.fold_in(jax.random.key(seed), step)


def shuffle_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, 0x5EED])

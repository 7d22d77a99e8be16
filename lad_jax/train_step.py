"""The jitted policy-update step: micro-batch gradient accumulation + optax, with explicit shardings and donation.

Train state: a plain dict pytree ``{"params": <pure dict>, "opt_state": <optax state>, "step": int32[]}``; params
are the model's `nnx.to_pure_dict` and are merged back with the graphdef inside the traced function, so the
sampler and the trainer share one set of arrays. With LoRA (`model.lora.rank > 0`) "params" holds only the adapters
(all the optimizer sees) and a fourth entry "frozen" holds the base weights; `full_params(state)` joins them. The
checkpoint leaves "frozen" out: the base is rebuilt from `init_from` on resume.

A step consumes one minibatch laid out as ``[n_micro, m, t]`` (micro-batches on the leading axis; rows sharded over
the data axes). Gradients of each micro-batch's loss *numerator* are summed by a `lax.scan` and divided once by the
summed denominator (token or sequence count, gradient-free), so the update equals the full-minibatch gradient
exactly (up to float summation order) for any micro-batch size.

Batch arrays (``t`` = prompt + response slots, tokens left-aligned to the prompt's end as the sampler laid them out):
  tokens_bt int32, positions_bt int32, valid_bt bool (not padding), response_bt bool (token t is a response
  token whose log-prob is trained), old_logp_bt float32 (pi_old log-prob of token t), advantages_b float32; with
  `algorithm.kl_coef > 0` also ref_logp_bt float32 (the frozen reference policy's log-prob of token t).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lad_jax import losses
from lad_jax.config import Config
from lad_jax.models import token_logprobs
from lad_jax.models import lora
from lad_jax.models.attention import causal_mask
from lad_jax.sharding import state_shardings

BATCH_KEYS = ("tokens_bt", "positions_bt", "valid_bt", "response_bt", "old_logp_bt", "advantages_b")
REF_KEY = "ref_logp_bt"  # batch key present only when algorithm.kl_coef > 0
BATCH_AXES = ("data", "fsdp")


def batch_keys(c: Config) -> tuple[str, ...]:
    """The train step's batch keys for this config (the reference log-probs only when the KL term is on)."""
    return BATCH_KEYS + ((REF_KEY,) if c.algorithm.kl_coef > 0 else ())


def make_schedule(c: Config) -> Callable:
    o = c.optimizer
    if o.schedule == "constant":
        if o.warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)], [o.warmup_steps])
        return optax.constant_schedule(o.lr)
    updates = max(c.steps * updates_per_step(c), 1)
    warm = o.warmup_steps * updates_per_step(c)
    return optax.warmup_cosine_decay_schedule(0.0 if warm else o.lr, o.lr, warm, max(updates, warm + 1),
                                              end_value=o.lr * o.min_lr_ratio)


def updates_per_step(c: Config) -> int:
    """Optimizer updates per RL step: mu passes x minibatches per rollout."""
    return c.algorithm.mu * (c.batch_size // c.algorithm.minibatch_size)


def make_optimizer(c: Config, schedule: Callable) -> optax.GradientTransformation:
    o = c.optimizer
    return optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )


def batch_sharding(mesh: Mesh, ndim: int, lead: int = 1) -> NamedSharding:
    """Rows (axis `lead`) over the data axes; everything else replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    spec = [None] * ndim
    if axes:
        spec[lead] = axes if len(axes) > 1 else axes[0]
    return NamedSharding(mesh, P(*spec))


def param_shardings(abstract_model_state, mesh: Mesh):
    return nnx.to_pure_dict(state_shardings(abstract_model_state, mesh))


def train_state_shardings(tx, abstract_params, params_sh, mesh: Mesh, *, lora_adapters: bool = False):
    """Shardings for the whole train state: optimizer moments follow their parameter, the rest is replicated.

    `abstract_params`/`params_sh` cover all the model's params; with `lora_adapters` they are split into the
    trained adapters ("params") and the frozen base ("frozen")."""
    replicated = NamedSharding(mesh, P())
    trainable, _ = lora.split_params(abstract_params, lora_adapters)
    trainable_sh, frozen_sh = lora.split_params(params_sh, lora_adapters)
    abstract_opt = jax.eval_shape(tx.init, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, trainable_sh,
                                   transform_non_params=lambda _: replicated)
    out = {"params": trainable_sh, "opt_state": opt_sh, "step": replicated}
    if lora_adapters:
        out["frozen"] = frozen_sh
    return out


def full_params(state: dict):
    """All the model's params (pure dict) of a train state, or all the param shardings of its shardings."""
    return lora.merge_params(state["frozen"] if "frozen" in state else {}, state["params"])


def init_train_state(tx, params, shardings):
    """The train state of the model's `params` (all of them), built directly on its shardings (eval_shape ->
    shardings -> jit(init, out_shardings))."""
    adapters = "frozen" in shardings

    def init(p):
        trainable, frozen = lora.split_params(p, adapters)
        state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}
        if adapters:
            state["frozen"] = frozen
        return state
    return jax.jit(init, in_shardings=(full_params(shardings),), out_shardings=shardings)(params)


def checkpointed(state: dict) -> dict:
    """What a checkpoint holds of a train state: all of it but the frozen base."""
    return {k: v for k, v in state.items() if k != "frozen"}


def sequence_logprobs(graphdef, params, tokens_bt, positions_bt, valid_bt, *, temperature: float,
                      chunk_size: int = 256):
    """(log pi(token t | tokens < t), entropy of that distribution), float32 [b, t]; column 0 is 0."""
    model = nnx.merge(graphdef, params)
    b, t = tokens_bt.shape
    # Padding keys are masked; a padding query still sees itself so no softmax row is empty.
    mask = causal_mask(b, t - 1, t - 1, 0, valid_bt[:, :-1], self_visible=True)
    logp, ent = token_logprobs(model, tokens_bt[:, :-1], positions_bt[:, :-1], mask, tokens_bt[:, 1:],
                               temperature=temperature, chunk_size=chunk_size, return_entropy=True)
    pad = ((0, 0), (1, 0))
    return jnp.pad(logp, pad), jnp.pad(ent, pad)


def loss_kwargs(c: Config) -> dict:
    a = c.algorithm
    return dict(loss=a.loss, divergence=a.divergence, eta=a.eta, ratio_level=a.ratio_level,
                aggregation=a.aggregation, clip_eps_low=a.clip_eps_low, clip_eps_high=a.clip_eps_high,
                log_ratio_clip=a.log_ratio_clip, max_length_norm=float(c.rollout.max_new_tokens),
                kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef)


class TrainStep:
    """`step(state, batch) -> (state, metrics)`; one jit, state donated; `compiles` counts traces."""

    def __init__(self, c: Config, graphdef, tx, schedule, mesh: Mesh, shardings):
        self.compiles = 0
        kwargs = loss_kwargs(c)
        temperature = c.rollout.temperature
        chunk = c.model.logprob_chunk_size
        use_ref = c.algorithm.kl_coef > 0
        # The entropy is always a metric; it carries gradient only when the bonus is on.
        entropy_grad = c.algorithm.entropy_coef > 0

        def step_fn(state, frozen, batch):
            self.compiles += 1  # runs only while tracing
            params = state["params"]

            def micro(carry, mb):
                grads_acc, num_acc, den_acc, wsum = carry

                def loss_fn(p):
                    logp, ent = sequence_logprobs(graphdef, lora.merge_params(frozen, p), mb["tokens_bt"],
                                                  mb["positions_bt"], mb["valid_bt"], temperature=temperature,
                                                  chunk_size=chunk)
                    num, den, met = losses.policy_loss(
                        logp, mb["old_logp_bt"], mb["advantages_b"], mb["response_bt"],
                        entropy_bt=ent if entropy_grad else jax.lax.stop_gradient(ent),
                        ref_logp_bt=mb[REF_KEY] if use_ref else None, **kwargs)
                    return num, (den, met)

                (num, (den, met)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
                ntok = jnp.sum(mb["response_bt"]).astype(jnp.float32)
                wsum = {k: wsum[k] + met[k] * ntok for k in wsum}
                grads_acc = jax.tree.map(jnp.add, grads_acc, g)
                return (grads_acc, num_acc + num, den_acc + den, wsum), ntok

            # The loss's own metric names (minus "loss", which is num / den below), read off an abstract call.
            mb0 = jax.tree.map(lambda x: x[0], batch)
            _, _, met0 = jax.eval_shape(lambda: losses.policy_loss(
                mb0["old_logp_bt"], mb0["old_logp_bt"], mb0["advantages_b"], mb0["response_bt"],
                entropy_bt=mb0["old_logp_bt"], ref_logp_bt=mb0[REF_KEY] if use_ref else None, **kwargs))
            metric_names = tuple(k for k in met0 if k != "loss")
            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, jnp.float32(0), jnp.float32(0), {k: jnp.float32(0) for k in metric_names})
            (grads, num, den, wsum), ntok_m = jax.lax.scan(micro, init, batch)
            den = jnp.maximum(den, 1.0)
            grads = jax.tree.map(lambda g: g / den, grads)
            ntok = jnp.maximum(jnp.sum(ntok_m), 1.0)
            metrics = {f"train/{k}": v / ntok for k, v in wsum.items()}
            metrics["train/loss"] = num / den
            metrics["train/grad_norm"] = optax.tree.norm(grads)
            metrics["train/lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                   "step": state["step"] + 1}
            return new, metrics

        bsh = {k: batch_sharding(mesh, 2 if k == "advantages_b" else 3) for k in batch_keys(c)}
        replicated = NamedSharding(mesh, P())
        self.batch_shardings = bsh
        self.mesh = mesh
        # The frozen LoRA base is an argument of its own: read, never donated or returned.
        frozen_sh = shardings["frozen"] if "frozen" in shardings else {}
        updated_sh = checkpointed(shardings)
        self._fn = jax.jit(step_fn, in_shardings=(updated_sh, frozen_sh, bsh),
                           out_shardings=(updated_sh, replicated), donate_argnums=(0,))

    @staticmethod
    def _split(state):
        return checkpointed(state), (state["frozen"] if "frozen" in state else {})

    # Traced under the mesh so the model's logical-axis constraints (`sharding.constrain`) take effect.
    def __call__(self, state, batch: dict[str, Any]):
        updated, frozen = self._split(state)
        with jax.set_mesh(self.mesh):
            new, metrics = self._fn(updated, frozen, batch)
        if "frozen" in state:
            new["frozen"] = frozen
        return new, metrics

    def lower(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self._fn.lower(*self._split(state), batch)


def make_logprob_fn(graphdef, mesh: Mesh, params_sh, temperature: float, chunk_size: int = 256):
    """Jitted pi_theta log-probs of a [b, t] batch (for `rollout.old_logprobs=recompute` and checks)."""
    rows = batch_sharding(mesh, 2, lead=0)

    def fn(params, tokens_bt, positions_bt, valid_bt):
        return sequence_logprobs(graphdef, params, tokens_bt, positions_bt, valid_bt, temperature=temperature,
                                 chunk_size=chunk_size)[0]

    return jax.jit(fn, in_shardings=(params_sh, rows, rows, rows), out_shardings=rows)

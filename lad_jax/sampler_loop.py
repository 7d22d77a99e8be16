"""The jitted pieces of `lad_jax.sampler.generate`: prefill, the decode's state, and its phased `lax.while_loop`.

`prefill` runs the prompts once into a KV cache (per-layer decode layout, repeated G times); `start` draws token 0 from
the prefill logits; `decode` runs one phase of the loop over a cache window (`decode_windows`), `grow` zero-extends
the cache between phases, layer by layer; `decode_weights` makes the decode's per-layer weights in the compute dtype,
replicated over data and fsdp, once per call. See `lad_jax/sampler.py` for the
flow, the RNG scheme and the compile-cache keys. `TRACES` counts traces (= compilations) per function.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lad_jax.models.attention import causal_mask
from lad_jax.models.cache import (CACHE_LOGICAL_AXES, LAYER_CACHE_LOGICAL_AXES, LAYER_CACHE_SEQUENCE_AXIS,
                                  init_cache, unstack_cache)
from lad_jax.models.transformer import layer_param_specs, top_param_specs
from lad_jax.sampling import SamplingMode, SamplingParams, sample_tokens_from_uniform
from lad_jax.sharding import DECODE_WEIGHT_RULES, constrain

TRACES: collections.Counter = collections.Counter()


@struct.dataclass
class SamplerState:
    """The decode loop's carry. `step` tokens have been written to `tokens_bt`; `last_b` is token `step - 1`."""

    step: jax.Array  # int32[]
    cache: dict
    last_b: jax.Array  # int32 [B]
    tokens_bt: jax.Array
    logprobs_bt: jax.Array
    lengths_b: jax.Array
    done_b: jax.Array  # bool [B] stop token emitted
    uniform_bt: jax.Array  # float32 [B, T] the RNG stream: row b's U[0, 1) draw for token t


def _prefill_impl(graphdef, state, tokens_pl, positions_pl, valid_pl, *, cache_len, num_samples, cache_dtype):
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    p, lp = tokens_pl.shape
    cache = init_cache(model.config, p, cache_len, cache_dtype)
    cache = {k: constrain(v, CACHE_LOGICAL_AXES[k]) for k, v in cache.items()}
    valid_ps = jnp.pad(valid_pl, ((0, 0), (0, cache_len - lp)))
    mask = causal_mask(p, lp, cache_len, 0, valid_ps)
    hidden_ptd, cache = model.hidden(tokens_pl, positions_pl, cache=cache, mask=mask)
    # left padding puts every prompt's last token at the last position
    logits_pv = model.logits(hidden_ptd[:, -1:])[:, 0]
    cache = unstack_cache(cache)

    def per_row(name):
        rep = (lambda a: jnp.repeat(a, num_samples, axis=0)) if num_samples > 1 else (lambda a: a)
        return tuple(constrain(rep(a), LAYER_CACHE_LOGICAL_AXES[name]) for a in cache[name])

    cache = {"k": per_row("k"), "v": per_row("v"), "index": cache["index"]}
    if num_samples > 1:
        logits_pv = jnp.repeat(logits_pv, num_samples, axis=0)
    return constrain(logits_pv, ("batch", "act_vocab")), cache


prefill = jax.jit(_prefill_impl, static_argnames=("graphdef", "cache_len", "num_samples", "cache_dtype"))


def decode_windows(prompt_bucket: int, max_new_tokens: int, phases: int) -> tuple[tuple[int, int], ...]:
    """The decode's phases as (end step, attention window) pairs.

    Phase j runs decode steps up to `end_j` (exclusive) over a cache of `prompt_bucket + end_j` slots, so attention
    reads only slots that can be filled by then, not the whole `prompt_bucket + max_new_tokens` (reading the cache is
    the decode step's largest cost after the weight matmuls). Phase ends are multiples of 16 and phases shorter than
    32 steps are merged: each distinct window is one compiled decode.
    """
    n = max(1, min(int(phases), max_new_tokens // 32))
    ends = sorted({min(max_new_tokens, -(-max_new_tokens * j // n // 16) * 16) for j in range(1, n + 1)})
    return tuple((e, prompt_bucket + e) for e in ends)


def _decode_weights_impl(graphdef, state):
    """(top, layers): the decode's weights in the compute dtype, placed by `DECODE_WEIGHT_RULES`.

    `layers[l]` is layer l's weight dict (`Transformer.layer_params`), `top` the embedding, final norm and head.
    Made once per generate call, so the loop body neither converts fp32 master weights nor all-gathers FSDP shards
    every step (it would otherwise: the weights are loop-invariant, but XLA keeps the gather inside the while body).
    The layer math converts every weight to the compute dtype before use, so converting first is exact.
    """
    TRACES["decode_weights"] += 1
    model = nnx.merge(graphdef, state)
    c = model.config
    names = {name: axes[1:] for name, (_, axes, _) in layer_param_specs(c).items()}  # without the layers axis
    # quantized (LoRA base) weights stay int8 / uint4: the layers dequantize them one at a time
    layers = tuple({name: constrain(w if w.dtype in (jnp.int8, jnp.uint4) else w.astype(c.jnp_dtype), names[name],
                                    DECODE_WEIGHT_RULES) for name, w in p.items()}
                   for p in model.layer_params())
    top = {name: constrain(getattr(model, name)[...].astype(c.jnp_dtype), axes, DECODE_WEIGHT_RULES)
           for name, (_, axes, _) in top_param_specs(c).items()}
    return top, layers


decode_weights = jax.jit(_decode_weights_impl, static_argnames=("graphdef",))


def _emit(s: SamplerState, logits_bv, stop_ids, params: SamplingParams, pad_id, mode: SamplingMode) -> SamplerState:
    """Draw token `s.step` for every live row from its logits and record it."""
    u_b = jax.lax.dynamic_index_in_dim(s.uniform_bt, s.step, axis=1, keepdims=False)
    tok_b, logp_b = sample_tokens_from_uniform(logits_bv, u_b, params, mode)
    live_b = ~s.done_b
    tok_b = jnp.where(live_b, tok_b, pad_id)
    logp_b = jnp.where(live_b, logp_b, 0.0)
    stop_b = jnp.any(tok_b[:, None] == stop_ids[None, :], axis=-1) & live_b
    return s.replace(
        step=s.step + 1,
        last_b=tok_b,
        tokens_bt=jax.lax.dynamic_update_index_in_dim(s.tokens_bt, tok_b, s.step, axis=1),
        logprobs_bt=jax.lax.dynamic_update_index_in_dim(s.logprobs_bt, logp_b, s.step, axis=1),
        lengths_b=s.lengths_b + live_b.astype(jnp.int32),
        done_b=s.done_b | stop_b,
    )


def _start_impl(cache, logits_bv, stop_ids, params: SamplingParams, key, pad_id, *, mode: SamplingMode,
                max_new_tokens: int):
    """The decode's initial state with token 0 drawn from the prefill logits."""
    TRACES["decode_start"] += 1
    b = logits_bv.shape[0]
    keys_b = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b, dtype=jnp.uint32))
    # one U[0,1) per row and step, drawn up front: the loop body then does no RNG work (inverse-CDF sampling)
    uniform_bt = jax.vmap(lambda k: jax.random.uniform(k, (max_new_tokens,), jnp.float32))(keys_b)
    init = SamplerState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        last_b=jnp.zeros((b,), jnp.int32),
        tokens_bt=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logprobs_bt=jnp.zeros((b, max_new_tokens), jnp.float32),
        lengths_b=jnp.zeros((b,), jnp.int32),
        done_b=jnp.zeros((b,), bool),
        uniform_bt=uniform_bt,
    )
    return _emit(init, logits_bv, stop_ids, params, pad_id, mode)


start = jax.jit(_start_impl, static_argnames=("mode", "max_new_tokens"), donate_argnames=("cache",))


def _decode_impl(graphdef, state, weights, s: SamplerState, valid_bl, positions_b, stop_ids,
                 params: SamplingParams, pad_id, *, mode: SamplingMode, end_step: int, window: int):
    """One decode phase: steps until `end_step` (or until every row has stopped) over a cache of `window` slots.

    `weights`: `decode_weights(graphdef, state)`; `state` only completes the module (its weights go unused, so jit
    prunes them from the executable's arguments).
    """
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    top, layer_params = weights
    for name, w in top.items():  # set_value replaces the array (`[...] =` would cast back to the param dtype)
        getattr(model, name).set_value(w)
    lp = valid_bl.shape[1]
    valid_bs = jnp.pad(valid_bl, ((0, 0), (0, window - lp)))
    slots = jnp.arange(window)

    def cond(s: SamplerState):
        return (s.step < end_step) & ~jnp.all(s.done_b)

    def body(s: SamplerState) -> SamplerState:
        index = s.cache["index"]
        mask_b1s = (valid_bs | ((slots >= lp) & (slots <= index))[None, :])[:, None, :]
        pos_b1 = (positions_b + s.step - 1)[:, None]
        hidden_b1d, cache = model.hidden_unrolled(s.last_b[:, None], pos_b1, layer_params=layer_params,
                                                  cache=s.cache, mask_bts=mask_b1s)
        return _emit(s.replace(cache=cache), model.logits(hidden_b1d)[:, 0], stop_ids, params, pad_id, mode)

    return jax.lax.while_loop(cond, body, s)


decode = jax.jit(
    _decode_impl, static_argnames=("graphdef", "mode", "end_step", "window"), donate_argnames=("s",)
)


def _grow_layer_impl(a, *, name: str, window: int):
    """One layer's cache buffer zero-extended to `window` slots (the new slots are still empty)."""
    TRACES["grow"] += 1
    axis = LAYER_CACHE_SEQUENCE_AXIS[name]
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, window - a.shape[axis])
    return constrain(jnp.pad(a, widths), LAYER_CACHE_LOGICAL_AXES[name])


grow_layer = jax.jit(_grow_layer_impl, static_argnames=("name", "window"))


def grow(s: SamplerState, *, window: int) -> SamplerState:
    """The state with its cache zero-extended to `window` slots for the next phase; consumes `s` (like `decode`).

    Layer by layer, deleting each old buffer once its padded copy is dispatched (the runtime frees it when that copy
    has read it): only one layer's old and new buffers coexist, not the whole old and new cache (donation cannot
    help here, a larger output cannot reuse a smaller input buffer).
    """
    return s.replace(cache=replace_layers(s.cache, lambda a, name: grow_layer(a, name=name, window=window)))


def replace_layers(cache: dict, fn) -> dict:
    """A per-layer cache with each layer's k and v buffer replaced by `fn(buffer, name)`, one at a time, deleting
    each old buffer once its replacement is dispatched."""
    cache = dict(cache)
    for name in ("k", "v"):
        new = []
        for a in cache[name]:
            new.append(fn(a, name))
            a.delete()
        cache[name] = tuple(new)
    return cache

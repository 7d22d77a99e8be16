"""Decoder-only transformer (Qwen2/2.5, Qwen3 dense, Llama 3) in Flax NNX.

Layer weights are stacked on a leading `layers` axis and the forward runs `lax.scan` over them, so compile time
does not grow with depth and the stacked KV cache `[l, b, s, k, x]` is updated in place. The sampler's decode loop
instead uses `hidden_unrolled`: the same `decoder_layer` unrolled over per-layer weights sliced once per generate
call and a per-layer cache (`LAYER_CACHE_LAYOUT`), because scanning stacked arrays copies every layer's weights and
cache slice (and transposes the cache for attention) on every step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lad_jax.models.attention import SlotMask, causal_mask, dense_attention, make_attend
from lad_jax.models.cache import LAYER_CACHE_LAYOUT
from lad_jax.models import lora
from lad_jax.models.config import ModelConfig, rope_inv_freq
from lad_jax.sharding import constrain

def _param(rngs: nnx.Rngs | None, init, shape, dtype, names) -> nnx.Param:
    value = init(rngs.params() if rngs is not None else None, shape, dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


# name -> (shape given config, logical axes, initializer); the stacked per-layer parameters.
def block_param_specs(c: ModelConfig) -> dict:
    L, D, H, K, X, F = c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = {
        "attn_norm": ((L, D), ("layers", "norm"), _ones),
        "wq": ((L, D, H, X), ("layers", "embed", "heads", "head_dim"), _normal),
        "wk": ((L, D, K, X), ("layers", "embed", "kv_heads", "head_dim"), _normal),
        "wv": ((L, D, K, X), ("layers", "embed", "kv_heads", "head_dim"), _normal),
        "wo": ((L, H, X, D), ("layers", "heads", "head_dim", "embed"), _normal),
        "mlp_norm": ((L, D), ("layers", "norm"), _ones),
        "w_gate": ((L, D, F), ("layers", "embed", "mlp"), _normal),
        "w_up": ((L, D, F), ("layers", "embed", "mlp"), _normal),
        "w_down": ((L, F, D), ("layers", "mlp", "embed"), _normal),
    }
    if c.qkv_bias:
        specs["bq"] = ((L, H, X), ("layers", "heads", "head_dim"), _zeros)
        specs["bk"] = ((L, K, X), ("layers", "kv_heads", "head_dim"), _zeros)
        specs["bv"] = ((L, K, X), ("layers", "kv_heads", "head_dim"), _zeros)
    if c.o_bias:
        specs["bo"] = ((L, D), ("layers", "norm"), _zeros)
    if c.qk_norm:
        specs["q_norm"] = ((L, X), ("layers", "head_dim"), _ones)
        specs["k_norm"] = ((L, X), ("layers", "head_dim"), _ones)
    return specs


def layer_param_specs(c: ModelConfig) -> dict:
    """Every stacked parameter of `Blocks`: the base weights and, with `c.lora`, their adapters."""
    base = block_param_specs(c)
    return {**base, **lora.quantized_specs(c.lora, base), **lora.param_specs(c.lora, base)}


def top_param_specs(c: ModelConfig) -> dict:
    specs = {
        "embed": ((c.vocab_size, c.hidden_size), ("vocab", "embed"), _normal),
        "final_norm": ((c.hidden_size,), ("norm",), _ones),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = ((c.hidden_size, c.vocab_size), ("embed", "vocab"), _normal)
    return specs


class Blocks(nnx.Module):
    """All decoder layers' weights, stacked on axis 0."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        for name, (shape, names, init) in layer_param_specs(config).items():
            dtype = lora.param_dtype(config.lora, name, config.jnp_param_dtype)
            setattr(self, name, _param(rngs, init, shape, dtype, names))


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(config: ModelConfig, positions_bt):
    """cos, sin `[b, t, x]` in float32 for the half-rotation layout used by HF Qwen2/Llama."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthx, cos_btx, sin_btx):
    half = x_bthx.shape[-1] // 2
    x = x_bthx.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_btx[:, :, None, :] + rotated * sin_btx[:, :, None, :]
    return out.astype(x_bthx.dtype)


def project(hidden_btd, w, tied: bool, dtype):
    """Output projection with float32 accumulation and result."""
    h = hidden_btd.astype(dtype)
    eq = "btd,vd->btv" if tied else "btd,dv->btv"
    out = jnp.einsum(eq, h, w.astype(dtype), preferred_element_type=jnp.float32)
    return constrain(out, ("batch", "sequence", "act_vocab"))


def decoder_layer(c: ModelConfig, x, p, cos, sin, attend, write_kv):
    """One pre-norm decoder block on `x` `[b, t, d]` with one layer's weights `p`.

    `write_kv(k_btkx, v_btkx) -> (k_all, v_all, new_kv)` stores the new keys/values in a cache and returns what
    attention reads; None attends over the current tokens only. `attend(q_bthx, k_all, v_all) -> o_bthx` is the
    attention kernel with its mask bound (`attention.make_attend`, or dense over the decode cache's layout).
    Returns (x, new_kv).
    """
    dt = c.jnp_dtype

    def proj(x, name, eq):
        return lora.project(x, p, name, eq, dt, c.lora)

    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
    q = proj(h, "wq", "btd,dhx->bthx")
    k = proj(h, "wk", "btd,dkx->btkx")
    v = proj(h, "wv", "btd,dkx->btkx")
    if c.qkv_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if c.qk_norm:
        q = rms_norm(q, p["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], c.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "sequence", "act_heads", "head_dim"))
    k_all, v_all, new_kv = (k, v, None) if write_kv is None else write_kv(k, v)
    o = attend(q, k_all, v_all)
    o = proj(o, "wo", "bthx,hxd->btd")
    if c.o_bias:
        o = o + p["bo"].astype(dt)
    x = constrain(x + o, ("batch", "sequence", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    gate = proj(h, "w_gate", "btd,df->btf")
    up = proj(h, "w_up", "btd,df->btf")
    act = constrain(jax.nn.silu(gate) * up, ("batch", "sequence", "act_mlp"))
    x = x + proj(act, "w_down", "btf,fd->btd")
    return constrain(x, ("batch", "sequence", "act_embed")), new_kv


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        for name, (shape, names, init) in top_param_specs(config).items():
            setattr(self, name, _param(rngs, init, shape, config.jnp_param_dtype, names))
        self.blocks = Blocks(config, rngs=rngs)

    def __call__(self, tokens_bt, positions_bt, *, cache=None, mask_bts=None, mask=None):
        hidden_btd, new_cache = self.hidden(tokens_bt, positions_bt, cache=cache, mask_bts=mask_bts, mask=mask)
        return self.logits(hidden_btd), new_cache

    def head_weight(self):
        """(output-projection weight, tied): `[v, d]` embedding if tied, else `[d, v]` lm_head."""
        if self.config.tie_word_embeddings:
            return self.embed[...], True
        return self.lm_head[...], False

    def logits(self, hidden_btd):
        """Final-normed hidden states -> float32 logits."""
        w, tied = self.head_weight()
        return project(hidden_btd, w, tied, self.config.jnp_dtype)

    def _inputs(self, tokens_bt, positions_bt):
        """Embedded tokens `[b, t, d]` and rope tables, shared by both layer paths."""
        x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.config.jnp_dtype)
        x = constrain(x, ("batch", "sequence", "act_embed"))
        return x, rope_tables(self.config, positions_bt)

    def hidden(self, tokens_bt, positions_bt, *, cache=None, mask_bts=None, mask: SlotMask | None = None):
        """Embed and run all layers; returns (final-normed hidden `[b, t, d]` in compute dtype, new cache).

        The mask is a `SlotMask` (`mask`; resolved to a kernel by `config.attention`) or an explicit bool
        `[b, t, s]` (`mask_bts`; always dense attention). Neither: causal over the cache's filled slots.
        """
        c = self.config
        dt = c.jnp_dtype
        b, t = tokens_bt.shape
        if mask_bts is not None and mask is not None:
            raise ValueError("Transformer.hidden: pass mask (SlotMask) or mask_bts, not both")
        if mask_bts is None and mask is None:
            mask = (causal_mask(b, t, t) if cache is None
                    else causal_mask(b, t, cache["k"].shape[2], cache["index"]))
        attend = make_attend(c.attention, mask if mask_bts is None else mask_bts)
        x, (cos, sin) = self._inputs(tokens_bt, positions_bt)
        params = {name: getattr(self.blocks, name)[...] for name in layer_param_specs(c)}

        def layer(x, p, kv):
            if kv is None:
                write = None
            else:
                def write(k, v):
                    k_cache, v_cache, index, l = kv
                    start = (l, 0, index, 0, 0)
                    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), start)
                    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), start)
                    k_all = jax.lax.dynamic_index_in_dim(k_cache, l, 0, keepdims=False).astype(dt)
                    v_all = jax.lax.dynamic_index_in_dim(v_cache, l, 0, keepdims=False).astype(dt)
                    return k_all, v_all, (k_cache, v_cache)
            return decoder_layer(c, x, p, cos, sin, attend, write)

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[c.remat], prevent_cse=False)

        if cache is None:
            def body(x, p):
                return layer(x, p, None)[0], None

            x, _ = jax.lax.scan(body, x, params)
            new_cache = None
        else:
            index = cache["index"]

            def body(carry, xs):
                x, k_cache, v_cache = carry
                p, l = xs
                x, (k_cache, v_cache) = layer(x, p, (k_cache, v_cache, index, l))
                return (x, k_cache, v_cache), None

            (x, k_cache, v_cache), _ = jax.lax.scan(
                body, (x, cache["k"], cache["v"]), (params, jnp.arange(c.num_layers, dtype=jnp.int32)))
            new_cache = {"k": k_cache, "v": v_cache, "index": (index + t).astype(jnp.int32)}
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        return x, new_cache

    def layer_params(self) -> tuple[dict, ...]:
        """Per-layer weight dicts sliced out of the stacked blocks (for `hidden_unrolled`; slice once per call)."""
        names = layer_param_specs(self.config)
        stacked = {name: getattr(self.blocks, name)[...] for name in names}
        return tuple({name: w[l] for name, w in stacked.items()} for l in range(self.config.num_layers))

    def hidden_unrolled(self, tokens_bt, positions_bt, *, layer_params, cache, mask_bts):
        """`hidden` for decoding: layers unrolled over `layer_params()` with a per-layer cache (`unstack_cache`).

        Same math as `hidden`, but no weight or cache slicing per call: inside a decode loop, `layer_params` are
        loop-invariant and each layer's cache buffer is updated in place and read where it lies.
        """
        c = self.config
        dt = c.jnp_dtype
        x, (cos, sin) = self._inputs(tokens_bt, positions_bt)
        index = cache["index"]
        # t = 1 per step: dense attention over the cache is already O(s)
        layout = (LAYER_CACHE_LAYOUT["k"], LAYER_CACHE_LAYOUT["v"])
        attend = lambda q, k_all, v_all: dense_attention(q, k_all, v_all, mask_bts, layout)  # noqa: E731
        new_k, new_v = [], []
        for p, k_cache, v_cache in zip(layer_params, cache["k"], cache["v"]):
            def write(k_btkx, v_btkx, k_cache=k_cache, v_cache=v_cache):
                k_cache = jax.lax.dynamic_update_slice(
                    k_cache, k_btkx.transpose(0, 2, 3, 1).astype(k_cache.dtype), (0, 0, 0, index))
                v_cache = jax.lax.dynamic_update_slice(
                    v_cache, v_btkx.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, index, 0))
                return k_cache.astype(dt), v_cache.astype(dt), (k_cache, v_cache)

            x, (k_cache, v_cache) = decoder_layer(c, x, p, cos, sin, attend, write)
            new_k.append(k_cache)
            new_v.append(v_cache)
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        t = tokens_bt.shape[1]
        return x, {"k": tuple(new_k), "v": tuple(new_v), "index": (index + t).astype(jnp.int32)}


def create_model(config: ModelConfig, *, seed: int = 0, mesh=None, rules: dict | None = None) -> Transformer:
    """Random-init model built under one jit; with a mesh, params are created already sharded
    (eval_shape -> shardings -> jit(init, out_shardings))."""
    from lad_jax.sharding import state_shardings

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = None if mesh is None else state_shardings(abs_state, mesh, rules)

    def init():
        return nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)

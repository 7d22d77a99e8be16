"""KV cache: a plain dict pytree shared by the model, the sampler and the trainer."""
from __future__ import annotations

import jax.numpy as jnp

from lad_jax.models.config import DTYPES, ModelConfig


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=None) -> dict:
    """`{"k": [l, b, s, k, x], "v": [l, b, s, k, x], "index": int32[]}`, zero-filled, index 0.

    `dtype` defaults to the model's compute dtype.
    """
    if dtype is None:
        dtype = config.jnp_dtype
    elif isinstance(dtype, str):
        dtype = DTYPES[dtype]
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


CACHE_LOGICAL_AXES = {
    "k": ("layers", "batch", "cache_sequence", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "cache_sequence", "kv_heads", "head_dim"),
    "index": (),
}



def unstack_cache(cache: dict) -> dict:
    """Stacked cache -> per-layer decode cache `{"k": ([b, k, s, x],) * l, "v": (...), "index"}` for
    `Transformer.hidden_unrolled` (kv-head-major so single-token attention reads it without transposing)."""
    per_layer = lambda a: tuple(a[l].transpose(0, 2, 1, 3) for l in range(a.shape[0]))  # noqa: E731
    return {"k": per_layer(cache["k"]), "v": per_layer(cache["v"]), "index": cache["index"]}


def stack_cache(cache: dict) -> dict:
    """Per-layer decode cache (`unstack_cache`) -> the stacked `{"k": [l, b, s, k, x], ...}` form."""
    stack = lambda arrays: jnp.stack([a.transpose(0, 2, 1, 3) for a in arrays])  # noqa: E731
    return {"k": stack(cache["k"]), "v": stack(cache["v"]), "index": cache["index"]}


LAYER_CACHE_LOGICAL_AXES = ("batch", "kv_heads", "cache_sequence", "head_dim")

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



# Per-layer decode cache layouts: kv-head-major so single-token attention reads the cache where it lies; keys with
# the slot axis last, so the score product is a plain [g, x] @ [x, s] matmul (XLA:CPU runs the [s, x]-transposed
# form ~1.3x slower), values slot-major for the [g, s] @ [s, x] product.
LAYER_CACHE_LAYOUT = {"k": "bkxs", "v": "bksx"}
LAYER_CACHE_LOGICAL_AXES = {
    "k": ("batch", "kv_heads", "head_dim", "cache_sequence"),
    "v": ("batch", "kv_heads", "cache_sequence", "head_dim"),
}
LAYER_CACHE_SEQUENCE_AXIS = {"k": 3, "v": 2}
_FROM_STACKED = {"k": (0, 2, 3, 1), "v": (0, 2, 1, 3)}  # a [b, s, k, x] layer slice -> the decode layout
_TO_STACKED = {"k": (0, 3, 1, 2), "v": (0, 2, 1, 3)}


def unstack_cache(cache: dict) -> dict:
    """Stacked cache -> per-layer decode cache `{"k": ([b, k, x, s],) * l, "v": ([b, k, s, x],) * l, "index"}` for
    `Transformer.hidden_unrolled` (layouts: `LAYER_CACHE_LAYOUT`)."""
    def per_layer(name):
        a = cache[name]
        return tuple(a[l].transpose(_FROM_STACKED[name]) for l in range(a.shape[0]))

    return {"k": per_layer("k"), "v": per_layer("v"), "index": cache["index"]}


def stack_cache(cache: dict) -> dict:
    """Per-layer decode cache (`unstack_cache`) -> the stacked `{"k": [l, b, s, k, x], ...}` form."""
    def stack(name):
        return jnp.stack([a.transpose(_TO_STACKED[name]) for a in cache[name]])

    return {"k": stack("k"), "v": stack("v"), "index": cache["index"]}

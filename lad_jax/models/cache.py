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

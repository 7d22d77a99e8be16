"""Compiled peak memory of direct vs chunked token log-probs (forward and value_and_grad); prints JSON.

    python benchmarks/logprob_memory.py [--batch 8 --length 1024 --chunk 128 --remat none]

Nothing is executed or allocated: functions are lowered with abstract parameters and compiled for the default
backend, and XLA's `memory_analysis()` is read.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from lad_jax.models import ModelConfig, Transformer, logprobs_from_logits, token_logprobs

SMALL = dict(model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
             num_heads=8, num_kv_heads=4, head_dim=64, qkv_bias=True, tie_word_embeddings=False)


def _stats(compiled) -> dict:
    m = compiled.memory_analysis()
    temp, args, out = m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    return {"temp_mib": round(temp / 2**20, 1), "argument_mib": round(args / 2**20, 1),
            "output_mib": round(out / 2**20, 1), "peak_mib": round((temp + args + out - alias) / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()

    config = ModelConfig(**SMALL, remat=a.remat, dtype=a.dtype, param_dtype=a.dtype)
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    b, t = a.batch, a.length
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t, t), jnp.bool_)
    weights = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def logp(state, tok, pos, msk, chunked):
        model = nnx.merge(graphdef, state)
        targets = jnp.roll(tok, -1, axis=1)
        if chunked:
            return token_logprobs(model, tok, pos, msk, targets, chunk_size=a.chunk)
        logits, _ = model(tok, pos, mask_bts=msk)
        return logprobs_from_logits(logits, targets)

    def loss(state, tok, pos, msk, w, chunked):
        return jnp.sum(logp(state, tok, pos, msk, chunked) * w)

    results = {}
    for chunked in (False, True):
        name = f"chunked_{a.chunk}" if chunked else "direct"
        fwd = jax.jit(lambda s, x, q, m, c=chunked: logp(s, x, q, m, c))
        vg = jax.jit(lambda s, x, q, m, w, c=chunked: jax.value_and_grad(loss)(s, x, q, m, w, c))
        results[name] = {
            "forward": _stats(fwd.lower(abs_state, tokens, tokens, mask).compile()),
            "value_and_grad": _stats(vg.lower(abs_state, tokens, tokens, mask, weights).compile()),
        }
    print(json.dumps({
        "backend": jax.default_backend(),
        "config": {**SMALL, "remat": a.remat, "dtype": a.dtype},
        "batch": b, "length": t,
        "full_logits_f32_mib": round(b * t * config.vocab_size * 4 / 2**20, 1),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()

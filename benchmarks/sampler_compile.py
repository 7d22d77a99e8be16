"""Sampler compile time on a deep model: the decode's layers are unrolled, so compile time grows with depth.

    python benchmarks/sampler_compile.py                  # 28 layers (Qwen2.5-1.5B/7B depth), hidden 256, prints JSON

A random Qwen2-style model (`--layers`, hidden 256, 4 heads / 2 kv heads, vocab 32000, fp32) generates `--new-tokens`
for 8 prompts x 64 tokens with one decode window (`decode_phases=1`) and with the default 4 windows, greedy and at
temperature 1. Reported per setting: the first call (prefill + decode compiles where not yet compiled), a steady call,
and their difference (compile time). The prefill compiles once, in the first setting.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from lad_jax.models.config import ModelConfig
    from lad_jax.models.transformer import create_model
    from lad_jax.sampler import generate

    cfg = ModelConfig(model_type="qwen2", vocab_size=32000, hidden_size=256, intermediate_size=512,
                      num_layers=args.layers, num_heads=4, num_kv_heads=2, head_dim=64, qkv_bias=True,
                      max_position_embeddings=4096)
    model = create_model(cfg)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (8, 64)).tolist()
    result = {"layers": args.layers, "new_tokens": args.new_tokens, "settings": {}}
    for phases in (1, 4):
        for temperature in (0.0, 1.0):
            def call(seed):
                t = time.perf_counter()
                out = generate(model, prompts, max_new_tokens=args.new_tokens, temperature=temperature, seed=seed,
                               decode_phases=phases)
                jax.block_until_ready(out.tokens_bt)
                return time.perf_counter() - t

            first, steady = call(1), call(2)
            result["settings"][f"phases{phases}_temperature{temperature:g}"] = {
                "first_s": first, "steady_s": steady, "compile_s": first - steady}
    result["load_avg"] = os.getloadavg()
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

"""Long-sequence train step: compiled memory and step time of `model.attention` dense vs blockwise.

    python benchmarks/attention_long.py [--seq 4096] [--batch 1] [--steps 2] [--impls dense,blockwise]

Prints one JSON object. The model is benchmarks/train_step.py's "small" (hidden 512, 8 layers, 8 heads over 4 kv
heads, head dim 64, vocab 32000, fp32, random weights) with `max_position_embeddings` raised to the sequence; the
step is the real `TrainStep` (LAD loss, one micro-batch of `--batch` rows, remat none). Memory is XLA's compiled
`memory_analysis()` (temp = activations and scratch; peak ~ arguments + outputs + temp - aliases), time the median
of `--steps` steps after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import SMALL, make_batch  # noqa: E402

from lad_jax.config import load_config  # noqa: E402
from lad_jax.models import ModelConfig, create_model  # noqa: E402
from lad_jax.sharding import make_mesh  # noqa: E402
from lad_jax.train_setup import train_objects  # noqa: E402
from lad_jax.train_step import TrainStep, init_train_state  # noqa: E402

MIB = 1024 ** 2


def bench(impl: str, args, mesh) -> dict:
    model = create_model(ModelConfig(**{**SMALL, "max_position_embeddings": args.seq, "attention": impl}),
                         seed=0, mesh=mesh)
    overrides = ["algorithm.loss=lad", f"rollout.prompts_per_step={args.batch}", "rollout.num_samples=1",
                 f"algorithm.minibatch_size={args.batch}", f"algorithm.micro_batch_size={args.batch}",
                 "model.logprob_chunk_size=256", f"model.attention={impl}"]
    c = load_config("configs/tiny_test.yaml", overrides)
    graphdef, params, tx, schedule, shardings = train_objects(c, model, mesh)
    state = init_train_state(tx, params, shardings)
    step = TrainStep(c, graphdef, tx, schedule, mesh, shardings)
    batch = {k: jax.device_put(v, step.batch_shardings[k])
             for k, v in make_batch(args.batch, args.seq, args.seq // 4, SMALL["vocab_size"]).items()}
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    state, m = step(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return {"temp_mib": mem.temp_size_in_bytes / MIB, "peak_mib": peak / MIB,
            "argument_mib": mem.argument_size_in_bytes / MIB, "step_s": float(np.median(times)),
            "compile_s": compile_s, "loss": float(m["train/loss"])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--impls", default="dense,blockwise")
    args = p.parse_args()
    mesh = make_mesh(1, -1, 1)
    results = {impl: bench(impl, args, mesh) for impl in args.impls.split(",")}
    out = {"model": "small", "seq": args.seq, "batch": args.batch, "devices": jax.device_count(), **results}
    if "dense" in results and "blockwise" in results:
        out["blockwise_over_dense"] = {k: results["blockwise"][k] / results["dense"][k]
                                       for k in ("temp_mib", "peak_mib", "step_s")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

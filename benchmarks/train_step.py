"""Train-step benchmark: LAD-js vs GRPO tokens/s on the "small" model, peak memory, achieved vs attainable FLOP/s.

    python benchmarks/train_step.py [--batch 8] [--seq 256] [--steps 3] [--mesh 1,-1,1]

Prints one JSON object. "small" = hidden 512, 8 layers, 8 heads (4 kv, head dim 64), MLP 1536, vocab 32000, fp32,
random weights. Both losses run the same compiled-shape step (one jit each) on the same batch; tokens/s counts
every position of the [batch, seq] minibatch. Model FLOPs are counted analytically (6 x matmul params x tokens +
attention); attainable throughput is measured in the same process with a jitted chain of square fp32 matmuls.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lad_jax.config import load_config
from lad_jax.models import ModelConfig, create_model
from lad_jax.sharding import make_mesh
from lad_jax.train_setup import train_objects
from lad_jax.train_step import TrainStep, init_train_state

SMALL = dict(model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
             num_heads=8, num_kv_heads=4, head_dim=64, qkv_bias=True, tie_word_embeddings=False,
             max_position_embeddings=4096)


def matmul_flops_per_s(n: int = 1024, chain: int = 16, repeats: int = 3) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / np.sqrt(n)

    @jax.jit
    def f(x):
        return jax.lax.fori_loop(0, chain, lambda _, y: y @ a, x)

    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 * chain / best


def make_batch(rows: int, seq: int, prompt: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (1, rows, seq)).astype(np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (1, rows, seq)).copy()
    resp = np.broadcast_to(np.arange(seq) >= prompt, (1, rows, seq)).copy()
    return {"tokens_bt": tokens, "positions_bt": positions, "valid_bt": np.ones((1, rows, seq), bool),
            "response_bt": resp, "old_logp_bt": np.where(resp, -np.log(vocab) + 0.1 * rng.normal(size=resp.shape),
                                                         0).astype(np.float32),
            "advantages_b": rng.normal(size=(1, rows)).astype(np.float32)}


def bench(loss: str, args, mesh, model) -> dict:
    overrides = [f"algorithm.loss={loss}", f"rollout.prompts_per_step={args.batch}", "rollout.num_samples=1",
                 f"algorithm.minibatch_size={args.batch}", f"algorithm.micro_batch_size={args.batch}",
                 "model.logprob_chunk_size=256"]
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
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, m = step(state, batch)  # warm-up (same compiled shapes)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
    return {"loss": loss, "step_s": sec, "tokens_per_s": args.batch * args.seq / sec, "compile_s": compile_s,
            "xla_flops_per_step": float(cost.get("flops", float("nan"))) if cost else None,
            "peak_memory_bytes": peak, "temp_memory_bytes": getattr(mem, "temp_size_in_bytes", None),
            "compiles": step.compiles, "final_loss": float(m["train/loss"])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mesh", default="1,-1,1")
    args = p.parse_args()
    mesh = make_mesh(*[int(x) for x in args.mesh.split(",")])
    model = create_model(ModelConfig(**SMALL), seed=0, mesh=mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    attainable = matmul_flops_per_s()
    results = {loss: bench(loss, args, mesh, model) for loss in ("lad", "grpo")}
    # Model FLOPs: 6 x (matmul params: all but the embedding lookup table) x tokens, plus the attention score and
    # value matmuls (2 x 2 x b x t^2 x h x x per layer forward, x3 with backward). XLA's cost analysis counts a
    # lax.scan / lax.map body once, so it undercounts the layer scan; it is reported but not used.
    tokens = args.batch * args.seq
    matmul_params = n_params - SMALL["vocab_size"] * SMALL["hidden_size"]
    attention = 3 * 4 * SMALL["num_layers"] * args.batch * args.seq ** 2 * SMALL["num_heads"] * SMALL["head_dim"]
    analytic = 6.0 * matmul_params * tokens + attention
    for r in results.values():
        r["achieved_flops_per_s"] = analytic / r["step_s"]
        r["fraction_of_attainable"] = r["achieved_flops_per_s"] / attainable
    out = {"model": "small", "params": int(n_params), "devices": jax.device_count(), "batch": args.batch,
           "seq": args.seq, "tokens_per_step": args.batch * args.seq, "attainable_matmul_flops_per_s": attainable,
           "model_flops_per_step": analytic, "lad": results["lad"], "grpo": results["grpo"],
           "lad_over_grpo_step_time": results["lad"]["step_s"] / results["grpo"]["step_s"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

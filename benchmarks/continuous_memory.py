"""Continuous batching's decode programs on a TPU chip, from the real TPU compiler: memory and bytes accessed.

Compiles `generate_continuous`'s programs (`sampler_plan.compile_continuous`) for a recipe's model on a compile-only
TPU topology, one attention window (`--decode-phases 1`, so the phase attends over prompt bucket + max new tokens),
and beside them the static sampler's decode over as many rows as there are slots (`compile_rollout`), and prints one
JSON object per program: GiB of arguments / outputs / aliases / temporaries and the compiler's `cost_analysis`
bytes accessed (one trip through each loop body), plus the slot caches' own size. A phase whose temporaries are
about its slot caches' size holds a second copy of them (the compiler re-laid them out).

Needs libtpu (see tpu_compile_memory.py's docstring for the separate venv):
    PYTHONPATH=. /work/tpuvenv/bin/python benchmarks/continuous_memory.py        # Qwen2.5-1.5B, 32 slots, v5e-1
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is opened

from lad_jax import plan, sampler_plan  # noqa: E402
from lad_jax.config import load_config  # noqa: E402
from lad_jax.decode_memory import kv_bytes  # noqa: E402
from lad_jax.models.attention import target_platform  # noqa: E402
from lad_jax.sampling import Sampling  # noqa: E402
from lad_jax.sharding import make_mesh  # noqa: E402

GIB = 2 ** 30


def _row(compiled) -> dict:
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"argument_gib": m.argument_size_in_bytes / GIB, "output_gib": m.output_size_in_bytes / GIB,
            "alias_gib": m.alias_size_in_bytes / GIB, "temp_gib": m.temp_size_in_bytes / GIB,
            "bytes_accessed_gb": float(cost.get("bytes accessed", float("nan"))) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/qwen2.5-1.5b-instruct_gsm8k_lad_lora.yaml")
    ap.add_argument("--topology", default="v5e-1")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--prompt-bucket", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    args = ap.parse_args()

    c = load_config(args.config, [])
    devices = plan.topology_devices(args.topology)
    mesh = make_mesh(1, len(devices), 1, devices=devices)
    mc = plan.model_config(c)
    shapes = dict(prompt_bucket=args.prompt_bucket, max_new_tokens=args.max_new_tokens, decode_phases=1,
                  sampling=Sampling(temperature=1.0))
    window = args.prompt_bucket + args.max_new_tokens
    out = {"topology": args.topology, "model_layers": mc.num_layers, "slots": args.slots, "window": window,
           "slot_caches_gib": args.slots * kv_bytes(mc, cache_len=window, tensor=1) / len(devices) / GIB,
           "programs": {}}
    with target_platform("tpu"):
        for name, compiled in sampler_plan.compile_continuous(mc, mesh, prompts=args.prompts,
                                                              num_samples=args.num_samples,
                                                              decode_slots=args.slots, **shapes):
            if name.startswith(("start", "phase")):
                out["programs"][f"continuous_{name}"] = _row(compiled)
        static_prompts = max(1, args.slots // args.num_samples)
        for name, compiled in sampler_plan.compile_rollout(mc, mesh, prompts=static_prompts,
                                                           num_samples=args.num_samples, **shapes):
            if name.startswith("decode@"):
                out["programs"][f"static_{name}"] = _row(compiled)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

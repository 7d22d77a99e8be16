"""Per-chip memory of the 7B recipe's rollout (one `generate` call) on a TPU topology, from the real TPU compiler.

Compiles every phase `sampler.generate` runs for configs/qwen2.5-7b_dapo_lad.yaml's rollout (128 prompts x 8 samples,
prompt bucket 1024, 8192 new tokens, 4 decode windows 3072 / 5120 / 7168 / 9216, temperature 1) with
`lad_jax.sampler_plan.compile_rollout` on compile-only devices (default v5:2x4x4 = v5p-64, mesh data 1 x fsdp 8 x
tensor 4; Qwen2.5-7B's architecture from tpu_compile_memory.py, fp32 params, bf16 compute and cache) and prints one
JSON object, GiB per chip:
  phases         each compiled program's memory_analysis: argument / temp / output / alias and
                 peak = argument + temp + output - alias (its own live memory; donated inputs are aliased)
  growth         the cache growth into each window: it runs `grow_layer` once per layer and buffer, deleting each old
                 buffer after its padded copy, so at worst the grown state (decode@window's state argument), the
                 decode weights and the one old layer being copied (grow_layer's argument + temp) are live:
                 live_peak = state + weights + grow_layer argument + temp
  rollout_peak   max over the decode phases' peaks and the growth live peaks (the trainer's own state, e.g. the
                 optimizer's, is live beside it and not counted here)

Needs libtpu (see tpu_compile_memory.py's docstring for the separate venv):
    PYTHONPATH=. /work/tpuvenv/bin/python benchmarks/rollout_memory.py              # full 28 layers, minutes
    PYTHONPATH=. /work/tpuvenv/bin/python benchmarks/rollout_memory.py --layers 2   # quick check
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host backend for tracing; TPU devices come from the topology

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from lad_jax.config import load_config  # noqa: E402
from lad_jax.experience import prompt_bucket  # noqa: E402
from lad_jax.models import ModelConfig  # noqa: E402
from lad_jax.sampler_plan import compile_rollout  # noqa: E402
from lad_jax.sampling import Sampling  # noqa: E402
from tpu_compile_memory import GIB, QWEN25_7B, RECIPE, tpu_devices  # noqa: E402


def gib_per_device(tree) -> float:
    """Bytes one device holds of a pytree of abstract arrays (its shard of each), in GiB."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree)) / GIB


def analysis(compiled, secs) -> dict:
    m = compiled.memory_analysis()
    out = {k: round(getattr(m, f"{k}_size_in_bytes") / GIB, 3) for k in ("argument", "temp", "output", "alias")}
    out["peak"] = round(out["argument"] + out["temp"] + out["output"] - out["alias"], 3)
    out["compile_s"] = round(secs, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--topology", default="v5:2x4x4")
    ap.add_argument("--mesh", default="1,8,4", help="data,fsdp,tensor")
    ap.add_argument("--stop-ids", type=int, default=2, help="number of stop token ids (Qwen chat: eos + im_end)")
    args = ap.parse_args()

    devices = tpu_devices(args.topology)
    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    c = load_config(RECIPE, [])
    r = c.rollout
    cfg = ModelConfig(**{**QWEN25_7B, "num_layers": args.layers}, param_dtype=c.model.param_dtype,
                      dtype=c.model.dtype, remat=c.model.remat)
    result = {"topology": args.topology, "device_kind": devices[0].device_kind, "devices": len(devices),
              "mesh": dict(mesh.shape), "layers": args.layers, "rows": r.prompts_per_step * r.num_samples,
              "prompt_bucket": prompt_bucket(c), "max_new_tokens": r.max_new_tokens, "unit": "GiB per device",
              "phases": {}, "growth": {}}
    phases, grown = result["phases"], {}
    t0 = time.perf_counter()
    for name, compiled in compile_rollout(
            cfg, mesh, prompts=r.prompts_per_step, num_samples=r.num_samples, prompt_bucket=prompt_bucket(c),
            max_new_tokens=r.max_new_tokens, sampling=Sampling(temperature=r.temperature, top_k=r.top_k,
                                                                top_p=r.top_p), num_stop_ids=args.stop_ids):
        phases[name] = analysis(compiled, time.perf_counter() - t0)
        print(f"# {name}: {phases[name]}", file=sys.stderr, flush=True)
        if name == "decode_weights":
            weights = gib_per_device(compiled.out_info)
        if name.startswith("grow_"):
            grown.setdefault(name.split("@")[1], []).append(phases[name])
        if name.startswith("decode@") and name.split("@")[1] in grown:
            state = gib_per_device(compiled.out_info)  # = the grown SamplerState it starts from (donated, same shapes)
            layer = max(p["argument"] + p["temp"] for p in grown[name.split("@")[1]])
            result["growth"][name.split("@")[1]] = {"state": round(state, 3), "weights": round(weights, 3),
                                                     "live_peak": round(state + weights + layer, 3)}
        t0 = time.perf_counter()
    result["decode_weights"] = round(weights, 3)
    result["rollout_peak"] = max([p["peak"] for n, p in phases.items() if n.startswith("decode@")]
                                 + [g["live_peak"] for g in result["growth"].values()])
    print(json.dumps(result))


if __name__ == "__main__":
    main()

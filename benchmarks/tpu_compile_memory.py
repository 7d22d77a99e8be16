"""Per-device memory of the 7B recipe's jitted train step on a TPU topology, from the real TPU compiler (no TPU).

Compiles `lad_jax.train_step.TrainStep` for Qwen2.5-7B (architecture built by hand, random-init shapes only) with
configs/qwen2.5-7b_dapo_lad.yaml's optimizer, loss and micro-batching, on compile-only devices of a TPU topology
(default v5:2x4x4 = v5p-64, 32 chips; mesh data 1 x fsdp 8 x tensor 4), twice:
  with_mesh     traced under `jax.set_mesh(mesh)` (`TrainStep.lower`), so the model's logical-axis activation
                constraints (`lad_jax.sharding.constrain`) take effect;
  without_mesh  `step._fn.lower(...)` outside any mesh context, where those constraints are no-ops.
Prints one JSON object: per-device GiB of arguments / temps / outputs / aliases and
peak ~ arguments + temps + outputs - aliases, plus compile seconds, for both.

Needs libtpu (the compiler only; no TPU). Install it into a separate venv, not the project's:
    python3 -m venv /tmp/tpuvenv
    /tmp/tpuvenv/bin/pip install jax==0.10.2 jaxlib==0.10.2 libtpu==0.0.42.1 flax==0.12.8 optax==0.2.8 pyyaml
    PYTHONPATH=. /tmp/tpuvenv/bin/python benchmarks/tpu_compile_memory.py --layers 2 --seq-len 2048
A full 28-layer compile takes minutes and several GB of host memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # host backend for tracing; TPU devices come from the topology

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from lad_jax.config import ATTENTION_IMPLS, load_config  # noqa: E402
from lad_jax.models import ModelConfig, Transformer  # noqa: E402
from lad_jax.train_setup import train_objects  # noqa: E402
from lad_jax.train_step import BATCH_KEYS, TrainStep  # noqa: E402

GIB = 1024 ** 3
RECIPE = "configs/qwen2.5-7b_dapo_lad.yaml"
QWEN25_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                 num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
                 tie_word_embeddings=False, qkv_bias=True, rms_norm_eps=1e-6)


def tpu_devices(topology: str):
    if importlib.util.find_spec("libtpu") is None:
        sys.exit("tpu_compile_memory.py: libtpu is not installed. Install it in a separate venv (see this file's "
                 "docstring): pip install libtpu==0.0.42.1 beside jax==0.10.2")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu", chip_config_name="megacore",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices


def abstract(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def measure(lower) -> dict:
    t0 = time.perf_counter()
    compiled = lower().compile()
    secs = time.perf_counter() - t0
    m = compiled.memory_analysis()
    out = {k: round(getattr(m, f"{k}_size_in_bytes") / GIB, 3)
           for k in ("argument", "temp", "output", "alias", "generated_code")}
    out["peak"] = round(out["argument"] + out["temp"] + out["output"] - out["alias"], 3)
    out["compile_s"] = round(secs, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seq-len", type=int, default=9216, help="t = prompt + response slots (recipe: 1024 + 8192)")
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default: the recipe's)")
    ap.add_argument("--topology", default="v5:2x4x4")
    ap.add_argument("--mesh", default="1,8,4", help="data,fsdp,tensor")
    ap.add_argument("--only", choices=("with_mesh", "without_mesh"), default=None)
    ap.add_argument("--attention", choices=ATTENTION_IMPLS, default=None,
                    help="model.attention (default: the recipe's); splash needs the mesh context: use --only with_mesh")
    ap.add_argument("--remat", default=None, help="model.remat (default: the recipe's)")
    args = ap.parse_args()

    devices = tpu_devices(args.topology)
    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    overrides = [] if args.micro_batch is None else [f"algorithm.micro_batch_size={args.micro_batch}"]
    overrides += [] if args.attention is None else [f"model.attention={args.attention}"]
    overrides += [] if args.remat is None else [f"model.remat={args.remat}"]
    c = load_config(RECIPE, overrides)  # init_from stays a name only: nothing is downloaded
    m = c.model
    cfg = ModelConfig(**{**QWEN25_7B, "num_layers": args.layers}, param_dtype=m.param_dtype, dtype=m.dtype,
                      remat=m.remat, attention=m.attention)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, tx, schedule, shardings = train_objects(c, model, mesh)

    abs_state = jax.tree.map(abstract, {"params": params,
                                        "opt_state": jax.eval_shape(tx.init, params),
                                        "step": jax.ShapeDtypeStruct((), jnp.int32)}, shardings)
    step = TrainStep(c, graphdef, tx, schedule, mesh, shardings)
    micro = c.algorithm.micro_batch_size
    n_micro = c.algorithm.minibatch_size // micro
    dtypes = {"tokens_bt": jnp.int32, "positions_bt": jnp.int32, "valid_bt": jnp.bool_, "response_bt": jnp.bool_,
              "old_logp_bt": jnp.float32, "advantages_b": jnp.float32}
    batch = {k: jax.ShapeDtypeStruct((n_micro, micro) if k == "advantages_b" else (n_micro, micro, args.seq_len),
                                     dtypes[k], sharding=step.batch_shardings[k]) for k in BATCH_KEYS}

    runs = {"with_mesh": lambda: step.lower(abs_state, batch),
            "without_mesh": lambda: step._fn.lower(abs_state, batch)}
    result = {"topology": args.topology, "device_kind": devices[0].device_kind, "devices": len(devices),
              "mesh": dict(mesh.shape), "layers": args.layers, "seq_len": args.seq_len, "micro_batch": micro,
              "n_micro": n_micro, "remat": m.remat, "attention": m.attention, "unit": "GiB per device"}
    for name, lower in runs.items():
        if args.only in (None, name):
            result[name] = measure(lower)
            print(f"# {name}: {result[name]}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

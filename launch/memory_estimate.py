"""Per-chip memory arithmetic for a trainer config on a given slice, before paying for the slice.

    python launch/memory_estimate.py --config configs/qwen2.5-7b_dapo_lad.yaml --chips 32 \
        --hf-config /path/to/Qwen2.5-7B/config.json [key.sub=value ...]

The architecture comes from the checkpoint's config.json (a file, a directory holding one, or with --hf-config
omitted, the config's `init_from` directory). Parameter shapes and their per-chip shards are exact: they come from
lad_jax's own model definition (abstract, nothing allocated) and the sharding rules table. The training state is
params + grads + Adam m and v, all in model.param_dtype. The KV cache holds prompts_per_step * num_samples rows of
max_prompt_tokens + max_new_tokens slots in model.dtype. Activation terms are formulas for the attention
implementation in lad_jax.models.transformer (full score matrix per layer, no flash kernel): with remat the
per-layer inputs are kept for the backward pass and one layer's internals are live at a time.
Prints a table and, with --json, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _load_hf_config(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def _shard_elems(shape, names, mesh) -> int:
    from lad_jax.sharding import spec_for_shape

    spec = spec_for_shape(names, shape, mesh)
    elems = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            elems *= dim
            continue
        axes = (axes,) if isinstance(axes, str) else axes
        elems *= dim // math.prod(mesh.shape[a] for a in axes)
    return elems


def estimate(config, hf: dict, chips: int) -> dict:
    """All sizes in bytes; `*_per_chip` on the busiest chip of a (data, fsdp, tensor) mesh over `chips` chips."""
    import jax
    from flax import nnx

    from lad_jax.config import mesh_shape
    from lad_jax.models import ModelConfig, Transformer
    from lad_jax.models.cache import CACHE_LOGICAL_AXES
    from lad_jax.sharding import variable_names

    m = config.model
    mc = ModelConfig.from_hf_config(hf, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
    data, fsdp, tensor = mesh_shape(config, chips)
    mesh = jax.sharding.AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))
    abstract = nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0)))
    params = shard = 0
    for _, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        params += math.prod(var.shape)
        shard += _shard_elems(tuple(var.shape), variable_names(var), mesh)
    pbytes, abytes = DTYPE_BYTES[mc.param_dtype], DTYPE_BYTES[mc.dtype]

    r, a = config.rollout, config.algorithm
    rows = r.prompts_per_step * r.num_samples
    slots = config.data.max_prompt_tokens + r.max_new_tokens
    kv_shape = (mc.num_layers, rows, slots, mc.num_kv_heads, mc.head_dim)
    kv_total = 2 * math.prod(kv_shape) * abytes
    kv_chip = 2 * _shard_elems(kv_shape, CACHE_LOGICAL_AXES["k"], mesh) * abytes

    seqs = a.micro_batch_size / (data * fsdp)  # micro-batch rows per chip
    heads = mc.num_heads / tensor if mc.num_heads % tensor == 0 else mc.num_heads
    mlp = mc.intermediate_size / tensor if mc.intermediate_size % tensor == 0 else mc.intermediate_size
    saved = seqs * slots * mc.hidden_size * abytes * (mc.num_layers if mc.remat != "none" else 0)
    attention = seqs * heads * slots * slots * (4 + abytes + 4)  # fp32 scores, probs, fp32 score gradient
    mlp_act = seqs * slots * mlp * abytes * 4  # gate, up, activation, their gradient
    if mc.remat == "none":  # every layer's internals stay alive for the backward pass
        attention, mlp_act = attention * mc.num_layers, mlp_act * mc.num_layers
    state_chip = 4 * shard * pbytes
    return {
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "params": params,
        "param_bytes": params * pbytes,
        "train_state_bytes": 4 * params * pbytes,
        "train_state_bytes_bf16_params": params * (2 + 2 + 4 + 4),
        "train_state_per_chip": state_chip,
        "kv_bytes_per_token": 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * abytes,
        "kv_cache_rows": rows,
        "kv_cache_slots": slots,
        "kv_cache_bytes": kv_total,
        "kv_cache_per_chip": kv_chip,
        "micro_batch_rows_per_chip": seqs,
        "saved_layer_inputs_per_chip": saved,
        "attention_per_chip": attention,
        "mlp_activations_per_chip": mlp_act,
        "rollout_peak_per_chip": state_chip + kv_chip,
        "train_peak_per_chip": state_chip + saved + attention + mlp_act,
    }


def format_table(e: dict, chips: int) -> str:
    g = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    mesh = e["mesh"]
    return "\n".join([
        f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']} ({chips} chips)",
        f"parameters            {e['params'] / 1e9:.3f}e9 ({g(e['param_bytes'])})",
        f"train state total     {g(e['train_state_bytes'])} (params + grads + Adam m, v; bf16 params/grads: "
        f"{g(e['train_state_bytes_bf16_params'])})",
        f"train state per chip  {g(e['train_state_per_chip'])}",
        f"KV cache              {e['kv_bytes_per_token']} B/token x {e['kv_cache_rows']} rows x "
        f"{e['kv_cache_slots']} slots = {g(e['kv_cache_bytes'])}, per chip {g(e['kv_cache_per_chip'])}",
        f"train micro-batch     {e['micro_batch_rows_per_chip']:g} rows per chip: saved layer inputs "
        f"{g(e['saved_layer_inputs_per_chip'])}, attention {g(e['attention_per_chip'])}, MLP "
        f"{g(e['mlp_activations_per_chip'])}",
        f"peak per chip         rollout ~{g(e['rollout_peak_per_chip'])}, update ~{g(e['train_peak_per_chip'])}",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--chips", type=int, required=True, help="JAX devices in the slice (TPU chips or GPUs)")
    p.add_argument("--hf-config", help="config.json (or its directory); default: the config's init_from")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from lad_jax.config import load_config

    config = load_config(args.config, args.overrides)
    source = args.hf_config or config.init_from
    if source is None:
        p.error("the config has no init_from; pass --hf-config path/to/config.json")
    if not os.path.exists(source):
        p.error(f"{source!r} is not a local file or directory; download the checkpoint's config.json and pass "
                "--hf-config")
    e = estimate(config, _load_hf_config(source), args.chips)
    print(json.dumps(e) if args.json else format_table(e, args.chips))
    return 0


if __name__ == "__main__":
    sys.exit(main())

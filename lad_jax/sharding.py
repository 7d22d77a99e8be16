"""Mesh construction and the one logical-axis -> mesh-axis rules table.

Parameters carry logical axis names (metadata key `out_sharding` on their nnx.Variable, created with
`eager_sharding=False`); everything that needs a physical placement goes through `RULES` here.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "sequence": None,
    "cache_sequence": None,
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
    # activations: the model width of hidden states stays unsharded so fsdp only shards the batch.
    "act_embed": None,
    "act_vocab": "tensor",
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
}


def _without(rules: dict, dropped: tuple[str, ...]) -> dict:
    """`rules` with the mesh axes in `dropped` removed from every target."""
    def drop(target):
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        kept = tuple(a for a in axes if a not in dropped)
        return None if not kept else kept[0] if len(kept) == 1 else kept
    return {name: drop(target) for name, target in rules.items()}


# The sampler's decode weights (`sampler_loop.decode_weights`): RULES without the data and fsdp axes, so every chip
# holds its tensor shard of each weight whole and a decode step gathers no parameters.
DECODE_WEIGHT_RULES = _without(RULES, ("data", "fsdp"))


def make_mesh(data: int = 1, fsdp: int | None = None, tensor: int = 1, *, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types; at most one size may be -1 (= fill the rest).

    `fsdp` left unset fills the remaining devices unless another axis is -1 (then it is 1).
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp is None:
        fsdp = 1 if -1 in (data, tensor) else -1
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fills = [k for k, v in sizes.items() if v == -1]
    if len(fills) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1 (fill); got {sizes}")
    for k, v in sizes.items():
        if v != -1 and v < 1:
            raise ValueError(f"make_mesh: {k}={v} must be >= 1 or -1 (fill)")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if fills:
        if len(devices) % fixed:
            raise ValueError(f"make_mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}")
        sizes[fills[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"make_mesh: data*fsdp*tensor={total} but {len(devices)} devices are available; "
                         "use -1 for one axis to fill the rest")
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)  # jax.make_mesh defaults to Explicit; our code shards via Auto
    try:
        # jax.make_mesh orders devices by the TPU's physical topology (a plain reshape on CPU/GPU); the checks above
        # stay ours because it silently drops surplus devices and has no -1 fill
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except Exception:  # TPU device subsets without a known physical layout, multi-slice device lists
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Iterable[str | None], mesh: Mesh | None = None, rules: dict | None = None) -> P:
    """PartitionSpec for logical axis names; mesh axes absent from `mesh` (or of size 1) are dropped."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in lad_jax.sharding.RULES")
        target = rules[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dim
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def spec_for_shape(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict | None = None) -> P:
    """Like logical_to_spec but leaves a dim replicated when its size is not divisible by its mesh axes."""
    spec = logical_to_spec(names, mesh, rules)
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fixed.append(None)
            continue
        n = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
        fixed.append(axes if dim % n == 0 else None)
    return P(*fixed)


def variable_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    return var.get_metadata().get("out_sharding")


def named_sharding(names, shape, mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    if names is None:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec_for_shape(names, shape, mesh, rules))


def state_shardings(state, mesh: Mesh, rules: dict | None = None):
    """NamedShardings for an nnx State (or any pytree of Variables / arrays with `out_sharding` metadata)."""
    def f(x):
        if isinstance(x, nnx.Variable):
            return x.replace(named_sharding(variable_names(x), x.shape, mesh, rules))
        return NamedSharding(mesh, P())
    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model: nnx.Module, mesh: Mesh, rules: dict | None = None, filter=nnx.Param):
    """NamedShardings for `nnx.state(model, filter)` from the parameters' logical names."""
    return state_shardings(nnx.state(model, filter), mesh, rules)


def shard_model(model: nnx.Module, mesh: Mesh, rules: dict | None = None) -> nnx.Module:
    """Move every parameter of `model` onto its NamedSharding in place and return the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def current_mesh():
    """The mesh set with `jax.set_mesh` / `with mesh:` (abstract), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def constrain(x: jax.Array, names: Sequence[str | None], rules: dict | None = None) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op without a mesh context."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(names, mesh, rules)
    fixed = []
    for dim, axes in zip(x.shape, spec):
        if axes is None:
            fixed.append(None)
            continue
        n = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
        fixed.append(axes if dim % n == 0 else None)
    return jax.lax.with_sharding_constraint(x, P(*fixed))

"""LoRA adapters on the stacked projection weights: y = x W + (alpha / r) (x A) B, W frozen, A and B trained.

Each adapted projection `name` (one of `PROJECTIONS`) gets two stacked parameters beside its weight in `Blocks`:
`lora_a_<name>` `[l, *in, r]` and `lora_b_<name>` `[l, r, *out]`, where `in`/`out` are the weight's input and output
dims (`wo` contracts two input dims, heads x head_dim). A starts uniform in +-1/sqrt(fan_in) (PEFT's default) and B at
zero, so the adapted model equals the base model at init. Adapters are float32 whatever the base's dtype: Adam
updates of a rank-r matrix need the precision and cost almost no memory.

The adapted forward runs the low-rank path (two thin matmuls) instead of materialising W + s A B, so the backward
never forms a full-size weight gradient; `merged_weight` folds the adapter into W for an HF export.

`quantize_base="int8"` (QLoRA-style) stores every frozen projection weight as int8 with a float32 scale per output
channel (`<name>_scale`, the weight's shape with its input dims reduced to 1: absmax over the input dims / 127).
Layers dequantize one weight at a time in the compute dtype, so the resident base is a quarter of float32's size.

Train state: `split_params` separates a model's pure-dict params into the trainable part (the adapters, or
everything without LoRA) and the frozen part (the base, or nothing); `merge_params` puts them back together.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_N_IN = {"wo": 2}  # input dims after the layers axis; every other projection contracts one (embed or mlp)
A_PREFIX, B_PREFIX = "lora_a_", "lora_b_"


QUANTIZE_BASE = ("none", "int8")
SCALE_SUFFIX = "_scale"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    quantize_base: str = "none"  # one of QUANTIZE_BASE

    @property
    def int8(self) -> bool:
        return self.quantize_base == "int8"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def resolve_targets(pattern: str) -> tuple[str, ...]:
    """The projections whose name fully matches the regex `pattern` (raises re.error for a bad regex)."""
    rx = re.compile(pattern)
    return tuple(name for name in PROJECTIONS if rx.fullmatch(name))


def is_adapter(name: str) -> bool:
    return name.startswith((A_PREFIX, B_PREFIX))


def _a_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _int8_init(key, shape, dtype):
    return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)


def _scale_init(key, shape, dtype):
    # uniform ints in [-127, 127] have std 127 / sqrt(3): this scale gives the 0.02 std of a float init
    return jnp.full(shape, 0.02 * math.sqrt(3.0) / 127.0, dtype)


def quantized_specs(spec: LoraSpec | None, base_specs: dict) -> dict:
    """With int8 quantization: the projection weights' specs with an int8 initializer, and their scales' specs."""
    if spec is None or not spec.int8:
        return {}
    out = {}
    for name in PROJECTIONS:
        shape, axes, _ = base_specs[name]
        k = 1 + _N_IN.get(name, 1)
        out[name] = (shape, axes, _int8_init)
        out[name + SCALE_SUFFIX] = (shape[:1] + (1,) * (k - 1) + shape[k:], axes[:1] + (None,) * (k - 1) + axes[k:],
                                    _scale_init)
    return out


def param_dtype(spec: LoraSpec | None, name: str, default):
    """The storage dtype of `Blocks` parameter `name`: float32 adapters and scales, int8 quantized weights."""
    if is_adapter(name) or name.endswith(SCALE_SUFFIX):
        return jnp.float32
    if spec is not None and spec.int8 and name in PROJECTIONS:
        return jnp.int8
    return default


def quantize_int8(w: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale) of a stacked float weight `[l, *in, *out]`, per output channel."""
    axes = tuple(range(1, 1 + _N_IN.get(name, 1)))
    amax = np.max(np.abs(w.astype(np.float32)), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def n_inputs(name: str) -> int:
    return _N_IN.get(name, 1)


def base_weight(p: dict, name: str, dt):
    """Projection `name`'s weight from one layer's (or the stack's) params in dtype `dt`, dequantized if int8."""
    w = p[name].astype(dt)
    return w * p[name + SCALE_SUFFIX].astype(dt) if name + SCALE_SUFFIX in p else w


def param_specs(spec: LoraSpec | None, base_specs: dict) -> dict:
    """name -> (shape, logical axes, initializer) of the adapters of `base_specs`' stacked projection weights."""
    if spec is None:
        return {}
    out = {}
    for name in spec.targets:
        shape, axes, _ = base_specs[name]
        k = 1 + _N_IN.get(name, 1)
        out[A_PREFIX + name] = (shape[:k] + (spec.rank,), axes[:k] + ("lora_rank",), _a_init(math.prod(shape[1:k])))
        out[B_PREFIX + name] = ((shape[0], spec.rank) + shape[k:], ("layers", "lora_rank") + axes[k:], _zeros)
    return out


def init_value(spec: LoraSpec, base_specs: dict, name: str, seed: int) -> np.ndarray:
    """Adapter `name`'s initial value as a host array: a pure function of (seed, name), the same on every host."""
    shape, _, init = param_specs(spec, base_specs)[name]
    key = jax.random.fold_in(jax.random.key(seed), sorted(param_specs(spec, base_specs)).index(name))
    return np.asarray(init(key, shape, jnp.float32))


def project(x, p: dict, name: str, eq: str, dt, spec: LoraSpec | None):
    """`einsum(eq, x, W)` for one layer's weights `p`, plus the low-rank update when `name` is adapted."""
    y = jnp.einsum(eq, x, base_weight(p, name, dt))
    if spec is None or name not in spec.targets:
        return y
    u = jnp.tensordot(x, p[A_PREFIX + name].astype(dt), axes=_N_IN.get(name, 1))  # [b, t, r]
    return y + jnp.tensordot(u * jnp.asarray(spec.scale, dt), p[B_PREFIX + name].astype(dt), axes=1)


def merged_weight(spec: LoraSpec, name: str, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stacked W + s A B (host arrays, computed in float32), in W's dtype."""
    delta = np.stack([np.tensordot(a[l].astype(np.float32), b[l].astype(np.float32), axes=1)
                      for l in range(w.shape[0])])
    return (w.astype(np.float32) + np.float32(spec.scale) * delta).astype(w.dtype)


def split_params(params: dict, lora: bool) -> tuple[dict, dict]:
    """(trainable, frozen) pure dicts: the adapters and the rest with LoRA; everything and {} without."""
    if not lora:
        return params, {}
    trainable, frozen = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            t, f = split_params(value, True)
            if t:
                trainable[key] = t
            if f:
                frozen[key] = f
        elif is_adapter(key):
            trainable[key] = value
        else:
            frozen[key] = value
    return trainable, frozen


def merge_params(frozen: dict, trainable: dict) -> dict:
    """The inverse of `split_params`: one pure dict holding both parts."""
    if not frozen:
        return trainable
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = merge_params(out[key], value) if isinstance(value, dict) and key in out else value
    return out

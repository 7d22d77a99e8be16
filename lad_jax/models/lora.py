"""LoRA adapters on the stacked projection weights: y = x W + (alpha / r) (x A) B, W frozen, A and B trained.

Each adapted projection `name` (one of `PROJECTIONS`) gets two stacked parameters beside its weight in `Blocks`:
`lora_a_<name>` `[l, *in, r]` and `lora_b_<name>` `[l, r, *out]`, where `in`/`out` are the weight's input and output
dims (`wo` contracts two input dims, heads x head_dim). A starts uniform in +-1/sqrt(fan_in) (PEFT's default) and B at
zero, so the adapted model equals the base model at init. Adapters are float32 whatever the base's dtype: Adam
updates of a rank-r matrix need the precision and cost almost no memory.

The adapted forward runs the low-rank path (two thin matmuls) instead of materialising W + s A B, so the backward
never forms a full-size weight gradient; `merged_weight` folds the adapter into W for an HF export.

`quantize_base` stores every frozen projection weight quantized, with float32 scales in `<name>_scale`:
- "int8": one scale per output channel (absmax over the input dims / 127; the scale has the weight's shape with its
  input dims reduced to 1);
- "nf4" (QLoRA's NormalFloat4): 4-bit codes (`uint4`) into the 16-value NF4 table, one absmax scale per block of 64
  along the weight's last input dim (the whole dim when 64 does not divide it).
Layers dequantize one layer's weight at a time in the compute dtype, so the resident base is a quarter (int8) or an
eighth (nf4, plus 1/16 for the scales) of float32's size.

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


QUANTIZE_BASE = ("none", "int8", "nf4")
SCALE_SUFFIX = "_scale"
NF4_BLOCK = 64
# the NF4 code book of QLoRA (Dettmers et al., 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
NF4_TABLE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                      0.7229568362236023, 1.0], np.float32)
_STORAGE = {"int8": jnp.int8, "nf4": jnp.uint4}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    quantize_base: str = "none"  # one of QUANTIZE_BASE

    @property
    def quantized(self) -> bool:
        return self.quantize_base != "none"

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


def _nf4_init(key, shape, dtype):
    return jax.random.randint(key, shape, 0, 16, jnp.int32).astype(dtype)


def _scale_init(std_of_codes: float):
    def init(key, shape, dtype):  # the 0.02 std of a float init
        return jnp.full(shape, 0.02 / std_of_codes, dtype)
    return init


def _block(n: int) -> int:
    return NF4_BLOCK if n % NF4_BLOCK == 0 else n


def scale_shape(kind: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale's shape for stacked weight `name` of `shape` `[l, *in, *out]`."""
    k = 1 + _N_IN.get(name, 1)
    if kind == "int8":
        return shape[:1] + (1,) * (k - 1) + shape[k:]
    a = k - 1  # nf4: blocks along the last input dim
    return shape[:a] + (shape[a] // _block(shape[a]),) + shape[a + 1:]


def quantized_specs(spec: LoraSpec | None, base_specs: dict) -> dict:
    """With a quantized base: the projection weights' specs with a code initializer, and their scales' specs."""
    if spec is None or not spec.quantized:
        return {}
    out = {}
    for name in PROJECTIONS:
        shape, axes, _ = base_specs[name]
        k = 1 + _N_IN.get(name, 1)
        if spec.quantize_base == "int8":
            out[name] = (shape, axes, _int8_init)
            scale_axes = axes[:1] + (None,) * (k - 1) + axes[k:]
            out[name + SCALE_SUFFIX] = (scale_shape("int8", name, shape), scale_axes,
                                        _scale_init(127.0 / math.sqrt(3.0)))
        else:
            out[name] = (shape, axes, _nf4_init)
            out[name + SCALE_SUFFIX] = (scale_shape("nf4", name, shape), axes, _scale_init(float(np.std(NF4_TABLE))))
    return out


def param_dtype(spec: LoraSpec | None, name: str, default):
    """The storage dtype of `Blocks` parameter `name`: float32 adapters and scales, int8 / uint4 quantized weights."""
    if is_adapter(name) or name.endswith(SCALE_SUFFIX):
        return jnp.float32
    if spec is not None and spec.quantized and name in PROJECTIONS:
        return _STORAGE[spec.quantize_base]
    return default


def quantize(w: np.ndarray, name: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, float32 scale) of a stacked float weight `[l, *in, *out]` (host arrays)."""
    w = w.astype(np.float32)
    k = 1 + _N_IN.get(name, 1)
    if kind == "int8":
        amax = np.max(np.abs(w), axis=tuple(range(1, k)), keepdims=True)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale
    a = k - 1
    nb = w.shape[a] // _block(w.shape[a])
    blocks = w.reshape(w.shape[:a] + (nb, w.shape[a] // nb) + w.shape[a + 1:])
    amax = np.max(np.abs(blocks), axis=a + 1, keepdims=True)
    scale = np.where(amax > 0, amax, 1.0).astype(np.float32)
    codes = np.argmin(np.abs((blocks / scale)[..., None] - NF4_TABLE), axis=-1).reshape(w.shape)
    return codes.astype(jnp.uint4), np.squeeze(scale, axis=a + 1)


def dequantize(codes, scale, name: str, dt, xp=jnp):
    """The float weight in dtype `dt` from `quantize`'s codes and scale; `codes` is one layer's `[*in, *out]` (xp=jnp,
    inside the model) or the stack's `[l, *in, *out]` (xp=np, for an export)."""
    stacked = xp is np
    if codes.dtype == jnp.int8:
        return codes.astype(dt) * scale.astype(dt)
    a = _N_IN.get(name, 1) - 1 + int(stacked)
    vals = xp.take(xp.asarray(NF4_TABLE).astype(dt), codes.astype(xp.int32))
    nb = scale.shape[a]
    vals = vals.reshape(codes.shape[:a] + (nb, codes.shape[a] // nb) + codes.shape[a + 1:])
    return (vals * xp.expand_dims(scale.astype(dt), a + 1)).reshape(codes.shape)


def n_inputs(name: str) -> int:
    return _N_IN.get(name, 1)


def base_weight(p: dict, name: str, dt):
    """Projection `name`'s weight from one layer's params in dtype `dt`, dequantized if the base is quantized."""
    if name + SCALE_SUFFIX in p:
        return dequantize(p[name], p[name + SCALE_SUFFIX], name, dt)
    return p[name].astype(dt)


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
    specs = param_specs(spec, base_specs)
    shape, _, init = specs[name]
    key = jax.random.fold_in(jax.random.key(seed), sorted(specs).index(name))
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

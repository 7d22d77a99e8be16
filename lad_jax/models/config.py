"""ModelConfig: the architecture of one decoder, read from (and written back to) an HF `config.json`.

The architecture is chosen from `model_type` and explicit config fields, never from the model's name.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from lad_jax.config_checks import ATTENTION_IMPLS  # one source of names
from lad_jax.models.lora import LoraSpec

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def _dtype_name(value: Any, field: str) -> str:
    if value is None:
        return "float32"
    name = jnp.dtype(value).name if not isinstance(value, str) else value
    if name not in DTYPES:
        raise ValueError(f"ModelConfig.{field}={value!r} is not supported; use one of {sorted(DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope_type in SUPPORTED_ROPE_TYPES; the factors are only read for "linear" / "llama3".
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    # LoRA adapters on the projections (`lad_jax.models.lora`); None = plain weights. Not part of config.json.
    lora: LoraSpec | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not supported; use one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} is not supported; use one of {ATTENTION_IMPLS}")
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype, "dtype"))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict, *, param_dtype="float32", dtype="float32", remat="none",
                       attention="auto") -> "ModelConfig":
        """Build from an HF `config.json` dict; raises ValueError for anything this decoder cannot run."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported by lad_jax.models; "
                f"supported: {SUPPORTED_MODEL_TYPES} (MoE and other architectures are not implemented)")
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if hf.get(key):
                raise ValueError(f"config.json has {key}={hf[key]}: mixture-of-experts models are not supported")
        n_layers = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"config.json layer_types={sorted(set(layer_types))}: only full attention is supported "
                "(sliding-window attention is not implemented)")
        if hf.get("use_sliding_window") and int(hf.get("max_window_layers", 0)) < n_layers:
            raise ValueError(
                "config.json use_sliding_window=true with max_window_layers < num_hidden_layers: "
                "sliding-window attention is not implemented; set use_sliding_window=false")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' is supported")
        if hf.get("mlp_bias"):
            raise ValueError("config.json mlp_bias=true is not supported")

        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        for k, v in legacy.items():
            rope.setdefault(k, v)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", "default") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"config.json rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")

        n_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // n_heads
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and never an o bias; Llama/Qwen3 put attention_bias on all four.
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            param_dtype=param_dtype,
            dtype=dtype,
            remat=remat,
            attention=attention,
        )

    def to_hf_config(self) -> dict:
        """An HF `config.json` dict that transformers loads into the equivalent model."""
        if self.model_type == "qwen2" and self.o_bias:
            raise ValueError("qwen2 has no o_proj bias in transformers; o_bias=True cannot be exported as qwen2")
        if self.model_type == "qwen2" and not self.qkv_bias:
            raise ValueError("qwen2 always has q/k/v biases in transformers; qkv_bias=False cannot be exported")
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(f"{self.model_type} ties all attention biases (attention_bias); got "
                             f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.rope_type != "default":
            hf["rope_scaling"] = dict(rope)
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.qkv_bias
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
            hf["sliding_window"] = None
            hf["max_window_layers"] = self.num_layers
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        return hf


def tiny_config(kind: str = "qwen2", **overrides) -> ModelConfig:
    """Small random-init configs for tests and CPU demos (GQA, non-default rope_theta, llama3 scaling)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512)
    if kind == "qwen2":
        base.update(model_type="qwen2", rope_theta=5000.0, qkv_bias=True, tie_word_embeddings=True)
    elif kind == "qwen3":
        base.update(model_type="qwen3", rope_theta=1_000_000.0, qk_norm=True, head_dim=24)
    elif kind == "llama":
        base.update(model_type="llama", rope_theta=500_000.0, rope_type="llama3", rope_factor=8.0,
                    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position_embeddings=64)
    else:
        raise ValueError(f"tiny_config kind={kind!r}; use one of {SUPPORTED_MODEL_TYPES}")
    base.update(overrides)
    return ModelConfig(**base)


def rope_inv_freq(config: ModelConfig):
    """Inverse rotary frequencies [head_dim // 2] (float32), incl. linear / llama3 scaling."""
    x = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, x, 2, dtype=jnp.float32) / x))
    if config.rope_type == "linear":
        inv = inv / config.rope_factor
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        old_len = config.rope_original_max_position_embeddings
        low_wavelen = old_len / config.rope_low_freq_factor
        high_wavelen = old_len / config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - config.rope_low_freq_factor) / (
            config.rope_high_freq_factor - config.rope_low_freq_factor)
        smoothed = (1 - smooth) / factor * scaled + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv

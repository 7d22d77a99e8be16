"""LoRA adapters written as a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`), which
`peft.PeftModel.from_pretrained(<transformers model of the base>, directory)` loads.

PEFT's `lora_A.weight` is `[r, in_features]` and `lora_B.weight` `[out_features, r]` with torch's Linear layout, so our
`A [*in, r]` is flattened and transposed, our `B [r, *out]` likewise; the flattening order of multi-dim inputs and
outputs (heads x head_dim) is the one `hf_io.param_mappings` uses for the base weights. The scaling is the same,
lora_alpha / r.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import safetensors.numpy

from lad_jax import distributed
from lad_jax.models import lora

HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


def adapter_tensors(model):
    """Yield (PEFT tensor name, float32 numpy array) for every adapter of `model`, one parameter gathered at a time."""
    spec = model.config.lora
    for name in spec.targets:
        a = distributed.to_host(getattr(model.blocks, lora.A_PREFIX + name)[...]).astype(np.float32)
        b = distributed.to_host(getattr(model.blocks, lora.B_PREFIX + name)[...]).astype(np.float32)
        prefix = "base_model.model.model.layers.{i}." + HF_MODULES[name]
        for i in range(a.shape[0]):
            yield f"{prefix.format(i=i)}.lora_A.weight", np.ascontiguousarray(a[i].reshape(-1, spec.rank).T)
            yield f"{prefix.format(i=i)}.lora_B.weight", np.ascontiguousarray(b[i].reshape(spec.rank, -1).T)


def save_peft_adapter(model, path: str | None, *, base_model_name_or_path: str | None = None) -> None:
    """Write `model`'s LoRA adapters as a PEFT adapter directory. Several processes: the gathers are collective, so
    every process calls this; only process 0 writes (`path` is ignored on the others)."""
    spec = model.config.lora
    if spec is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (model.lora.rank=0)")
    tensors = dict(adapter_tensors(model))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "target_modules": sorted(HF_MODULES[n].split(".")[-1] for n in spec.targets),
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "modules_to_save": None,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)

"""Hugging Face checkpoint I/O: `from_pretrained` (sharded from the first byte) and `save_pretrained`.

Each of our parameters is a fixed reshape + transpose of HF tensors (stacked over layers for block weights), so a
device's shard of a parameter is read straight from the safetensors file (the `safetensors` package's memory-mapped
`get_slice`) for just the index it owns.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from lad_jax import distributed
from lad_jax.models import lora
from lad_jax.models.config import DTYPES, ModelConfig
from lad_jax.models.transformer import Transformer, block_param_specs, top_param_specs


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Our tensor == transpose(reshape(hf_tensor, inter_shape), perm); `groups` lists which inter dims form each
    HF dim (in order)."""
    hf_name: str  # with "{i}" for the layer index in block weights
    inter_shape: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]


def param_mappings(c: ModelConfig) -> dict[str, Mapping]:
    D, H, K, X, F, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    lp = "model.layers.{i}."
    m = {
        "embed": Mapping("model.embed_tokens.weight", (V, D), ((0,), (1,)), (0, 1)),
        "final_norm": Mapping("model.norm.weight", (D,), ((0,),), (0,)),
        "attn_norm": Mapping(lp + "input_layernorm.weight", (D,), ((0,),), (0,)),
        "mlp_norm": Mapping(lp + "post_attention_layernorm.weight", (D,), ((0,),), (0,)),
        "wq": Mapping(lp + "self_attn.q_proj.weight", (H, X, D), ((0, 1), (2,)), (2, 0, 1)),
        "wk": Mapping(lp + "self_attn.k_proj.weight", (K, X, D), ((0, 1), (2,)), (2, 0, 1)),
        "wv": Mapping(lp + "self_attn.v_proj.weight", (K, X, D), ((0, 1), (2,)), (2, 0, 1)),
        "wo": Mapping(lp + "self_attn.o_proj.weight", (D, H, X), ((0,), (1, 2)), (1, 2, 0)),
        "bq": Mapping(lp + "self_attn.q_proj.bias", (H, X), ((0, 1),), (0, 1)),
        "bk": Mapping(lp + "self_attn.k_proj.bias", (K, X), ((0, 1),), (0, 1)),
        "bv": Mapping(lp + "self_attn.v_proj.bias", (K, X), ((0, 1),), (0, 1)),
        "bo": Mapping(lp + "self_attn.o_proj.bias", (D,), ((0,),), (0,)),
        "q_norm": Mapping(lp + "self_attn.q_norm.weight", (X,), ((0,),), (0,)),
        "k_norm": Mapping(lp + "self_attn.k_norm.weight", (X,), ((0,),), (0,)),
        "w_gate": Mapping(lp + "mlp.gate_proj.weight", (F, D), ((0,), (1,)), (1, 0)),
        "w_up": Mapping(lp + "mlp.up_proj.weight", (F, D), ((0,), (1,)), (1, 0)),
        "w_down": Mapping(lp + "mlp.down_proj.weight", (D, F), ((0,), (1,)), (1, 0)),
        "lm_head": Mapping("lm_head.weight", (V, D), ((0,), (1,)), (1, 0)),
    }
    names = set(top_param_specs(c)) | set(block_param_specs(c))
    return {k: v for k, v in m.items() if k in names}


class SafetensorsDir:
    """All tensors of a checkpoint directory (single file or sharded with `model.safetensors.index.json`), opened
    with `safetensors.safe_open` in numpy mode: bf16 comes back as ml_dtypes.bfloat16 and nothing touches an
    accelerator."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        self._slices = {}
        for name in files:
            handle = safetensors.safe_open(os.path.join(directory, name), framework="numpy")
            for key in handle.keys():
                self._slices[key] = handle.get_slice(key)

    def __contains__(self, name: str) -> bool:
        return name in self._slices

    def keys(self):
        return self._slices.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slices[name].get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` (plain start:stop slices, one per dim), reading only those bytes."""
        if name not in self._slices:
            raise KeyError(f"tensor {name!r} not found in the safetensors files of {self.directory}")
        shape = self.shape(name)
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
        if any(hi <= lo for lo, hi in bounds):
            # safetensors rejects empty slices; the dtype does not matter, the caller casts to the parameter dtype.
            return np.zeros([max(hi - lo, 0) for lo, hi in bounds], np.float32)
        return np.asarray(self._slices[name][tuple(slice(lo, hi) for lo, hi in bounds)])


def _hf_shape(mp: Mapping) -> tuple[int, ...]:
    return tuple(math.prod(mp.inter_shape[i] for i in g) for g in mp.groups)


def _read_slice(files: SafetensorsDir, hf_name: str, mp: Mapping, my_index: tuple[slice, ...],
                my_shape: tuple[int, ...]) -> np.ndarray:
    """Read only the part of HF tensor `hf_name` that becomes `ours[my_index]`."""
    inter = [slice(None)] * len(mp.inter_shape)
    for j, s in enumerate(my_index):
        inter[mp.perm[j]] = slice(*s.indices(my_shape[j])[:2])
    hf_index, post_shape, post_index = [], [], []
    for group in mp.groups:
        lead = inter[group[0]]
        inner = math.prod(mp.inter_shape[i] for i in group[1:])
        hf_index.append(slice(lead.start * inner, lead.stop * inner))
        post_shape.extend([lead.stop - lead.start] + [mp.inter_shape[i] for i in group[1:]])
        post_index.extend([slice(None)] + [inter[i] for i in group[1:]])
    out = files.read(hf_name, tuple(hf_index)).reshape(post_shape)[tuple(post_index)]
    return np.transpose(out, mp.perm)


def _index_tuple(index, ndim):
    index = tuple(index) if index is not None else ()
    return index + (slice(None),) * (ndim - len(index))


def _make_reader(files: SafetensorsDir, name: str, mp: Mapping, shape: tuple[int, ...], stacked: bool,
                 dtype) -> Callable:
    def read(index) -> np.ndarray:
        index = _index_tuple(index, len(shape))
        if not stacked:
            out = _read_slice(files, mp.hf_name, mp, index, shape)
        else:
            lo, hi = index[0].indices(shape[0])[:2]
            out = np.stack([_read_slice(files, mp.hf_name.format(i=i), mp, index[1:], shape[1:])
                            for i in range(lo, hi)])
        return out.astype(dtype)
    return read


def _quantized_reader(files: SafetensorsDir, name: str, mp: Mapping, config: ModelConfig, shared: dict) -> Callable:
    """Reader of a quantized projection (`wq`) or of its scale (`wq_scale`): reads the full input extent of the
    requested output channels (a channel's or block's scale needs its inputs), quantizes, then keeps the requested
    part. `shared` hands each quantized stack from the weight's read to its scale's (built right after it), so the
    safetensors bytes are read and quantized once."""
    weight = name.removesuffix(lora.SCALE_SUFFIX)
    shape, _, _ = block_param_specs(config)[weight]
    n_in = lora.n_inputs(weight)
    base = _make_reader(files, weight, mp, shape, True, np.float32)

    def read(index) -> np.ndarray:
        index = _index_tuple(index, len(shape))
        full = index[:1] + (slice(None),) * n_in + index[1 + n_in:]
        key = (weight,) + tuple(s.indices(n)[:2] for s, n in zip(full, shape))
        if name == weight:  # other shards of the same output channels may ask again: keep it for them
            if key not in shared:
                shared[key] = lora.quantize(base(full), weight, config.lora.quantize_base)
            q, _ = shared[key]
            return q[(slice(None),) + index[1:1 + n_in]]
        _, scale = shared.pop(key) if key in shared else lora.quantize(base(full), weight, config.lora.quantize_base)
        return scale[(slice(None),) + index[1:1 + n_in]]
    return read


def _resolve(path_or_repo_id: str) -> str:
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.exists(path_or_repo_id) or path_or_repo_id.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_repo_id!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    # snapshot_download honours HF_HUB_OFFLINE / the local cache.
    return snapshot_download(path_or_repo_id, allow_patterns=["*.json", "*.safetensors"])


def load_config(path_or_repo_id: str, **kwargs) -> ModelConfig:
    directory = _resolve(path_or_repo_id)
    with open(os.path.join(directory, "config.json")) as f:
        return ModelConfig.from_hf_config(json.load(f), **kwargs)


def from_pretrained(path_or_repo_id: str, *, dtype="float32", param_dtype="float32", mesh=None,
                    remat: str = "none", attention: str = "auto", rules: dict | None = None,
                    lora_spec: lora.LoraSpec | None = None, seed: int = 0) -> Transformer:
    """Load an HF Qwen2/Qwen3/Llama checkpoint (local dir or hub repo id) into a `Transformer`.

    With `mesh`, every parameter is built with `jax.make_array_from_callback` from its NamedSharding (per the
    logical-axis rules), so each device only ever receives its own shard. `lora_spec` adds LoRA adapters at their
    initial values (a function of `seed`) beside the loaded weights.
    """
    directory = _resolve(path_or_repo_id)
    with open(os.path.join(directory, "config.json")) as f:
        config = ModelConfig.from_hf_config(json.load(f), param_dtype=param_dtype, dtype=dtype, remat=remat,
                                            attention=attention).replace(lora=lora_spec)
    files = SafetensorsDir(directory)
    mappings = param_mappings(config)
    stacked_names = set(block_param_specs(config))
    np_dtype = np.dtype(DTYPES[config.param_dtype])

    needed = set()
    for name, mp in mappings.items():
        keys = [mp.hf_name.format(i=i) for i in range(config.num_layers)] if name in stacked_names else [mp.hf_name]
        missing = [k for k in keys if k not in files]
        if missing:
            raise ValueError(f"checkpoint {directory} is missing tensors {missing[:3]} required by config.json "
                             f"(model_type={config.model_type}, tie_word_embeddings={config.tie_word_embeddings})")
        want = _hf_shape(mp)
        for k in keys:
            if files.shape(k) != want:
                raise ValueError(f"tensor {k} has shape {files.shape(k)}, config.json implies {want}")
        needed.update(keys)
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [k for k in files.keys() if k not in needed and k not in ignorable and "rotary_emb" not in k]
    if unexpected:
        raise ValueError(f"checkpoint {directory} has tensors this model does not use: {sorted(unexpected)[:5]} "
                         "(unsupported architecture feature?)")

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    from lad_jax.sharding import named_sharding, variable_names

    quantized: dict = {}  # (weight, read extent) -> (codes, scale), from the weight's build to its scale's
    weight_name = lambda name: name.removesuffix(lora.SCALE_SUFFIX)  # noqa: E731

    def build(path, var):
        name = path[-1]
        shape = tuple(var.shape)
        if lora.is_adapter(name):
            init = lora.init_value(lora_spec, block_param_specs(config), name, seed)
            reader = lambda index: init if index is None else init[index]  # noqa: E731
        elif lora_spec is not None and lora_spec.quantized and weight_name(name) in lora.PROJECTIONS:
            reader = _quantized_reader(files, name, mappings[weight_name(name)], config, quantized)
        else:
            reader = _make_reader(files, name, mappings[name], shape, name in stacked_names, np_dtype)
        if mesh is None:
            value = jnp.asarray(reader(None))
        else:
            sharding = named_sharding(variable_names(var), shape, mesh, rules)
            value = jax.make_array_from_callback(shape, sharding, reader)
        return var.replace(value)

    state = jax.tree_util.tree_map_with_path(
        lambda p, v: build(tuple(getattr(k, "key", getattr(k, "name", k)) for k in p), v),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def hf_tensors(model: Transformer, dtype=None):
    """Yield (hf_name, numpy array) for every HF tensor of `model`, one parameter gathered at a time; LoRA adapters
    are merged into their weights."""
    config = model.config
    stacked_names = set(block_param_specs(config))
    for name, mp in param_mappings(config).items():
        value = distributed.to_host(getattr(model.blocks if name in stacked_names else model, name)[...])
        if config.lora is not None and config.lora.quantized and name in lora.PROJECTIONS:
            # a quantized LoRA base: exported dequantized, in the parameter dtype
            scale = distributed.to_host(getattr(model.blocks, name + lora.SCALE_SUFFIX)[...])
            value = lora.dequantize(value, scale, name, np.float32, xp=np)
            value = value.astype(np.dtype(DTYPES[config.param_dtype]))
        if config.lora is not None and name in config.lora.targets:
            a, b = (distributed.to_host(getattr(model.blocks, prefix + name)[...])
                    for prefix in (lora.A_PREFIX, lora.B_PREFIX))
            value = lora.merged_weight(config.lora, name, value, a, b)
        if dtype is not None:
            value = value.astype(dtype)
        inv = tuple(np.argsort(mp.perm))
        hf_shape = _hf_shape(mp)
        if name in stacked_names:
            for i in range(config.num_layers):
                yield mp.hf_name.format(i=i), np.transpose(value[i], inv).reshape(hf_shape)
        else:
            yield mp.hf_name, np.transpose(value, inv).reshape(hf_shape)


def save_pretrained(model: Transformer, path: str, *, max_shard_size="5GB", dtype=None) -> None:
    """Write HF `config.json` + safetensors (sharded with `model.safetensors.index.json` over max_shard_size).

    `dtype` (e.g. "bfloat16") converts on export; default keeps the parameter dtype. Parameters are gathered to
    this host one at a time. Several processes: the gathers are collective, so every process must call this; only
    process 0 writes (`path` is ignored on the others).
    """
    limit = _parse_size(max_shard_size)
    np_dtype = None if dtype is None else np.dtype(DTYPES[dtype] if isinstance(dtype, str) else dtype)
    if jax.process_index() != 0:
        for _ in hf_tensors(model, np_dtype):  # take part in every gather
            pass
        return
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.remove(os.path.join(path, old))
    # Stream: each shard is written as soon as it is full (temporary names; renamed once the count is known).
    written: list[tuple[str, list[str]]] = []
    current: dict[str, np.ndarray] = {}
    current_size = total = 0

    def flush():
        tmp = os.path.join(path, f".tmp-{len(written):05d}.safetensors")
        # "format": "pt" is what transformers expects in the header metadata of a torch-loadable checkpoint.
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in current.items()}, tmp,
                                    metadata={"format": "pt"})
        written.append((tmp, list(current)))

    for name, arr in hf_tensors(model, np_dtype):
        if current and current_size + arr.nbytes > limit:
            flush()
            current, current_size = {}, 0
        current[name] = arr
        current_size += arr.nbytes
        total += arr.nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for k, (tmp, names) in enumerate(written):
            fname = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, os.path.join(path, fname))
            weight_map.update({name: fname for name in names})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = model.config.to_hf_config()  # a merged export is a plain model: no adapter fields
    if np_dtype is not None:
        hf["torch_dtype"] = hf["dtype"] = np_dtype.name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)

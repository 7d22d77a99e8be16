"""configs/*.yaml: every config loads and validates, instantiates on the 8 fake CPU devices with a tiny model,
LAD / GRPO twins differ only in the algorithm, and the memory arithmetic in the recipe comments is what
launch/memory_estimate.py computes for the published architectures."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import jax
import pytest
from flax import nnx

from lad_jax import train_step as ts
from lad_jax.config import Config, check_devices, load_config
from lad_jax.experience import prompt_bucket
from lad_jax.models import ModelConfig, Transformer, init_cache, known_configs
from lad_jax.rewards import build_reward_fn
from lad_jax.sharding import make_mesh
from lad_jax.train_setup import reward_specs

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RECIPES = [p for p in CONFIGS if p.name not in ("default.yaml", "tiny_test.yaml")]

HF_CONFIGS = known_configs.HF_CONFIGS


def _memory_estimate():
    spec = importlib.util.spec_from_file_location("memory_estimate", REPO / "launch" / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_chips(text: str) -> int:
    """The slice size a recipe is sized for: the --chips of the memory_estimate command in its comment."""
    match = re.search(r"python launch/memory_estimate\.py --config \S+ --chips (\d+)", text)
    assert match, "the recipe comment must show its `python launch/memory_estimate.py --config ... --chips N` line"
    return int(match.group(1))


def tiny_overrides(config: Config) -> list[str]:
    """A tiny from-scratch qwen2 and a mesh for 8 devices that keeps the recipe's tensor-parallel degree."""
    tensor = config.mesh.tensor if config.mesh.tensor in (1, 2, 4, 8) else 1
    return ["init_from=null", "model.model_type=qwen2", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_layers=2", "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=8",
            "model.tokenizer=unused-tiny-tokenizer", "model.max_position_embeddings=64",
            "mesh.data=-1", f"mesh.fsdp={8 // tensor}", f"mesh.tensor={tensor}"]


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"qwen2.5-math-1.5b_dapo_lad.yaml", "qwen2.5-math-1.5b_dapo_grpo.yaml", "qwen2.5-7b_dapo_lad.yaml",
            "qwen2.5-7b_dapo_grpo.yaml", "deepseek-r1-distill-qwen-7b_deepcoder_lad.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(path)  # unknown keys, wrong types and bad combinations raise here
    if path in RECIPES:
        assert config.init_from in HF_CONFIGS, f"{path.name}: add its config.json architecture to HF_CONFIGS"
        # Device-dependent checks on the slice the recipe was sized for (the --chips in its comment).
        chips = recipe_chips(path.read_text())
        d, f, t = check_devices(config, chips)
        assert d * f * t == chips
        assert config.rollout.prompts_per_step == 128 and config.rollout.num_samples == 8
        assert config.optimizer.lr == 1e-6 and config.optimizer.warmup_steps == 10
        assert config.optimizer.weight_decay == 0.1 and config.optimizer.max_grad_norm == 1.0
        assert config.algorithm.minibatch_size == 32 * 8 and config.rollout.temperature == 1.0
        assert any(s.startswith("gs://") for s in config.data.train_files), "data paths are gs:// placeholders"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates_with_tiny_model(path):
    config = load_config(path, tiny_overrides(load_config(path)), num_devices=8)
    shape = check_devices(config, len(jax.devices()))
    mesh = make_mesh(*shape)
    m = config.model
    model_config = ModelConfig(model_type=m.model_type, vocab_size=128, hidden_size=m.hidden_size,
                               intermediate_size=m.intermediate_size, num_layers=m.num_layers,
                               num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                               max_position_embeddings=m.max_position_embeddings, qkv_bias=True,
                               tie_word_embeddings=m.tie_word_embeddings, param_dtype=m.param_dtype,
                               dtype=m.dtype, remat=m.remat)
    abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    params_sh = ts.param_shardings(state, mesh)
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    tx = ts.make_optimizer(config, ts.make_schedule(config))
    shardings = ts.train_state_shardings(tx, abstract_params, params_sh, mesh)
    specs = {str(s.spec) for s in jax.tree.leaves(shardings["params"])}
    if shape[2] > 1:
        assert any("tensor" in s for s in specs), specs
    if shape[1] > 1:
        assert any("fsdp" in s for s in specs), specs
    assert len(jax.tree.leaves(shardings["opt_state"])) >= 2 * len(jax.tree.leaves(abstract_params))
    build_reward_fn(reward_specs(config))  # every reward name resolves


def _differences(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for key in a.keys() | b.keys():
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("lad_path", [p for p in RECIPES if p.name.endswith("_lad.yaml")], ids=lambda p: p.name)
def test_lad_recipes_use_the_paper_settings(lad_path):
    lad = load_config(lad_path)
    assert (lad.algorithm.loss, lad.algorithm.divergence, lad.algorithm.eta) == ("lad", "js", 0.25)


@pytest.mark.parametrize("grpo_path", [p for p in RECIPES if p.name.endswith("_grpo.yaml")], ids=lambda p: p.name)
def test_grpo_baseline_is_the_same_run(grpo_path):
    grpo = load_config(grpo_path)
    lad = load_config(grpo_path.with_name(grpo_path.name.replace("_grpo.yaml", "_lad.yaml")))
    assert grpo.algorithm.loss == "grpo"
    allowed = {"run_name", "algorithm.loss", "algorithm.divergence", "algorithm.eta", "algorithm.clip_eps_low",
               "algorithm.clip_eps_high"}
    diff = _differences(lad.to_dict(), grpo.to_dict())
    assert "run_name" in diff and diff <= allowed, diff - allowed


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_memory_comment_matches_estimate(path):
    config = load_config(path)
    hf = HF_CONFIGS[config.init_from]
    text = path.read_text()
    chips = recipe_chips(text)
    # The prompt slots plus the response must fit the checkpoint's context.
    assert prompt_bucket(config) + config.rollout.max_new_tokens <= hf["max_position_embeddings"]
    if "Memory: as in the LAD file" in text:
        lad = load_config(path.with_name(path.name.replace("_grpo.yaml", "_lad.yaml")))
        assert _memory_estimate().estimate(config, hf, chips) == _memory_estimate().estimate(lad, hf, chips)
        return
    e = _memory_estimate().estimate(config, hf, chips)
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    expected = [
        f"{e['params'] / 1e9:.3f}e9 parameters",
        f"= {gb(e['train_state_bytes'])} -> {gb(e['train_state_per_chip'])} per chip",
        f"would be {gb(e['train_state_bytes_bf16_params'])}",
        f"{e['kv_bytes_per_token']:,} B per token",
        f"= {gb(e['kv_cache_bytes'])} -> {gb(e['kv_cache_per_chip'])} per chip",
        f"saved layer inputs {gb(e['saved_layer_inputs_per_chip'])}",
        f"{gb(e['attention_per_chip'])}",
        f"MLP activations {gb(e['mlp_activations_per_chip'])}",
        f"peak ~{e['rollout_peak_per_chip'] / 1e9:.1f} GB per chip in the rollout, "
        f"~{e['train_peak_per_chip'] / 1e9:.1f} GB in the update",
    ]
    flat = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    for snippet in expected:
        assert snippet in flat, f"{path.name}: memory comment should contain {snippet!r}"


def test_memory_estimate_is_exact_for_a_tiny_model():
    hf = {**_QWEN2, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
          "num_key_value_heads": 4, "vocab_size": 96, "max_position_embeddings": 128, "rope_theta": 10000.0,
          "tie_word_embeddings": False}
    overrides = ["rollout.prompts_per_step=4", "rollout.num_samples=2", "rollout.max_new_tokens=8",
                 "data.max_prompt_tokens=8", "algorithm.minibatch_size=8", "algorithm.micro_batch_size=8",
                 "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "model.dtype=bfloat16"]
    config = load_config(RECIPES[0], overrides)
    e = _memory_estimate().estimate(config, hf, 8)
    model_config = ModelConfig.from_hf_config(hf, dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert e["params"] == params and e["train_state_bytes"] == 16 * params
    cache = jax.eval_shape(lambda: init_cache(model_config, 8, 16))
    assert e["kv_cache_bytes"] == cache["k"].size * 2 * 2  # k and v, bf16
    assert e["kv_cache_per_chip"] == e["kv_cache_bytes"] / 8  # rows over fsdp 4, kv heads over tensor 2
    assert e["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    # Per-chip parameter shards: what the real 8-device mesh and the trainer's shardings give.
    mesh = make_mesh(1, 4, 2)
    _, state = nnx.split(abstract)
    shardings = ts.param_shardings(state, mesh)
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    shard_elems = sum(math.prod(sh.shard_shape(x.shape)) for sh, x in zip(jax.tree.leaves(shardings), leaves))
    assert shard_elems < params / 4  # most of the model is split 8 ways
    assert e["train_state_per_chip"] == 16 * shard_elems  # fp32 params, grads, Adam m and v


def test_memory_estimate_command_line(tmp_path, capsys):
    hf_path = tmp_path / "config.json"
    hf_path.write_text(json.dumps(HF_CONFIGS["Qwen/Qwen2.5-7B"]))
    module = _memory_estimate()
    recipe = str(REPO / "configs" / "qwen2.5-7b_dapo_lad.yaml")
    assert module.main(["--config", recipe, "--chips", "64", "--hf-config", str(tmp_path), "--json",
                        "mesh.fsdp=16", "algorithm.micro_batch_size=16"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["mesh"] == {"data": 1, "fsdp": 16, "tensor": 4} and e["micro_batch_rows_per_chip"] == 1
    assert module.main(["--config", recipe, "--chips", "32", "--hf-config", str(hf_path)]) == 0
    assert "peak per chip" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a hub id is not read over the network: the error says to pass --hf-config
        module.main(["--config", recipe, "--chips", "32"])
    assert "--hf-config" in capsys.readouterr().err

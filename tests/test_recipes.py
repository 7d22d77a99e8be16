"""configs/*.yaml: every config loads and validates, instantiates on the 8 fake CPU devices with a tiny model,
LAD / GRPO twins differ only in the algorithm, and the CPU memory plan recorded in each recipe's comment is what
`python -m lad_jax.plan` computes now (the TPU numbers beside it come from the same code on libtpu's compiler)."""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import jax
import pytest
from flax import nnx

from lad_jax import train_step as ts
from lad_jax.config import Config, check_devices, load_config
from lad_jax.experience import prompt_bucket
from lad_jax.models import ModelConfig, Transformer, known_configs
from lad_jax.rewards import build_reward_fn
from lad_jax.sharding import make_mesh
from lad_jax.train_setup import reward_specs

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
RECIPES = [p for p in CONFIGS if p.name not in ("default.yaml", "tiny_test.yaml")]
# The paper-scale runs (LAD.md's hyperparameters); the others are smaller demos (one-chip LoRA).
PAPER = [p for p in RECIPES if "_dapo_" in p.name or "_deepcoder_" in p.name]

HF_CONFIGS = known_configs.HF_CONFIGS


# The CPU check every recipe records and this file recomputes: the recipe's own model, dtypes, remat, attention and
# mesh degree at a tiny batch and context, so the train step compiles in seconds on 8 CPU devices.
CPU_CHECK = ("--devices 8 --phases train_step rollout.prompts_per_step=4 rollout.num_samples=2 "
             "rollout.max_new_tokens=16 data.max_prompt_tokens=16 algorithm.minibatch_size=8 "
             "algorithm.micro_batch_size=4 mesh.fsdp=4 mesh.tensor=2")


def plan_recipe(text: str) -> str:
    """The recipe whose plan this one uses: itself, or for a GRPO twin ("Memory: as in the LAD file") its LAD file."""
    return "lad" if "Memory: as in the LAD file" in text else "self"


def recipe_chips(path: Path) -> int:
    """The slice size a recipe is sized for: the chips of the --topology in its `python -m lad_jax.plan` line."""
    text = path.read_text()
    if plan_recipe(text) == "lad":
        path = path.with_name(path.name.replace("_grpo.yaml", "_lad.yaml"))
        text = path.read_text()
    match = re.search(rf"python -m lad_jax\.plan --config configs/{re.escape(path.name)} --topology (\S+)"
                      r"(?: --phases \S+)?$", text, re.M)
    assert match, f"{path.name}: the recipe comment must show its `python -m lad_jax.plan --topology NAME` line"
    from lad_jax.plan import TOPOLOGIES

    return math.prod(int(x) for x in TOPOLOGIES[match.group(1)][0].split(":")[1].split("x"))


def tiny_overrides(config: Config) -> list[str]:
    """A tiny from-scratch qwen2 and a mesh for 8 devices that keeps the recipe's tensor-parallel degree."""
    tensor = config.mesh.tensor if config.mesh.tensor in (1, 2, 4, 8) else 1
    return ["init_from=null", "model.model_type=qwen2", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_layers=2", "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=8",
            "model.tokenizer=unused-tiny-tokenizer", "model.max_position_embeddings=64",
            "mesh.data=-1", f"mesh.fsdp={8 // tensor}", f"mesh.tensor={tensor}"]


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"qwen2.5-1.5b-instruct_gsm8k_lad_lora.yaml", "qwen2.5-math-1.5b_dapo_lad.yaml",
            "qwen2.5-math-1.5b_dapo_grpo.yaml", "qwen2.5-7b_dapo_lad.yaml", "qwen2.5-7b_dapo_grpo.yaml", "deepseek-r1-distill-qwen-7b_deepcoder_lad.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    config = load_config(path)  # unknown keys, wrong types and bad combinations raise here
    if path in RECIPES:
        assert config.init_from in HF_CONFIGS, f"{path.name}: add its config.json architecture to HF_CONFIGS"
        # Device-dependent checks on the slice the recipe was sized for (the --chips in its comment).
        chips = recipe_chips(path)
        d, f, t = check_devices(config, chips)
        assert d * f * t == chips
    if path in PAPER:
        assert config.rollout.prompts_per_step == 128 and config.rollout.num_samples == 8
        assert config.optimizer.lr == 1e-6 and config.optimizer.warmup_steps == 10
        assert config.optimizer.weight_decay == 0.1 and config.optimizer.max_grad_norm == 1.0
        assert config.algorithm.minibatch_size == 32 * 8 and config.rollout.temperature == 1.0
        assert any(s.startswith("gs://") for s in config.data.train_files), "data paths are gs:// placeholders"
    elif path in RECIPES:  # a demo recipe reads its public data straight from the hub
        assert all(s.startswith("hf://datasets/") for s in config.data.train_files + config.data.eval_files)


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


@pytest.mark.parametrize("path", [p for p in RECIPES if plan_recipe(p.read_text()) == "self"],
                         ids=lambda p: p.name)
def test_recorded_cpu_plan_matches_a_fresh_one(path):
    """The recipe's recorded CPU plan is what lad_jax.plan computes now. Argument bytes (the train state and batch
    shards: shapes x shardings) must match exactly; temporaries within 10%, because XLA:CPU's fusion and buffer
    assignment may move a little between jaxlib releases (pyproject allows any 0.10.x) while every change that
    matters here (a dtype, the remat policy, the attention implementation, the micro-batch) moves them far more."""
    from lad_jax import plan

    config = load_config(path)
    hf = HF_CONFIGS[config.init_from]
    assert prompt_bucket(config) + config.rollout.max_new_tokens <= hf["max_position_embeddings"]
    text = path.read_text()
    line = f"python -m lad_jax.plan --config configs/{path.name} {CPU_CHECK}"
    assert line in " ".join(t.lstrip("# ").strip() for t in text.splitlines() if t.startswith("#")), \
        f"{path.name}: record the CPU check `{line}`"
    match = re.search(r"train_step arguments (\d+) B, temporaries (\d+) B", text)
    assert match, f"{path.name}: record the CPU check's `train_step arguments N B, temporaries N B`"
    words = CPU_CHECK.split()
    c = load_config(path, words[4:])
    report = plan.plan(c, jax.devices()[:8], groups=("train_step",))
    (step,) = report["phases"]
    assert step["argument_bytes"] == int(match.group(1))
    assert abs(step["temp_bytes"] - int(match.group(2))) <= 0.1 * int(match.group(2)), step

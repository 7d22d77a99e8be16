"""LoRA (`model.lora`): adapters at init leave the model unchanged, a train step moves only the adapters, the merged HF
export equals the adapted model, checkpoints hold only the adapters and a resumed run continues exactly, the plan
shows the optimizer state shrink, and bad settings fail at config load."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lad_jax.config import ConfigError, load_config
from lad_jax.models import create_model, from_pretrained, save_pretrained, tiny_config
from lad_jax.models.lora import LoraSpec, resolve_targets

ALL = resolve_targets("wq|wk|wv|wo|w_gate|w_up|w_down")
TOKENS = jnp.array([[3, 17, 5, 99, 42, 7, 8, 1], [9, 9, 2, 4, 200, 31, 6, 5]], jnp.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_adapter_at_init_is_the_base_and_merged_export_is_the_adapted_model(kind, tmp_path):
    base = create_model(tiny_config(kind), seed=0)
    save_pretrained(base, str(tmp_path / "base"))
    model = from_pretrained(str(tmp_path / "base"), lora_spec=LoraSpec(rank=4, alpha=8.0, targets=ALL), seed=1)
    base_logits, _ = base(TOKENS, POSITIONS)
    np.testing.assert_array_equal(np.asarray(model(TOKENS, POSITIONS)[0]), np.asarray(base_logits))  # B = 0

    for i, name in enumerate(ALL):  # a trained adapter: B moved away from zero
        var = getattr(model.blocks, "lora_b_" + name)
        var[...] = 0.05 * jax.random.normal(jax.random.key(i), var.shape)
    adapted, _ = model(TOKENS, POSITIONS)
    assert float(jnp.max(jnp.abs(adapted - base_logits))) > 0.05
    save_pretrained(model, str(tmp_path / "merged"))
    merged = from_pretrained(str(tmp_path / "merged"))  # a plain HF checkpoint: no adapter tensors in it
    assert merged.config.lora is None
    np.testing.assert_allclose(np.asarray(merged(TOKENS, POSITIONS)[0]), np.asarray(adapted), atol=1e-4)


def test_peft_adapter_export_loads_onto_the_transformers_model(tmp_path):
    torch = pytest.importorskip("torch")
    import peft
    import transformers

    from lad_jax.models.peft_export import save_peft_adapter

    save_pretrained(create_model(tiny_config("qwen2"), seed=0), str(tmp_path / "base"))
    model = from_pretrained(str(tmp_path / "base"), lora_spec=LoraSpec(rank=3, alpha=6.0, targets=ALL), seed=1)
    for i, name in enumerate(ALL):
        for prefix in ("lora_a_", "lora_b_"):
            var = getattr(model.blocks, prefix + name)
            var[...] = 0.1 * jax.random.normal(jax.random.key(10 + i), var.shape)
    save_peft_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    ours = np.asarray(model(TOKENS, POSITIONS)[0])
    assert np.max(np.abs(ours - np.asarray(create_model(tiny_config("qwen2"), seed=0)(TOKENS, POSITIONS)[0]))) > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_base_reads_sharded_and_exports_dequantized(kind, tmp_path):
    from lad_jax.models import lora
    from lad_jax.sharding import make_mesh

    base = create_model(tiny_config("qwen2"), seed=0)
    save_pretrained(base, str(tmp_path / "base"))
    spec = LoraSpec(rank=4, alpha=8.0, targets=resolve_targets("wq|wv"), quantize_base=kind)
    whole = from_pretrained(str(tmp_path / "base"), lora_spec=spec, seed=1)
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    sharded = from_pretrained(str(tmp_path / "base"), lora_spec=spec, seed=1, mesh=mesh)
    for name in ("wq", "wo", "w_down", "wq_scale", "wo_scale", "w_down_scale"):
        # each shard read alone computes its channels' (blocks') scales over the whole input extent
        np.testing.assert_array_equal(np.asarray(getattr(sharded.blocks, name)[...]),
                                      np.asarray(getattr(whole.blocks, name)[...]), err_msg=name)
    assert whole.blocks.wq.dtype == {"int8": jnp.int8, "nf4": jnp.uint4}[kind]
    assert whole.blocks.wo_scale.shape == {"int8": (2, 1, 1, 64), "nf4": (2, 4, 1, 64)}[kind]  # head_dim 16: 1 block
    assert whole.blocks.w_down_scale.shape == {"int8": (2, 1, 64), "nf4": (2, 2, 64)}[kind]  # 128 inputs: 2 blocks
    assert whole.embed.dtype == jnp.float32  # the embedding (and head) stay as they were
    w = np.asarray(base.blocks.w_up[...])
    deq = lora.dequantize(np.asarray(whole.blocks.w_up[...]), np.asarray(whole.blocks.w_up_scale[...]), "w_up",
                          np.float32, xp=np)
    # int8: half a step of absmax/127; nf4: half the widest gap of the code book (0.72 -> 1.0) times the block absmax
    step = 1 / 254 if kind == "int8" else 0.139
    assert 0 < np.max(np.abs(deq - w)) <= step * np.max(np.abs(w)) + 1e-7
    base_logits, _ = base(TOKENS, POSITIONS)
    quant_logits, _ = whole(TOKENS, POSITIONS)
    tol = 0.02 if kind == "int8" else 0.15
    assert 0 < float(jnp.max(jnp.abs(quant_logits - base_logits))) < tol * float(jnp.max(jnp.abs(base_logits)))
    save_pretrained(whole, str(tmp_path / "merged"))
    merged = from_pretrained(str(tmp_path / "merged"))
    assert merged.blocks.wq.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(merged(TOKENS, POSITIONS)[0]), np.asarray(quant_logits), atol=1e-5)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_sampler_draws_from_the_adapted_model(quantize):
    """The sampler's behaviour log-probs (decode path, per-layer weights) equal the training forward's with the
    adapters (and the dequantized base), and differ from the base model's."""
    from test_sampler import _training_logprobs

    from lad_jax.sampler import generate

    spec = LoraSpec(rank=4, alpha=8.0, targets=ALL, quantize_base=quantize)
    model = create_model(tiny_config("qwen2", lora=spec), seed=0)
    for i, name in enumerate(ALL):
        var = getattr(model.blocks, "lora_b_" + name)
        var[...] = 0.1 * jax.random.normal(jax.random.key(20 + i), var.shape)
    prompts = [[5, 9, 2, 7], [11, 3]]
    out = generate(model, prompts, num_samples=2, max_new_tokens=12, temperature=1.0, seed=3, pad_id=0)
    mask = np.asarray(out.mask_bt)
    ref = _training_logprobs(model, out, 1.0)
    np.testing.assert_allclose(np.asarray(out.logprobs_bt)[mask], ref[mask], atol=1e-4)
    for name in ALL:  # the same weights without the adapters
        var = getattr(model.blocks, "lora_b_" + name)
        var[...] = jnp.zeros(var.shape)
    assert np.max(np.abs(_training_logprobs(model, out, 1.0)[mask] - ref[mask])) > 1e-2


def test_only_the_targets_get_adapters():
    model = create_model(tiny_config("qwen2", lora=LoraSpec(rank=2, alpha=4.0, targets=resolve_targets("wq|wv"))))
    names = set(nnx.to_pure_dict(nnx.state(model))["blocks"])
    assert {n for n in names if n.startswith("lora_")} == {"lora_a_wq", "lora_b_wq", "lora_a_wv", "lora_b_wv"}
    assert model.blocks.lora_a_wq.shape == (2, 64, 2) and model.blocks.lora_b_wq.shape == (2, 2, 4, 16)
    assert model.blocks.lora_a_wq.dtype == jnp.float32


@pytest.mark.parametrize("quantize", ["none", "int8", "nf4"])
def test_train_step_moves_only_the_adapters(quantize):
    from test_train_step import ROWS, _batch, _config, _model_config

    from lad_jax.sharding import make_mesh
    from lad_jax.train_setup import train_objects
    from lad_jax.train_step import TrainStep, full_params, init_train_state

    config = _config("model.lora.rank=4", "model.lora.targets=wq|wo|w_down", f"model.lora.quantize_base={quantize}")
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    spec = LoraSpec(4, 16.0, resolve_targets("wq|wo|w_down"), quantize_base=quantize)
    model = create_model(_model_config().replace(lora=spec), mesh=mesh)
    graphdef, params, tx, schedule, shardings = train_objects(config, model, mesh)
    state = init_train_state(tx, params, shardings)
    assert set(state["params"]["blocks"]) == {f"lora_{ab}_{n}" for ab in "ab" for n in ("wq", "wo", "w_down")}
    assert "lora_a_wq" not in state["frozen"]["blocks"] and "wq" in state["frozen"]["blocks"]
    assert state["frozen"]["blocks"]["w_up"].dtype == {"none": jnp.float32, "int8": jnp.int8, "nf4": jnp.uint4}[quantize]
    adapter_size = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * adapter_size + 8  # Adam mu, nu, counts
    before = jax.device_get(full_params(state))
    step = TrainStep(config, graphdef, tx, schedule, mesh, shardings)
    b = _batch(0)
    mb = {k: jax.device_put(v.reshape((2, ROWS // 2) + v.shape[1:]), step.batch_shardings[k]) for k, v in b.items()}
    for _ in range(2):
        state, metrics = step(state, mb)
    after = jax.device_get(full_params(state))
    assert float(metrics["train/grad_norm"]) > 0
    for path, old in jax.tree_util.tree_leaves_with_path(before):
        name = path[-1].key
        new = after["blocks"][name] if len(path) == 2 else after[name]
        if name.startswith("lora_"):
            assert not np.array_equal(new, old), name  # A moves from the second step on, B from the first
        else:
            np.testing.assert_array_equal(new, old, err_msg=name)
    assert step.compiles == 1


def _final_adapters(trainer):
    return jax.device_get(trainer.state["params"])


def test_trainer_checkpoints_adapters_only_resumes_exactly_and_exports_merged(tmp_path):
    from lad_jax import evaluate
    from lad_jax.tasks import numbers
    from lad_jax.trainer import Trainer

    common = ["model.lora.rank=4", "model.lora.alpha=8", "checkpoint.every=2", "checkpoint.keep=3",
              "optimizer.lr=1e-2"]
    quiet = dict(log=lambda *a, **k: None)
    whole = Trainer(load_config("configs/tiny_test.yaml", [f"output_dir={tmp_path}", "run_name=whole", "steps=3",
                                                            "checkpoint.export_hf=true", *common]), **quiet)
    whole.run()
    # A run killed after step 2: the whole run's step-2 checkpoint in a fresh run directory, resumed to step 3.
    split = load_config("configs/tiny_test.yaml", [f"output_dir={tmp_path}", "run_name=split", "steps=3", *common])
    shutil.copytree(os.path.join(whole.c.checkpoint_dir, "2"), os.path.join(split.checkpoint_dir, "2"))
    lines = []
    resumed = Trainer(split, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    resumed.run()
    assert any(f"resumed from {split.checkpoint_dir} at step 2" in line for line in lines), lines
    assert int(resumed.state["step"]) == int(whole.state["step"])
    jax.tree.map(np.testing.assert_array_equal, _final_adapters(resumed), _final_adapters(whole))
    assert float(jnp.max(jnp.abs(whole.state["params"]["blocks"]["lora_b_wq"]))) > 0  # training moved them

    meta = json.loads(open(os.path.join(split.checkpoint_dir, "2", "state", "_METADATA")).read())
    param_keys = [k for k in meta["tree_metadata"] if k.startswith("('params'")]
    assert param_keys and all("'lora_" in k for k in param_keys), param_keys  # no base weight in the checkpoint
    assert not any(k.startswith("('frozen'") for k in meta["tree_metadata"])

    assert os.path.isfile(os.path.join(whole.c.run_dir, "peft_adapter", "adapter_model.safetensors"))
    export = os.path.join(whole.c.run_dir, "hf_export")
    merged, _ = from_pretrained(export)(TOKENS % 16, POSITIONS)
    adapted, _ = whole.policy()(TOKENS % 16, POSITIONS)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=1e-4)

    # lad_jax.evaluate on the LoRA checkpoint rebuilds the base and restores the adapters: the trained policy.
    _, eval_file = numbers.write_data(str(tmp_path / "data"), num_train=4, num_eval=6, seed=0)
    out = evaluate.main(["--checkpoint", whole.c.run_dir, "--data", eval_file, "--k", "2", "--max_prompts", "6",
                         "--out", str(tmp_path / "ev.json")])
    assert out["source"]["step"] == 3
    tok = whole.s.tokenizer
    from lad_jax.data import load_rows
    rows, _ = load_rows(eval_file, prompt_field="prompt", answer_field="answer")
    direct, _ = evaluate.evaluate_policy(
        whole.policy(), tok, rows, numbers.reward_fn, num_samples=2, max_new_tokens=whole.c.rollout.max_new_tokens,
        temperature=whole.c.eval.temperature, seed=whole.c.seed + 1, stop_token_ids=(tok.eos_token_id,),
        pad_id=tok.pad_token_id, ngram=whole.c.eval.ngram, mesh=whole.s.mesh)
    assert out["metrics"] == direct


def test_plan_shows_the_optimizer_state_shrink():
    from lad_jax import plan

    base = ["rollout.max_new_tokens=8", "model.max_position_embeddings=32", "data.max_prompt_tokens=8"]
    full = plan.plan(load_config("configs/tiny_test.yaml", base), jax.devices()[:2], groups=())  # sizes only
    lora = plan.plan(load_config("configs/tiny_test.yaml", [*base, "model.lora.rank=2"]), jax.devices()[:2],
                     groups=("train_step",))
    assert lora["optimizer_state_bytes"] * 4 < full["optimizer_state_bytes"]
    assert lora["phases"][0]["name"] == "train_step" and lora["phases"][0]["argument_bytes"] > 0
    assert "optimizer" in plan.format_report(lora)


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", "model.lora.rank=-1 must be >= 0"),
    ("model.lora.dropout=0.1", "model.lora.dropout=0.1 is not supported"),
    ("model.lora.targets='w_(gate'", "model.lora.targets='w_(gate' is not a valid regex"),
    ("model.lora.targets=q_proj", "matches none of the projections"),
    ("model.lora.quantize_base=fp8", "model.lora.quantize_base='fp8' is not valid"),
    ("model.lora.alpha=0", "model.lora.alpha=0.0 must be > 0"),
])
def test_bad_lora_settings_fail_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("configs/tiny_test.yaml", ["model.lora.rank=4", override])


def test_lora_with_a_warm_start_is_refused():
    with pytest.raises(ConfigError, match="task.sft_steps=400"):
        load_config(None, ["model.lora.rank=8"])  # the default run warm-starts the base

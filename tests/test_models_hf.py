"""Parity with transformers (PyTorch) on random tiny checkpoints, HF round trips and sharded loading."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lad_jax.models import from_pretrained, save_pretrained, tiny_config  # noqa: E402
from lad_jax.sharding import make_mesh  # noqa: E402

CASES = {
    # tied, GQA, non-default rope_theta, q/k/v biases
    "qwen2_tied": tiny_config("qwen2", tie_word_embeddings=True),
    "qwen2_untied": tiny_config("qwen2", tie_word_embeddings=False, rope_theta=12345.0),
    # q/k RMSNorm, explicit head_dim != hidden/heads
    "qwen3": tiny_config("qwen3"),
    # llama3 rope scaling (original_max_position_embeddings small so every frequency band is exercised)
    "llama3": tiny_config("llama"),
}


def make_hf_checkpoint(config, directory, seed=0, torch_dtype=torch.float32):
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        # HF initialises biases to 0 and norms to 1: randomise everything so every weight is tested.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(torch_dtype).eval()
    model.save_pretrained(directory)
    return model


def batch(vocab, b=3, t=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t))
    attn = np.ones((b, t), bool)
    attn[1, :4] = False  # left padding
    attn[2, :1] = False
    positions = np.clip(np.cumsum(attn, axis=1) - 1, 0, None)
    return tokens, attn, positions


def hf_logits(model, tokens, attn, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(attn.astype(np.int64)),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def our_logits(model, tokens, attn, positions):
    t = tokens.shape[1]
    mask = np.tril(np.ones((t, t), bool))[None] & attn[:, None, :]
    logits, _ = nnx.jit(lambda m, a, b, c: m(a, b, mask_bts=c))(model, jnp.asarray(tokens), jnp.asarray(positions),
                                                                jnp.asarray(mask))
    return np.asarray(logits)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, cfg in CASES.items():
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (cfg, d, make_hf_checkpoint(cfg, d))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_hf_logits_parity_float32(checkpoints, name):
    cfg, d, hf = checkpoints[name]
    model = from_pretrained(d)
    assert model.config.model_type == cfg.model_type
    assert model.config.tie_word_embeddings == cfg.tie_word_embeddings
    tokens, attn, positions = batch(cfg.vocab_size)
    ref = hf_logits(hf, tokens, attn, positions)
    ours = our_logits(model, tokens, attn, positions)
    diff = np.abs(ref - ours)[attn].max()
    print(f"{name}: float32 max-abs-diff vs transformers = {diff:.3e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= 1e-4


def test_bf16_checkpoint_loads_and_runs(tmp_path):
    cfg = CASES["qwen2_untied"]
    make_hf_checkpoint(cfg, str(tmp_path), torch_dtype=torch.bfloat16)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    model = from_pretrained(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    assert model.blocks.wq[...].dtype == jnp.bfloat16
    # bf16 -> f32 is exact, so a float32 load of the bf16 file equals HF run in float32 on the same weights.
    model32 = from_pretrained(str(tmp_path))
    tokens, attn, positions = batch(cfg.vocab_size)
    # (reloaded rather than .float(): casting the bf16 module would keep bf16-rounded rotary buffers)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    ref = hf_logits(hf32, tokens, attn, positions)
    assert np.abs(ref - our_logits(model32, tokens, attn, positions))[attn].max() <= 1e-4
    ours16 = our_logits(model, tokens, attn, positions)
    assert ours16.dtype == np.float32 and np.isfinite(ours16).all()
    assert np.abs(ref - ours16)[attn].max() < 0.1 * np.abs(ref).max()


def test_save_pretrained_round_trip(checkpoints, tmp_path):
    for name in ("qwen2_tied", "llama3"):
        cfg, d, hf = checkpoints[name]
        model = from_pretrained(d)
        out = str(tmp_path / name)
        save_pretrained(model, out, max_shard_size=20_000)  # force several shards + index
        assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
        again = from_pretrained(out)
        a, b = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        hf_again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        tokens, attn, positions = batch(cfg.vocab_size, seed=1)
        np.testing.assert_array_equal(hf_logits(hf_again, tokens, attn, positions),
                                      hf_logits(hf, tokens, attn, positions))
        if cfg.tie_word_embeddings:
            assert "lm_head.weight" not in json.load(open(os.path.join(out, "model.safetensors.index.json")))[
                "weight_map"]


def test_sharded_load_matches_unsharded(checkpoints):
    cfg, d, _ = checkpoints["qwen2_untied"]
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    sharded = from_pretrained(d, mesh=mesh)
    plain = from_pretrained(d)
    wq = sharded.blocks.wq[...]
    assert len(wq.sharding.device_set) == 8
    for arr in (sharded.embed[...], sharded.lm_head[...], sharded.blocks.w_gate[...], wq):
        per_device = max(s.data.nbytes for s in arr.addressable_shards)
        assert per_device * 8 == arr.nbytes, (arr.shape, arr.sharding)
    tokens, attn, positions = batch(cfg.vocab_size, b=4)
    with jax.set_mesh(mesh):
        got = our_logits(sharded, tokens, attn, positions)
    np.testing.assert_allclose(got, our_logits(plain, tokens, attn, positions), atol=1e-5, rtol=0)

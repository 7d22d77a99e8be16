"""Memory-efficient attention (`model.attention`): blockwise (and splash in Pallas interpret mode) equal dense in
outputs and gradients; the choice is validated at start-up."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lad_jax.config import ConfigError, check_devices, load_config
from lad_jax.models import ModelConfig, Transformer, init_cache, tiny_config
from lad_jax.models.attention import (SlotMask, blockwise_attention, causal_mask, dense_attention,
                                      resolve_attention, splash_attention, target_platform)
from lad_jax.train_step import sequence_logprobs


def _qkv(b, t, s, h, kh, x, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)  # noqa: E731
    return f(b, t, h, x), f(b, s, kh, x), f(b, s, kh, x), f(b, t, h, x)


def _left_padded(b, s, lengths):
    return jnp.asarray(np.arange(s)[None, :] >= (s - np.asarray(lengths))[:, None])


def _assert_same_as_dense(kernel, q, k, v, w, mask: SlotMask, rows_bt=None, atol=1e-4):
    """kernel(q, k, v, mask) == dense_attention(q, k, v, mask.dense()): outputs and d/d(q, k, v) of <out, w>; with
    `rows_bt`, only those query rows are compared (and weighted)."""
    keep = (lambda o: o) if rows_bt is None else (lambda o: jnp.where(rows_bt[:, :, None, None], o, 0.0))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    dense = lambda q, k, v: keep(dense_attention(q, k, v, mask.dense()))  # noqa: E731
    other = lambda q, k, v: keep(kernel(q, k, v, mask))  # noqa: E731
    out_d, out_o = jax.jit(dense)(q, k, v), jax.jit(other)(q, k, v)
    np.testing.assert_allclose(np.asarray(out_o), np.asarray(out_d), atol=atol)
    g_d = jax.jit(jax.grad(loss(dense), (0, 1, 2)))(q, k, v)
    g_o = jax.jit(jax.grad(loss(other), (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_o, g_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("case", ["train_left_padded", "prefill_t_lt_s", "chunk_vs_longer_cache", "mha"])
def test_blockwise_equals_dense_outputs_and_grads(case):
    """Left-padded mixed lengths (with the train step's self-visible padding queries), a prefill into a longer cache
    (t < s, padding queries see nothing), a chunk at slot 40 of a 75-slot cache, GQA (h=4, k=2) and MHA; block 16
    never divides s, so the last block is padded."""
    b, h, kh, x = 3, 4, 2, 16
    if case == "train_left_padded":
        t = s = 45
        mask = causal_mask(b, t, s, 0, _left_padded(b, s, [45, 20, 3]), self_visible=True)
    elif case == "prefill_t_lt_s":
        t, s = 30, 75
        mask = causal_mask(b, t, s, 0, _left_padded(b, s, [30, 11, 1]) & (jnp.arange(s) < t))
    elif case == "chunk_vs_longer_cache":
        t, s = 17, 75
        valid = _left_padded(b, s, [75, 60, 40]) & (jnp.arange(s) < 40 + t)
        mask = causal_mask(b, t, s, jnp.int32(40), valid)
    else:
        t = s = 33
        kh = h
        mask = causal_mask(b, t, s, 0, _left_padded(b, s, [33, 9, 2]), self_visible=True)
    q, k, v, w = _qkv(b, t, s, h, kh, x)
    assert s % 16
    _assert_same_as_dense(lambda *a: blockwise_attention(*a, block=16), q, k, v, w, mask)


def test_splash_interpret_equals_dense():
    """The TPU splash kernel, run by the Pallas interpreter on CPU: causal + left padding as segment ids, GQA (h=4
    over k=2 heads), a prefill (t=128 into s=256 slots), t = s = 100 (padded to 128 inside), outputs and gradients;
    only real-token query rows are
    compared (splash lets a padding query see earlier padding keys; its output is never read)."""
    b, h, kh, x = 2, 4, 2, 32
    for t, s, lengths, self_visible in ((128, 128, [128, 50], True), (128, 256, [128, 7], False),
                                        (100, 100, [100, 30], True)):
        valid = jnp.asarray(np.arange(s)[None] >= (t - np.asarray(lengths))[:, None]) & (jnp.arange(s) < t)
        mask = causal_mask(b, t, s, 0, valid, self_visible=self_visible)
        q, k, v, w = _qkv(b, t, s, h, kh, x, seed=t + s)
        splash = lambda q, k, v, m: splash_attention(q, k, v, m, block=128, interpret=True)  # noqa: E731
        _assert_same_as_dense(splash, q, k, v, w, mask, rows_bt=valid[:, :t])


def test_auto_picks_dense_short_blockwise_long_splash_on_tpu():
    assert resolve_attention("auto", 256, "cpu") == "dense"
    assert resolve_attention("auto", 4096, "cpu") == "blockwise"
    assert resolve_attention("auto", 4096, "gpu") == "blockwise"
    assert resolve_attention("auto", 4096, "tpu") == "splash"
    assert resolve_attention("dense", 4096, "tpu") == "dense"
    # the plan compiles for a TPU topology from a CPU process: `auto` must pick the target's kernel, not the host's
    assert resolve_attention("auto", 4096) == "blockwise"
    with target_platform("tpu"):
        assert resolve_attention("auto", 4096) == "splash"
        assert resolve_attention("auto", 256) == "dense"
    assert resolve_attention("auto", 4096) == "blockwise"


def _tiny(attention):
    return ModelConfig(**{**tiny_config("qwen2").__dict__, "attention": attention})


def test_model_logprobs_and_prefill_blockwise_equal_dense():
    """A tiny GQA model: the train step's sequence log-probs (left-padded rows) and their parameter gradients, and a
    cached prefill's hidden states and cache, with model.attention=blockwise equal dense."""
    dense_model = Transformer(_tiny("dense"), rngs=nnx.Rngs(0))
    graphdef_d, params = nnx.split(dense_model)
    graphdef_b, _ = nnx.split(Transformer(_tiny("blockwise"), rngs=nnx.Rngs(0)))
    b, t = 3, 40
    r = np.random.default_rng(1)
    tokens = jnp.asarray(r.integers(1, 256, (b, t)), jnp.int32)
    valid = _left_padded(b, t, [40, 25, 6])
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    weights = jnp.asarray(r.normal(size=(b, t)), jnp.float32) * valid

    def loss(graphdef):
        def f(p):
            logp, ent = sequence_logprobs(graphdef, p, tokens, positions, valid, temperature=0.8, chunk_size=16)
            return jnp.sum((logp + 0.1 * ent) * weights), logp
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (vd, lpd), gd = loss(graphdef_d)(params)
    (vb, lpb), gb = loss(graphdef_b)(params)
    np.testing.assert_allclose(np.asarray(lpb), np.asarray(lpd), atol=1e-4)
    for a, c in zip(jax.tree.leaves(gb), jax.tree.leaves(gd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-4)

    def prefill(graphdef):
        @jax.jit
        def f(p):
            model = nnx.merge(graphdef, p)
            s = 64
            mask = causal_mask(b, t, s, 0, jnp.pad(valid, ((0, 0), (0, s - t))))
            return model.hidden(tokens, positions, cache=init_cache(model.config, b, s), mask=mask)
        return f(params)

    (hd, cd), (hb, cb) = prefill(graphdef_d), prefill(graphdef_b)
    np.testing.assert_allclose(np.asarray(hb * valid[..., None]), np.asarray(hd * valid[..., None]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(cb["k"]), np.asarray(cd["k"]), atol=1e-4)


def test_attention_config_is_validated():
    with pytest.raises(ConfigError, match="model.attention"):
        load_config("configs/tiny_test.yaml", ["model.attention=flash"])
    with pytest.raises(ValueError, match="model.attention"):
        tiny_config("qwen2", attention="flash")
    c = load_config("configs/tiny_test.yaml", ["model.attention=cudnn"])
    with pytest.raises(ConfigError, match="model.attention='cudnn' runs only on GPU"):
        check_devices(c, 8, "cpu")
    with pytest.raises(ConfigError, match="model.attention='splash' runs only on TPU"):
        check_devices(load_config("configs/tiny_test.yaml", ["model.attention=splash"]), 8, "cpu")
    check_devices(load_config("configs/tiny_test.yaml", ["model.attention=blockwise"]), 8, "cpu")

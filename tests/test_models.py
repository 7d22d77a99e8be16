"""Model behaviour without transformers: configs, KV cache, causality, chunked log-probs, remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lad_jax.models import (ModelConfig, Transformer, create_model, init_cache, logprobs_from_logits, tiny_config,
                            token_logprobs)
from lad_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def models():
    return {kind: create_model(tiny_config(kind), seed=i) for i, kind in enumerate(("qwen2", "qwen3", "llama"))}


@nnx.jit
def forward(model, tokens, positions, mask):
    return model(tokens, positions, mask_bts=mask)[0]


def _step(model, tokens, positions, cache, mask):
    return model(tokens, positions, cache=cache, mask_bts=mask)


step = nnx.jit(_step, donate_argnums=(3,))


def test_hf_config_round_trip_and_errors():
    for kind in ("qwen2", "qwen3", "llama"):
        cfg = tiny_config(kind)
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hf = tiny_config("qwen2").to_hf_config()
    with pytest.raises(ValueError, match="model_type='mistral'"):
        ModelConfig.from_hf_config({**hf, "model_type": "mistral"})
    with pytest.raises(ValueError, match="model_type='qwen3_moe'"):
        ModelConfig.from_hf_config({**hf, "model_type": "qwen3_moe", "num_experts": 8})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelConfig.from_hf_config({**hf, "num_experts": 8})
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_hf_config({**hf, "use_sliding_window": True, "max_window_layers": 1})
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_hf_config({**hf, "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    # Qwen2.5 ships use_sliding_window=false with a sliding_window value: that is full attention.
    ok = ModelConfig.from_hf_config({**hf, "use_sliding_window": False, "sliding_window": 4096})
    assert ok.model_type == "qwen2"
    # legacy rope_theta / rope_scaling keys (transformers 4 config.json files)
    legacy = {k: v for k, v in tiny_config("llama").to_hf_config().items() if k != "rope_parameters"}
    assert ModelConfig.from_hf_config(legacy) == tiny_config("llama")
    with pytest.raises(ValueError, match="remat"):
        tiny_config("qwen2", remat="sometimes")
    with pytest.raises(ValueError, match="param_dtype"):
        tiny_config("qwen2", param_dtype="int8")


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_cached_decoding_matches_uncached(models, kind):
    model = models[kind]
    cfg = model.config
    b, t, s, prefix = 2, 9, 16, 5
    tokens = jax.random.randint(jax.random.key(0), (b, t), 0, cfg.vocab_size)
    valid = np.ones((b, t), bool)
    valid[1, :2] = False  # left-padded row
    positions = jnp.asarray(np.clip(np.cumsum(valid, 1) - 1, 0, None))
    full_mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    full = forward(model, tokens, positions, jnp.asarray(full_mask))

    cache = init_cache(cfg, b, s)
    assert cache["k"].shape == (cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
    slot_valid = np.zeros((b, s), bool)
    slot_valid[:, :t] = valid
    outs = []
    for lo, hi in [(0, prefix)] + [(i, i + 1) for i in range(prefix, t)]:
        mask = (np.arange(s)[None, :] <= np.arange(lo, hi)[:, None])[None] & slot_valid[:, None, :]
        logits, cache = step(model, tokens[:, lo:hi], positions[:, lo:hi], cache, jnp.asarray(mask))
        assert int(cache["index"]) == hi
        outs.append(logits)
    inc = np.asarray(jnp.concatenate(outs, axis=1))
    np.testing.assert_allclose(inc[valid], np.asarray(full)[valid], atol=2e-5, rtol=0)


def test_causality(models):
    model = models["llama"]
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, model.config.vocab_size)
    changed = tokens.at[:, 6:].set((tokens[:, 6:] + 7) % model.config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((10, 10), bool)), (2, 10, 10))
    a = forward(model, tokens, positions, causal)
    b = forward(model, changed, positions, causal)
    np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
    assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3
    # default mask (None) is causal
    default = nnx.jit(lambda m, x, p: m(x, p)[0])(model, tokens, positions)
    np.testing.assert_allclose(np.asarray(default), np.asarray(a), atol=1e-6)


def test_chunked_logprobs_equal_direct_with_grads_and_remat(models):
    """Chunked (remat="full" blocks) == direct (remat="dots" blocks): values, entropy and gradients."""
    base = models["llama"]
    state = nnx.state(base)
    direct_model = nnx.merge(nnx.graphdef(Transformer(base.config.replace(remat="dots"), rngs=nnx.Rngs(0))), state)
    chunk_model = nnx.merge(nnx.graphdef(Transformer(base.config.replace(remat="full"), rngs=nnx.Rngs(0))), state)
    b, t, chunk = 2, 10, 3  # 3 does not divide t: exercises padding
    tokens = jax.random.randint(jax.random.key(2), (b, t), 0, base.config.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    weights = jax.random.normal(jax.random.key(3), (b, t))

    def direct(m):
        logits, _ = m(tokens, positions, mask_bts=mask)
        lp, ent = logprobs_from_logits(logits, targets, 0.7, return_entropy=True)
        return jnp.sum(lp * weights), (lp, ent, logprobs_from_logits(logits, targets))

    def chunked(m):
        lp, ent = token_logprobs(m, tokens, positions, mask, targets, temperature=0.7, chunk_size=chunk,
                                 return_entropy=True)
        return jnp.sum(lp * weights), (lp, ent)

    (v1, (lp1, e1, lp1_t1)), g1 = nnx.jit(nnx.value_and_grad(direct, has_aux=True))(direct_model)
    (v2, (lp2, e2)), g2 = nnx.jit(nnx.value_and_grad(chunked, has_aux=True))(chunk_model)
    assert lp2.dtype == jnp.float32 and lp2.shape == (b, t)
    np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(e2), np.asarray(e1), atol=1e-5)
    assert np.all(np.asarray(lp1) <= 0) and np.all(np.asarray(e1) >= 0)
    # the logits path really is tempered: T=0.7 log-probs differ from T=1
    assert np.abs(np.asarray(lp1_t1) - np.asarray(lp1)).max() > 1e-3
    leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(leaves1) == len(leaves2) > 0
    for x, y in zip(leaves1, leaves2):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_bf16_compute_and_params():
    cfg = tiny_config("qwen2", param_dtype="bfloat16", dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.blocks.wq[...].dtype == jnp.bfloat16
    tokens = jnp.zeros((1, 4), jnp.int32)
    logits, cache = model(tokens, jnp.arange(4)[None], cache=init_cache(cfg, 1, 8))
    assert logits.dtype == jnp.float32 and cache["k"].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(logits)).all()


def test_create_model_sharded_init(models):
    mesh = make_mesh(fsdp=4, tensor=2)
    ref = models["llama"]  # built by create_model(tiny_config("llama"), seed=2) without a mesh
    model = create_model(ref.config, seed=2, mesh=mesh)
    w = model.blocks.w_up[...]
    assert max(s.data.nbytes for s in w.addressable_shards) * 8 == w.nbytes
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref.blocks.w_up[...]), atol=1e-7)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama"])
def test_unrolled_per_layer_decode_matches_stacked_cache(models, kind):
    """`hidden_unrolled` (per-layer weights and decode-layout cache, the sampler's decode path) == stacked `hidden`."""
    from lad_jax.models.cache import stack_cache, unstack_cache

    model = models[kind]
    cfg = model.config
    b, s, prefix, steps = 2, 12, 5, 4
    tokens = jax.random.randint(jax.random.key(4), (b, prefix + steps), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(prefix + steps), (b, prefix + steps))
    ref_cache = init_cache(cfg, b, s)
    prefill_mask = jnp.broadcast_to(jnp.arange(s)[None, :] <= jnp.arange(prefix)[:, None], (b, prefix, s))
    _, ref_cache = step(model, tokens[:, :prefix], positions[:, :prefix], ref_cache, prefill_mask)
    cache = jax.tree.map(jnp.copy, unstack_cache(ref_cache))  # `step` donates ref_cache
    assert len(cache["k"]) == cfg.num_layers and cache["k"][0].shape == (b, cfg.num_kv_heads, cfg.head_dim, s)
    assert cache["v"][0].shape == (b, cfg.num_kv_heads, s, cfg.head_dim)
    np.testing.assert_array_equal(np.asarray(stack_cache(cache)["k"]), np.asarray(ref_cache["k"]))

    @nnx.jit
    def unrolled(model, tok, pos, cache, mask):
        hidden, cache = model.hidden_unrolled(tok, pos, layer_params=model.layer_params(), cache=cache, mask_bts=mask)
        return model.logits(hidden), cache

    for i in range(prefix, prefix + steps):
        mask = jnp.broadcast_to(jnp.arange(s) <= i, (b, 1, s))
        want, ref_cache = step(model, tokens[:, i:i + 1], positions[:, i:i + 1], ref_cache, mask)
        got, cache = unrolled(model, tokens[:, i:i + 1], positions[:, i:i + 1], cache, mask)
        assert int(cache["index"]) == int(ref_cache["index"]) == i + 1
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    # two query tokens at once (t > 1: the grouped score product folds g and t together)
    i = prefix + steps
    extra = jax.random.randint(jax.random.key(5), (b, 2), 0, cfg.vocab_size)
    pos2 = jnp.broadcast_to(jnp.arange(i, i + 2), (b, 2))
    mask = jnp.broadcast_to(jnp.arange(s)[None, :] <= jnp.arange(i, i + 2)[:, None], (b, 2, s))
    want, ref_cache = step(model, extra, pos2, ref_cache, mask)
    got, cache = unrolled(model, extra, pos2, cache, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    back = stack_cache(cache)
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(back[name]), np.asarray(ref_cache[name]), atol=1e-6, rtol=0)

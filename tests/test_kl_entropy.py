"""The optional KL-to-reference penalty and entropy bonus, wired from the config through the train step.

Train-step tests use an "optimizer" that stores the step's gradient in its state (and leaves the params alone), so
the regularizers' gradients can be compared exactly with hand-written ones.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lad_jax import experience
from lad_jax import train_setup as setup_lib
from lad_jax.config import ConfigError, load_config
from lad_jax.models import ModelConfig, create_model
from lad_jax.sharding import make_mesh
from lad_jax.train_step import (REF_KEY, TrainStep, init_train_state, make_logprob_fn, sequence_logprobs,
                                train_state_shardings)

VOCAB, PROMPT, RESP, ROWS = 40, 4, 5, 8


def _config(*overrides):
    return load_config("configs/tiny_test.yaml", ["algorithm.minibatch_size=8", "algorithm.micro_batch_size=8",
                                                  "rollout.prompts_per_step=2", *overrides])


@pytest.fixture(scope="module")
def setup():
    """One model, its params, an SGD(lr=1) train-state layout and a fixed batch (pi_old a perturbed pi_theta)."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model_config = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True,
                               tie_word_embeddings=False, max_position_embeddings=16)
    model = create_model(model_config, seed=0, mesh=mesh)
    graphdef, params, *_ = setup_lib.train_objects(_config(), model, mesh)
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    tx = optax.GradientTransformation(lambda p: {"grads": jax.tree.map(jnp.zeros_like, p)},
                                      lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), {"grads": g}))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = train_state_shardings(tx, abstract, params_sh, mesh)
    logprob_fn = make_logprob_fn(graphdef, mesh, params_sh, 1.0)

    rng = np.random.default_rng(0)
    t = PROMPT + RESP
    plen = rng.integers(1, PROMPT + 1, ROWS)
    rlen = rng.integers(1, RESP + 1, ROWS)
    pvalid = np.arange(PROMPT)[None] >= PROMPT - plen[:, None]
    rvalid = np.arange(RESP)[None] < rlen[:, None]
    valid = np.concatenate([pvalid, rvalid], 1)
    tokens = np.where(valid, rng.integers(1, VOCAB, (ROWS, t)), 0).astype(np.int32)
    positions = np.concatenate([np.maximum(np.cumsum(pvalid, 1) - 1, 0), plen[:, None] + np.arange(RESP)],
                               1).astype(np.int32)
    resp = np.concatenate([np.zeros_like(pvalid), rvalid], 1)
    lp = np.asarray(logprob_fn(params, tokens, positions, valid))
    batch = {"tokens_bt": tokens, "positions_bt": positions, "valid_bt": valid, "response_bt": resp,
             "old_logp_bt": np.where(resp, lp + 0.3 * rng.normal(size=lp.shape), 0).astype(np.float32),
             "advantages_b": rng.normal(size=ROWS).astype(np.float32)}
    return dict(mesh=mesh, graphdef=graphdef, params=params, tx=tx, shardings=shardings, batch=batch,
                logprob_fn=logprob_fn)


def _ref_logp(setup, params):
    b = setup["batch"]
    lp = np.asarray(setup["logprob_fn"](params, b["tokens_bt"], b["positions_bt"], b["valid_bt"]))
    return np.where(b["response_bt"], lp, 0).astype(np.float32)


def _grads(setup, config, params, ref_logp=None):
    """(gradient of one train step of `config` at `params`, its metrics)."""
    s = setup
    step = TrainStep(config, s["graphdef"], s["tx"], optax.constant_schedule(1.0), s["mesh"], s["shardings"])
    batch = dict(s["batch"])
    if ref_logp is not None:
        batch[REF_KEY] = ref_logp
    assert set(batch) == set(step.batch_shardings)  # the ref key is expected exactly when kl_coef > 0
    batch = {k: jax.device_put(v[None], step.batch_shardings[k]) for k, v in batch.items()}
    state = init_train_state(s["tx"], jax.tree.map(jnp.copy, params), s["shardings"])
    new, metrics = step(state, batch)
    return jax.device_get(new["opt_state"]["grads"]), jax.device_get(metrics)


def _token_mean_grad(setup, params, per_token):
    """Gradient of the token-mean (the default aggregation) of `per_token(logp_bt, entropy_bt)` over responses."""
    b = setup["batch"]
    mask = jnp.asarray(b["response_bt"])

    def f(p):
        logp, ent = sequence_logprobs(setup["graphdef"], p, b["tokens_bt"], b["positions_bt"], b["valid_bt"],
                                      temperature=1.0)
        return jnp.sum(jnp.where(mask, per_token(logp, ent), 0.0)) / jnp.sum(mask)

    return jax.device_get(jax.jit(jax.grad(f))(params))


def _assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-3)


def _max_abs(tree):
    return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_is_zero_when_reference_equals_policy(setup, estimator):
    """Step 0: reference == current params, so the penalty's value and gradient vanish (k2, k3; k1's per-sample
    gradient is grad log pi, zero only in expectation) and the update is the kl_coef=0 update."""
    base, base_m = _grads(setup, _config(), setup["params"])
    grads, m = _grads(setup, _config("algorithm.kl_coef=0.5", f"algorithm.kl_estimator={estimator}"),
                      setup["params"], _ref_logp(setup, setup["params"]))
    assert "train/kl_ref" in m and "train/kl_ref" not in base_m
    assert abs(m["train/kl_ref"]) < 1e-9
    assert m["train/loss"] == pytest.approx(base_m["train/loss"], rel=1e-6, abs=1e-9)
    _assert_trees_close(grads, base, atol=1e-6 * _max_abs(base))


def test_kl_pulls_a_moved_policy_back_to_the_reference(setup):
    """After the policy moved away from the reference, the KL term is positive and adds exactly kl_coef times the
    gradient of the token-mean k3 estimate, which points away from the reference (descent moves back to it)."""
    ref_params = setup["params"]
    base0, _ = _grads(setup, _config(), ref_params)
    moved = jax.tree.map(lambda p, g: p - 0.5 * g, ref_params, base0)  # one plain policy-gradient step
    ref_logp = _ref_logp(setup, ref_params)
    coef = 0.5
    base, base_m = _grads(setup, _config(), moved)
    grads, m = _grads(setup, _config(f"algorithm.kl_coef={coef}"), moved, ref_logp)
    assert m["train/kl_ref"] > 1e-4
    diff = jax.tree.map(lambda a, b: a - b, grads, base)
    assert _max_abs(diff) > 1e-3 * _max_abs(base)  # the update differs from kl_coef=0

    ref_j = jnp.asarray(ref_logp)
    expected = _token_mean_grad(setup, moved, lambda logp, _: jnp.expm1(ref_j - logp) - (ref_j - logp))
    _assert_trees_close(diff, jax.tree.map(lambda g: coef * g, expected), atol=1e-4 * _max_abs(diff))
    away = sum(float(np.vdot(d, np.asarray(p) - np.asarray(r)))
               for d, p, r in zip(jax.tree.leaves(diff), jax.tree.leaves(moved), jax.tree.leaves(ref_params)))
    assert away > 0


def test_entropy_bonus_adds_the_entropy_gradient(setup):
    """entropy_coef > 0 subtracts entropy_coef * the gradient of the token-mean entropy (the bonus is
    differentiated, float32), and a small step along the difference raises the policy's entropy."""
    params = setup["params"]
    coef = 1.0  # large enough that `grads - base` is not dominated by float32 cancellation
    base, base_m = _grads(setup, _config(), params)
    grads, m = _grads(setup, _config(f"algorithm.entropy_coef={coef}"), params)
    assert m["train/entropy"] == pytest.approx(base_m["train/entropy"], rel=1e-6)  # logged either way
    assert m["train/entropy"] > 0
    diff = jax.tree.map(lambda a, b: a - b, grads, base)
    expected = _token_mean_grad(setup, params, lambda _, ent: ent)
    _assert_trees_close(diff, jax.tree.map(lambda g: -coef * g, expected), atol=1e-3 * _max_abs(diff))

    b = setup["batch"]

    def mean_entropy(p):
        _, ent = sequence_logprobs(setup["graphdef"], p, b["tokens_bt"], b["positions_bt"], b["valid_bt"],
                                   temperature=1.0)
        return float(np.sum(np.where(b["response_bt"], ent, 0)) / b["response_bt"].sum())

    stepped = jax.tree.map(lambda p, d: p - 1e-2 * d / coef, params, diff)
    assert mean_entropy(stepped) > mean_entropy(params)


def test_config_validation():
    c = _config()
    assert (c.algorithm.kl_coef, c.algorithm.kl_estimator, c.algorithm.entropy_coef) == (0.0, "k3", 0.0)
    for overrides, key in ((["algorithm.kl_estimator=k4"], "algorithm.kl_estimator"),
                           (["algorithm.kl_coef=-0.1"], "algorithm.kl_coef"),
                           (["algorithm.entropy_coef=-1"], "algorithm.entropy_coef"),
                           (["algorithm.kl_coef=.nan"], "algorithm.kl_coef"),
                           (["algorithm.kl_coef=lots"], "algorithm.kl_coef")):
        with pytest.raises(ConfigError, match=key):
            _config(*overrides)
    with pytest.raises(ConfigError, match="'k1', 'k2', 'k3'|k1, k2, k3"):
        _config("algorithm.kl_estimator=kl")
    assert _config("algorithm.kl_estimator=k1", "algorithm.kl_coef=0.01").algorithm.kl_coef == 0.01


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_trainer_feeds_reference_logprobs(tmp_path):
    """The trainer builds the frozen reference only with kl_coef > 0, `experience.collect`
    fills `ref_logp_bt` (before any update it equals the sampler's behaviour log-probs: same weights), the
    minibatches carry it, the step logs `train/kl_ref` (> 0 once the policy moved), the optimizer never changes the
    reference, and a resumed run rebuilds the same reference."""
    from lad_jax.trainer import Trainer

    config = load_config("configs/tiny_test.yaml", [f"output_dir={tmp_path}", "steps=2", "checkpoint.every=0",
                                                    "algorithm.kl_coef=0.1"])
    trainer = Trainer(config, log=lambda *a, **k: None)
    assert trainer.recompute is None and trainer.reference is not None
    trainer._restore_or_init()
    ref0 = jax.device_get(trainer.ref_params)
    _assert_trees_equal(ref0, jax.device_get(trainer.state["params"]))

    exp = experience.collect(config, trainer.policy(), next(trainer.loader), trainer.s.tokenizer,
                             trainer.s.reward_fn, key=setup_lib.step_key(config.seed, 0), mesh=trainer.s.mesh,
                             stop_ids=trainer.s.stop_ids, reference=trainer.reference)
    resp = exp.arrays["response_bt"]
    np.testing.assert_allclose(exp.arrays[REF_KEY][resp], exp.arrays["old_logp_bt"][resp], atol=1e-5)
    assert not exp.arrays[REF_KEY][~resp].any()
    mb = next(experience.minibatches(config, exp, np.random.default_rng(0)))
    assert REF_KEY in mb and mb[REF_KEY].shape == mb["old_logp_bt"].shape

    metrics = [trainer.train_one(step) for step in range(2)]
    # (mu = 2 passes: the second pass of each step already sees a moved policy)
    assert metrics[0]["train/kl_ref"] > 1e-6 and metrics[1]["train/kl_ref"] > 1e-6
    _assert_trees_equal(jax.device_get(trainer.ref_params), ref0)  # frozen

    # Resume: the reference is not in the checkpoint; it is rebuilt from the config (here the seeded scratch init;
    # tiny_test has no warm start, which would only add its compile time) bit for bit.
    trainer.ckpt.save(2, trainer.state, meta=trainer._meta(), force=True)
    trainer.ckpt.wait()
    trainer.ckpt.close()
    resumed = Trainer(config, log=lambda *a, **k: None)
    assert resumed._restore_or_init() == 2
    _assert_trees_equal(jax.device_get(resumed.ref_params), ref0)
    resumed.ckpt.close()

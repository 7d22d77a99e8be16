"""The jitted train step: accumulation equivalence, sharding equivalence on 8 fake devices, no recompilation."""
import jax
import numpy as np
import pytest

from lad_jax.config import load_config
from lad_jax.models import ModelConfig, create_model
from lad_jax.sharding import make_mesh
from lad_jax.train_setup import train_objects
from lad_jax.train_step import TrainStep, init_train_state, make_logprob_fn

VOCAB, PROMPT, RESP, ROWS = 40, 6, 6, 16


def _config(*overrides):
    return load_config("configs/tiny_test.yaml", ["algorithm.minibatch_size=16", "algorithm.micro_batch_size=16",
                                                  "optimizer.lr=1e-2", *overrides])


def _model_config():
    return ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=False,
                       max_position_embeddings=32)


def _batch(seed, old_logp_fn=None):
    """A fixed batch: left-padded prompts, variable-length responses, pi_old a perturbed copy of pi_theta."""
    rng = np.random.default_rng(seed)
    t = PROMPT + RESP
    tokens = rng.integers(1, VOCAB, (ROWS, t)).astype(np.int32)
    plen = rng.integers(1, PROMPT + 1, ROWS)
    rlen = rng.integers(1, RESP + 1, ROWS)
    pvalid = np.arange(PROMPT)[None] >= PROMPT - plen[:, None]
    rvalid = np.arange(RESP)[None] < rlen[:, None]
    valid = np.concatenate([pvalid, rvalid], 1)
    tokens = np.where(valid, tokens, 0)
    positions = np.concatenate([np.maximum(np.cumsum(pvalid, 1) - 1, 0), plen[:, None] + np.arange(RESP)], 1)
    resp = np.concatenate([np.zeros_like(pvalid), rvalid], 1)
    batch = {"tokens_bt": tokens, "positions_bt": positions.astype(np.int32), "valid_bt": valid, "response_bt": resp,
             "old_logp_bt": np.zeros((ROWS, t), np.float32),
             "advantages_b": rng.normal(size=ROWS).astype(np.float32)}
    if old_logp_fn is not None:
        lp = np.asarray(old_logp_fn(tokens, batch["positions_bt"], valid))
        batch["old_logp_bt"] = np.where(resp, lp + 0.3 * rng.normal(size=lp.shape), 0).astype(np.float32)
    return batch


def _run(config, mesh_shape, batches, micro):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(*mesh_shape, devices=devices)
    model = create_model(_model_config(), seed=0, mesh=mesh)
    graphdef, params, tx, schedule, shardings = train_objects(config, model, mesh)
    state = init_train_state(tx, params, shardings)
    step = TrainStep(config, graphdef, tx, schedule, mesh, shardings)
    metrics = []
    for b in batches:
        mb = {k: v.reshape((ROWS // micro, micro) + v.shape[1:]) for k, v in b.items()}
        mb = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in mb.items()}
        state, m = step(state, mb)
        metrics.append(jax.device_get(m))
    return jax.device_get(state["params"]), metrics, step.compiles


@pytest.fixture(scope="module")
def batches():
    config = _config()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = create_model(_model_config(), seed=0, mesh=mesh)
    graphdef, params, *_ = train_objects(config, model, mesh)
    fn = make_logprob_fn(graphdef, mesh, jax.tree.map(lambda x: x.sharding, params), 1.0)
    return [_batch(s, lambda *a: fn(params, *a)) for s in range(3)]


@pytest.fixture(scope="module")
def reference(batches):
    return _run(_config(), (1, 1, 1), batches, micro=16)


def _close(a, b, atol=2e-5, rtol=2e-4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=rtol)


def test_step_updates_and_never_recompiles(reference, batches):
    params, metrics, compiles = reference
    assert compiles == 1  # three steps with different data, one trace
    assert all(np.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0 for m in metrics)
    assert metrics[0]["train/ratio_mean"] != pytest.approx(1.0, abs=1e-3)  # pi_old was perturbed


def test_accumulation_equals_full_batch(reference, batches):
    params, metrics, _ = _run(_config("algorithm.micro_batch_size=4"), (1, 1, 1), batches, micro=4)
    _close(params, reference[0])
    for m, r in zip(metrics, reference[1]):
        for k in ("train/loss", "train/grad_norm", "train/approx_kl", "train/above_target_frac"):
            assert m[k] == pytest.approx(r[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (2, 1, 4)])
def test_sharding_equivalence(reference, batches, shape):
    params, metrics, compiles = _run(_config(), shape, batches, micro=16)
    assert compiles == 1
    _close(params, reference[0])
    for m, r in zip(metrics, reference[1]):
        assert m["train/loss"] == pytest.approx(r["train/loss"], rel=1e-4, abs=1e-6)


def test_grpo_step_runs(batches):
    _, metrics, _ = _run(_config("algorithm.loss=grpo"), (1, 1, 1), batches[:1], micro=16)
    assert 0.0 <= metrics[0]["train/clip_frac"] <= 1.0


def test_step_is_traced_under_the_mesh(batches):
    """The model's logical-axis activation constraints must reach the compiled step (they are no-ops without a
    mesh context, which once left a 7B step at 72 GiB per device instead of 48)."""
    config = _config()
    mesh = make_mesh(2, 2, 2)
    model = create_model(_model_config(), seed=0, mesh=mesh)
    graphdef, params, tx, schedule, shardings = train_objects(config, model, mesh)
    state = init_train_state(tx, params, shardings)
    step = TrainStep(config, graphdef, tx, schedule, mesh, shardings)
    mb = {k: jax.device_put(v[None], step.batch_shardings[k]) for k, v in batches[0].items()}
    text = step.lower(state, mb).as_text()
    assert text.count("sharding_constraint") >= 5, "activation constraints missing from the train step"

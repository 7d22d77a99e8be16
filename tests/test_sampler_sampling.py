"""Sampling methods on explicit logits: frequencies vs the exact distribution, truncation sets, log-probs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax.sampling import Sampling, inverse_cdf, sample_tokens, truncated_probs


def reference_probs(logits, temperature, top_k, top_p):
    """Independent numpy reference: temperature, then top-k, then top-p on the renormalized rest (by sorting)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        sorted_q = q[order]
        before = np.cumsum(sorted_q) - sorted_q
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
        q = np.where(keep, q, 0.0)
        q /= q.sum()
    return q


N = 40_000
LOGITS = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)


@pytest.fixture(scope="module")
def draw():
    def run(sampling: Sampling, seed=0, logits=LOGITS, n=N):
        keys = jax.random.split(jax.random.key(seed), n)
        logits_nv = jnp.broadcast_to(jnp.asarray(logits), (n, logits.shape[-1]))
        fn = jax.jit(sample_tokens, static_argnames="mode")
        tok, logp = fn(logits_nv, keys, sampling.params(), mode=sampling.mode)
        return np.asarray(tok), np.asarray(logp)

    return run


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(temperature=1.0),
        Sampling(temperature=0.5),
        Sampling(temperature=2.0),
        Sampling(temperature=1.0, top_k=3),
        Sampling(temperature=1.0, top_p=0.8),
        Sampling(temperature=0.7, top_k=5, top_p=0.9),
    ],
)
def test_frequencies_match_exact_distribution(draw, sampling):
    tok, logp = draw(sampling)
    exact = reference_probs(LOGITS, sampling.temperature, sampling.top_k, sampling.top_p)
    freq = np.bincount(tok, minlength=LOGITS.size) / tok.size
    # 5 standard errors per token; tokens outside the kept set must never appear
    tol = 5 * np.sqrt(exact * (1 - exact) / tok.size) + 1e-3
    assert np.all(np.abs(freq - exact) <= tol), (freq, exact)
    assert np.all(freq[exact == 0] == 0), (freq, exact)
    # behaviour log-prob: full-vocabulary log_softmax(logits / T) at the token, whatever the truncation
    full = jax.nn.log_softmax(jnp.asarray(LOGITS) / sampling.temperature)
    np.testing.assert_allclose(logp, np.asarray(full)[tok], atol=1e-6)


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, top_k=40), Sampling(1.0, top_p=0.7)])
def test_frequencies_on_a_vocabulary_of_many_cdf_blocks(draw, sampling):
    """700 tokens = 5.5 inverse-CDF blocks (the last one padded): frequencies still match the exact distribution."""
    logits = (1.5 * np.random.default_rng(3).normal(size=700)).astype(np.float32)
    tok, logp = draw(sampling, logits=logits, n=60_000)
    exact = reference_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    freq = np.bincount(tok, minlength=logits.size) / tok.size
    tol = 5 * np.sqrt(exact * (1 - exact) / tok.size) + 1e-3
    assert np.all(np.abs(freq - exact) <= tol), np.abs(freq - exact).max()
    assert np.all(freq[exact == 0] == 0)
    full = np.asarray(jax.nn.log_softmax(jnp.asarray(logits) / sampling.temperature))
    np.testing.assert_allclose(logp, full[tok], atol=1e-5)


def test_inverse_cdf_equals_a_flat_float64_search():
    """The two-level draw picks the index a float64 running sum over the whole row picks, and never a zero weight."""
    rng = np.random.default_rng(4)
    v, n = 1000, 4096
    q = rng.exponential(size=(n, v)).astype(np.float32)
    q[:, 128:256] = 0.0  # a whole empty block
    q[:, 127] = q[:, 256] = q[:, 999] = 0.0  # zeros at block edges and at the padded end
    q[: n // 2, rng.random(v) < 0.7] = 0.0  # sparse rows, like a truncated distribution
    u = rng.random(n).astype(np.float32)
    got = np.asarray(jax.jit(inverse_cdf)(jnp.asarray(q), jnp.asarray(u)))
    cdf = np.cumsum(q.astype(np.float64), axis=1)
    want = np.argmax(cdf >= ((1.0 - u.astype(np.float64)) * cdf[:, -1])[:, None], axis=1)
    assert np.all(q[np.arange(n), got] > 0)
    # rounding may move a draw that falls within float32 epsilon of a boundary to the neighbouring kept token
    assert (got == want).mean() >= 0.999, (got != want).sum()


def test_greedy_is_argmax_with_temperature_one_logprob(draw):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 1000)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 64)
    g = Sampling.greedy()
    tok, logp = sample_tokens(jnp.asarray(logits), keys, g.params(), g.mode)
    np.testing.assert_array_equal(np.asarray(tok), logits.argmax(-1))
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))[np.arange(64), logits.argmax(-1)]
    np.testing.assert_allclose(np.asarray(logp), ref, atol=1e-6)


@pytest.mark.parametrize("top_k,top_p,temperature", [(50, 1.0, 1.0), (0, 0.9, 1.0), (0, 0.3, 0.6), (40, 0.95, 1.3)])
def test_truncation_sets_exact_on_large_vocab(top_k, top_p, temperature):
    """The bisection thresholds keep exactly the tokens a full sort keeps (no ties in these logits)."""
    rng = np.random.default_rng(1)
    logits = (3 * rng.normal(size=(4, 32000))).astype(np.float32)
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    q, _ = truncated_probs(jnp.asarray(logits), s.params(), s.mode)
    q = np.asarray(q)
    for row in range(4):
        ref = reference_probs(logits[row], temperature, top_k, top_p)
        np.testing.assert_array_equal(q[row] > 0, ref > 0)
        np.testing.assert_allclose(q[row] / q[row].sum(), ref, atol=1e-5)


def test_seeds_differ_and_repeat(draw):
    a, _ = draw(Sampling(1.0), seed=1, n=256)
    b, _ = draw(Sampling(1.0), seed=1, n=256)
    c, _ = draw(Sampling(1.0), seed=2, n=256)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3


def test_traced_values_do_not_recompile():
    traces = []

    @jax.jit
    def f(logits, keys, params):
        traces.append(1)
        return sample_tokens(logits, keys, params, Sampling(1.0, top_k=3, top_p=0.9).mode)

    keys = jax.random.split(jax.random.key(0), 4)
    logits = jnp.zeros((4, 8))
    for s in (Sampling(1.0, 3, 0.9), Sampling(0.5, 5, 0.7), Sampling(2.0, 1, 0.2)):
        f(logits, keys, s.params())
    assert len(traces) == 1


@pytest.mark.parametrize(
    "kwargs,field",
    [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"temperature": 0.0, "top_k": 5}, "top_k")],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Sampling(**kwargs)

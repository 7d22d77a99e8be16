"""LAD objective and policy losses against independent NumPy formulas and hand-computed examples."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax.losses import AGGREGATIONS, DIVERGENCES, LOSSES, lad_objective, policy_loss

# Independent float64 references: f(x) and f'(x) written directly from the generator table in LAD.md.
F = {
    "js": lambda x: 0.5 * (x * np.log(x) - (x + 1) * np.log((x + 1) / 2)),
    "hellinger": lambda x: 0.5 * (np.sqrt(x) - 1) ** 2,
    "tv": lambda x: np.abs(x - 1),
    "kl": lambda x: x * np.log(x),
    "reverse_kl": lambda x: -np.log(x),
    "jeffreys": lambda x: (x - 1) * np.log(x),
}
F_PRIME = {
    "js": lambda x: 0.5 * (np.log(x) - np.log((x + 1) / 2)),
    "hellinger": lambda x: 0.5 * (1 - 1 / np.sqrt(x)),
    "tv": lambda x: np.sign(x - 1),
    "kl": lambda x: np.log(x) + 1,
    "reverse_kl": lambda x: -1 / x,
    "jeffreys": lambda x: np.log(x) + 1 - 1 / x,
}
STRICT = ("js", "hellinger", "tv", "jeffreys")
ETA = 0.25  # a power of two: A / eta is exact in float32, so the reference sees the same u


def _inputs():
    """float32 (l, A): random moderate values, near-ties, and an extreme grid with |l|, |u| up to 50."""
    rng = np.random.default_rng(0)
    l_rand = rng.uniform(-6, 6, 200)
    u_rand = rng.uniform(-6, 6, 200)
    u_tie = rng.uniform(-5, 5, 50)
    l_tie = u_tie + rng.choice([-1, 1], 50) * 10.0 ** rng.uniform(-4, -1, 50)
    grid = np.array([-50, -30, -7.5, -0.5, 0.0, 0.5, 7.5, 30, 50])
    l_grid, u_grid = (g.ravel() for g in np.meshgrid(grid, grid))
    l = np.concatenate([l_rand, l_tie, l_grid]).astype(np.float32)
    u = np.concatenate([u_rand, u_tie, u_grid]).astype(np.float32)
    return l, (u * ETA).astype(np.float32)


def _assert_close(got, want, rtol, atol, name):
    """allclose with an elementwise atol (the float32 rounding scale exp(l) + exp(u) of each input pair)."""
    bad = np.abs(got - want) > atol + rtol * np.abs(want)
    assert not bad.any(), f"{name}: {bad.sum()} mismatches, e.g. got {got[bad][:4]} want {want[bad][:4]}"


def _reference(divergence, l32, a32):
    l = l32.astype(np.float64)
    u = a32.astype(np.float64) / ETA
    x = np.exp(l - u)
    value = np.exp(u) * F[divergence](x)
    grad_l = np.exp(l) * F_PRIME[divergence](x)
    grad_u = value - grad_l  # d/du exp(u) f(exp(l - u)) = exp(u) f(x) - exp(l) f'(x)
    scale = np.exp(l) + np.exp(u)
    return value, grad_l, grad_u, scale


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_value_and_gradients_match_numpy(divergence):
    l, a = _inputs()
    value, grad_l, grad_u, scale = _reference(divergence, l, a)
    fn = functools.partial(lad_objective, eta=ETA, divergence=divergence)
    got = np.asarray(fn(l, a))
    got_gl = np.asarray(jax.grad(lambda x: jnp.sum(fn(x, a)))(l))
    got_ga = np.asarray(jax.grad(lambda y: jnp.sum(fn(l, y)))(a))
    for name, x in (("value", got), ("grad_l", got_gl), ("grad_a", got_ga)):
        assert x.dtype == np.float32 and np.all(np.isfinite(x)), name
    atol = 2e-6 * scale
    _assert_close(got, value, 2e-5, atol, "value")
    _assert_close(got_gl, grad_l, 2e-5, atol, "grad_l")
    _assert_close(got_ga, grad_u / ETA, 2e-5, atol / ETA, "grad_a")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_near_tie_gradient_is_relatively_accurate(divergence):
    # Where l ~ u the gradient is small; it must still carry the right size and sign, not rounding noise.
    u = np.float32(3.0)
    l = (u + np.array([-1e-3, -1e-5, 1e-5, 1e-3])).astype(np.float32)
    grad = np.asarray(jax.grad(lambda x: jnp.sum(lad_objective(x, u * ETA, eta=ETA, divergence=divergence)))(l))
    expected = np.exp(l.astype(np.float64)) * F_PRIME[divergence](np.exp(l.astype(np.float64) - 3.0))
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_stopping_property(divergence):
    a = np.array([-12.0, -1.0, 0.0, 0.3, 2.0, 12.5], np.float32)
    l = a / np.float32(ETA)  # exactly the target u
    grad = np.asarray(jax.grad(lambda x: jnp.sum(lad_objective(x, a, eta=ETA, divergence=divergence)))(l))
    if divergence in STRICT:
        np.testing.assert_array_equal(grad, np.zeros_like(grad))
    else:  # kl and reverse_kl have f'(1) != 0: the gradient at the target is +-exp(u)
        np.testing.assert_allclose(np.abs(grad), np.exp(l.astype(np.float64)), rtol=1e-5)


def test_objective_validation_clip_and_jit():
    with pytest.raises(ValueError, match="'js', 'hellinger'"):
        lad_objective(jnp.zeros(3), jnp.zeros(3), eta=0.25, divergence="chi2")
    with pytest.raises(ValueError, match="eta"):
        lad_objective(jnp.zeros(3), jnp.zeros(3), eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        lad_objective(jnp.zeros(3), jnp.zeros(3), eta=-1.0)
    # Broadcasting [b, t] against [b, 1], float64/int inputs cast to float32.
    out = lad_objective(np.zeros((2, 3)), np.array([[1], [0]]), eta=1.0)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[1], 0.0, atol=0)
    # The optional clamp bounds l and stops the gradient outside [-c, c].
    l = jnp.array([-10.0, 0.5, 10.0])
    clipped = lad_objective(l, jnp.zeros(3), eta=1.0, divergence="kl", log_ratio_clip=2.0)
    unclipped = lad_objective(jnp.array([-2.0, 0.5, 2.0]), jnp.zeros(3), eta=1.0, divergence="kl")
    np.testing.assert_allclose(clipped, unclipped)
    clip_fn = functools.partial(lad_objective, eta=1.0, divergence="kl", log_ratio_clip=2.0)
    grad = jax.grad(lambda x: jnp.sum(clip_fn(x, jnp.zeros(3))))(l)
    assert grad[0] == 0 and grad[2] == 0 and grad[1] != 0
    jitted = jax.jit(functools.partial(lad_objective, eta=0.25, divergence="hellinger"))
    eager = lad_objective(l, jnp.ones(3), eta=0.25, divergence="hellinger")
    np.testing.assert_allclose(jitted(l, jnp.ones(3)), eager, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- policy_loss


def _loss(*args, **kwargs):
    num, den, metrics = policy_loss(*args, **kwargs)
    return num / den, (num, den, metrics)


def _grad(logp, *args, **kwargs):
    return jax.grad(lambda x: _loss(x, *args, **kwargs)[0])(logp)


def test_aggregation_modes_hand_example():
    logp = jnp.array([[-1.0, -2.0, 7.0], [-3.0, 7.0, 7.0], [7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    adv = jnp.array([1.0, -2.0, 5.0])
    # pg token losses: row 0 -> 1, 2; row 1 -> -6; row 2 is all padding and counts nowhere.
    expected = {
        "token-mean": (-3.0, 3.0),
        "seq-mean-token-mean": (1.5 - 6.0, 2.0),
        "seq-mean-token-sum": (-3.0, 2.0),
        "seq-mean-token-sum-norm": (-3.0 / 4.0, 2.0),
    }
    for aggregation, (num_ref, den_ref) in expected.items():
        num, den, metrics = policy_loss(
            logp, logp, adv, mask, loss="pg", aggregation=aggregation, max_length_norm=4.0
        )
        np.testing.assert_allclose([num, den], [num_ref, den_ref], rtol=1e-6, err_msg=aggregation)
        np.testing.assert_allclose(metrics["loss"], num_ref / den_ref, rtol=1e-6)
    # Gradient of token-mean pg: -A / token count on each response token.
    grad = _grad(logp, logp, adv, mask, loss="pg")
    np.testing.assert_allclose(grad, [[-1 / 3, -1 / 3, 0], [2 / 3, 0, 0], [0, 0, 0]], rtol=1e-6)


def test_grpo_hand_example_and_clip_higher():
    old = jnp.zeros((2, 3))
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]]))
    mask = jnp.ones((2, 3), bool)
    adv = jnp.array([1.0, -1.0])
    loss, (num, den, metrics) = _loss(logp, old, adv, mask, loss="grpo")
    # A=+1: min(r, clip(r)) = [1.2, 0.5, 1.1]; A=-1: min(-r, -clip(r)) = [-1.5, -0.8, -1.1].
    np.testing.assert_allclose(num, -(1.2 + 0.5 + 1.1) + (1.5 + 0.8 + 1.1), rtol=1e-6)
    assert den == 6
    np.testing.assert_allclose(metrics["clip_frac"], 2 / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], (1.5 + 0.5 + 1.1) / 3, rtol=1e-6)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)]
    np.testing.assert_allclose(metrics["approx_kl"], sum(k3) / 3, rtol=1e-5)
    # d/dlogp of -r A is -r A where unclipped, 0 where the clipped branch is active.
    grad = _grad(logp, old, adv, mask, loss="grpo")
    np.testing.assert_allclose(grad * 6, [[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]], rtol=1e-5)
    # DAPO clip-higher: eps_high=0.28 lets the A>0 token reach 1.28.
    num_high, _, _ = policy_loss(logp, old, adv, mask, loss="grpo", clip_eps_high=0.28)
    np.testing.assert_allclose(num_high, -(1.28 + 0.5 + 1.1) + (1.5 + 0.8 + 1.1), rtol=1e-6)
    # Sequence-level ratio exp(sum l) = 0.825 for both rows: inside [0.8, 1.2], so nothing clips.
    num_seq, _, m_seq = policy_loss(logp, old, adv, mask, loss="grpo", ratio_level="sequence")
    r = 1.5 * 0.5 * 1.1
    np.testing.assert_allclose(num_seq, 3 * (-r) + 3 * r, atol=1e-6)
    assert m_seq["clip_frac"] == 0


def test_gspo_hand_example():
    old = jnp.zeros((2, 3))
    logp = jnp.log(jnp.array([[1.5, 0.5, 9.0], [2.0, 2.0, 2.0]]))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
    adv = jnp.array([1.0, 1.0])
    loss, (num, den, metrics) = _loss(logp, old, adv, mask, loss="gspo")
    s0 = math.sqrt(0.75)  # geometric mean of row 0; row 1 ratio 2 clips at 1.2 for A>0
    np.testing.assert_allclose(num, -(2 * s0 + 3 * 1.2), rtol=1e-6)
    assert den == 5
    np.testing.assert_allclose(metrics["clip_frac"], 3 / 5, rtol=1e-6)
    grad = _grad(logp, old, adv, mask, loss="gspo")
    # Each token of row 0 carries -A s; d s / d logp_t = s / len; two tokens -> -2 * s / 2 per token.
    np.testing.assert_allclose(grad * 5, [[-s0, -s0, 0], [0, 0, 0]], rtol=1e-5, atol=1e-7)


def test_lad_token_and_sequence_levels():
    rng = np.random.default_rng(1)
    logp = jnp.asarray(rng.normal(-2, 1, (3, 4)), jnp.float32)
    old = jnp.asarray(rng.normal(-2, 1, (3, 4)), jnp.float32)
    adv = jnp.array([0.7, -0.4, 0.0])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    for divergence in DIVERGENCES:
        num, den, m = policy_loss(logp, old, adv, mask, divergence=divergence, eta=0.5)
        per_token = lad_objective(logp - old, adv[:, None], eta=0.5, divergence=divergence)
        np.testing.assert_allclose(num, jnp.sum(jnp.where(mask, per_token, 0)), rtol=1e-5)
        assert den == 7
        above = jnp.where(mask, (logp - old) > adv[:, None] / 0.5, False)
        np.testing.assert_allclose(m["above_target_frac"], jnp.sum(above) / 7, rtol=1e-6)
    # Sequence level: l = sum of token log-ratios; each token carries its sequence's loss.
    seq_l = jnp.sum(jnp.where(mask, logp - old, 0), axis=1)
    per_seq = lad_objective(seq_l, adv, eta=0.5)
    num, den, _ = policy_loss(logp, old, adv, mask, eta=0.5, ratio_level="sequence")
    np.testing.assert_allclose(num, jnp.sum(per_seq * jnp.array([4, 2, 1])), rtol=1e-5)
    num, den, _ = policy_loss(logp, old, adv, mask, eta=0.5, ratio_level="sequence", aggregation="seq-mean-token-mean")
    np.testing.assert_allclose(num / den, jnp.mean(per_seq), rtol=1e-5)
    # Default divergence and eta: js, eta = 0.25.
    default, _, _ = policy_loss(logp, old, adv, mask)
    explicit, _, _ = policy_loss(logp, old, adv, mask, divergence="js", eta=0.25)
    assert default == explicit


def test_kl_penalty_and_entropy_bonus():
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -2.0]])
    ent = jnp.array([[0.3, 0.9]])
    mask = jnp.ones((1, 2), bool)
    adv = jnp.array([0.0])  # pg loss is then zero, leaving only the penalty terms
    k1 = np.array([0.5, 0.0])
    k2 = np.array([0.125, 0.0])
    k3 = np.array([math.exp(-0.5) + 0.5 - 1, 0.0])
    for estimator, kl in (("k1", k1), ("k2", k2), ("k3", k3)):
        num, den, m = policy_loss(
            logp, logp, adv, mask, loss="pg", ref_logp_bt=ref, kl_coef=0.1, kl_estimator=estimator
        )
        np.testing.assert_allclose(num / den, 0.1 * kl.mean(), rtol=1e-5)
        np.testing.assert_allclose(m["kl_ref"], kl.mean(), rtol=1e-5)
    num, den, m = policy_loss(logp, logp, adv, mask, loss="pg", entropy_bt=ent, entropy_coef=0.01)
    np.testing.assert_allclose(num / den, -0.01 * 0.6, rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], 0.6, rtol=1e-6)
    # Off by default: given arrays are only logged.
    num, _, m = policy_loss(logp, logp, adv, mask, loss="pg", ref_logp_bt=ref, entropy_bt=ent)
    assert num == 0 and "kl_ref" in m and "entropy" in m


def _random_batch(seed, b=6, t=5):
    rng = np.random.default_rng(seed)
    logp = jnp.asarray(rng.normal(-1.5, 0.7, (b, t)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.3, (b, t)), jnp.float32)
    adv = jnp.asarray(rng.normal(0, 1, b), jnp.float32)
    lengths = rng.integers(1, t + 1, b)
    mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None])
    ref = logp + jnp.asarray(rng.normal(0, 0.2, (b, t)), jnp.float32)
    ent = jnp.asarray(rng.uniform(0, 2, (b, t)), jnp.float32)
    return logp, old, adv, mask, ref, ent


CASES = [dict(loss=name) for name in LOSSES] + [
    dict(loss="lad", divergence="hellinger", ratio_level="sequence"),
    dict(loss="grpo", ratio_level="sequence", clip_eps_high=0.28),
    dict(loss="lad", kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_accumulation_equals_full_batch(case, aggregation):
    logp, old, adv, mask, ref, ent = _random_batch(2)
    kw = dict(case, aggregation=aggregation, max_length_norm=8.0)

    def numerator_and_denominator(x, rows):
        num, den, _ = policy_loss(
            x, old[rows], adv[rows], mask[rows], ref_logp_bt=ref[rows], entropy_bt=ent[rows], **kw
        )
        return num, den

    @jax.jit
    def gradients(x):
        everything = slice(None)
        full = jax.grad(lambda y: (lambda n, d: n / d)(*numerator_and_denominator(y, everything)))(x)
        num_grad, den = jax.grad(numerator_and_denominator, has_aux=True)(x, everything)
        parts = []
        for rows in (slice(0, 2), slice(2, 6)):  # two micro-batches: sum numerator grads and denominators
            parts.append(jax.grad(numerator_and_denominator, has_aux=True)(x[rows], rows))
        accumulated = jnp.concatenate([g for g, _ in parts]) / (parts[0][1] + parts[1][1])
        return full, accumulated, num_grad / den

    full, accumulated, num_grad_over_den = gradients(logp)
    assert float(jnp.max(jnp.abs(full))) > 1e-4
    np.testing.assert_allclose(accumulated, full, rtol=1e-5, atol=1e-7)
    # The denominator carries no gradient: grad(num / den) == grad(num) / den.
    np.testing.assert_allclose(num_grad_over_den, full, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_padding_changes_nothing(case):
    logp, old, adv, mask, ref, ent = _random_batch(3, b=4, t=4)
    garbage = jnp.array([jnp.nan, jnp.inf, -jnp.inf])[None, :].repeat(4, 0)

    def padded(x, fill):  # garbage in the padded slots of the real width and in three extra columns
        return jnp.concatenate([jnp.where(mask, x, fill), garbage], axis=1)

    big_mask = jnp.concatenate([mask, jnp.zeros((4, 3), bool)], axis=1)
    kw = dict(case, aggregation="seq-mean-token-mean")

    @jax.jit
    def both(x, x_big):
        g_base = jax.grad(lambda y: policy_loss(y, old, adv, mask, ref_logp_bt=ref, entropy_bt=ent, **kw)[0])(x)
        g_big = jax.grad(lambda y: policy_loss(y, padded(old, -1e30), adv, big_mask, ref_logp_bt=padded(ref, jnp.nan),
                                               entropy_bt=padded(ent, jnp.inf), **kw)[0])(x_big)
        out_base = policy_loss(x, old, adv, mask, ref_logp_bt=ref, entropy_bt=ent, **kw)
        out_big = policy_loss(x_big, padded(old, -1e30), adv, big_mask, ref_logp_bt=padded(ref, jnp.nan),
                              entropy_bt=padded(ent, jnp.inf), **kw)
        return out_base, out_big, g_base, g_big

    base, big, g_base, g_big = both(logp, padded(logp, 1e30))
    np.testing.assert_allclose(big[0], base[0], rtol=1e-6)
    assert big[1] == base[1]
    for key in base[2]:
        np.testing.assert_allclose(big[2][key], base[2][key], rtol=1e-6, err_msg=key)
    assert np.all(np.isfinite(g_big))
    np.testing.assert_allclose(g_big[:, :4], jnp.where(mask, g_base, 0), rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(g_big[:, 4:]), 0)
    np.testing.assert_array_equal(np.asarray(jnp.where(mask, 0, g_big[:, :4])), 0)


def test_policy_loss_jit_and_validation():
    logp, old, adv, mask, ref, ent = _random_batch(4)
    for loss, aggregation in zip(LOSSES, AGGREGATIONS):
        kw = dict(loss=loss, aggregation=aggregation, max_length_norm=6.0)
        num, den, metrics = jax.jit(functools.partial(policy_loss, **kw))(logp, old, adv, mask)
        ref_num, ref_den, _ = policy_loss(logp, old, adv, mask, **kw)
        np.testing.assert_allclose([num, den], [ref_num, ref_den], rtol=1e-5)
        assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())
    bad = [
        (dict(loss="ppo"), "'lad', 'grpo'"),
        (dict(divergence="chi2"), "'js'"),
        (dict(ratio_level="segment"), "'token', 'sequence'"),
        (dict(aggregation="mean"), "'token-mean'"),
        (dict(kl_estimator="k4"), "'k1', 'k2', 'k3'"),
        (dict(eta=0.0), "eta"),
        (dict(aggregation="seq-mean-token-sum-norm"), "max_length_norm"),
        (dict(kl_coef=0.1), "ref_logp_bt"),
        (dict(entropy_coef=0.1), "entropy_bt"),
        (dict(loss="grpo", clip_eps_low=1.5), "clip_eps_low"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            policy_loss(logp, old, adv, mask, **kwargs)
    with pytest.raises(ValueError, match="advantages_b"):
        policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="mask_bt"):
        policy_loss(logp, old, adv, mask[:, :2])

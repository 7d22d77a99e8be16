"""LAD f-divergence objective and the GRPO / GSPO / PG baselines: pure functions over arrays.

LAD (see ../shared/LAD.md) minimizes, for samples y ~ pi_old with advantage A,

    E[ exp(u) * f(x) ],   l = log pi_theta(y) - log pi_old(y),  u = A / eta,  x = exp(l - u).

Everything is float32 and computed in log space: ``exp(u) * f(x)`` is rewritten per generator so that no term
multiplies a huge number by a tiny one (``exp(u) * x == exp(l)``), and the derivative is supplied in closed form
(``d/dl = exp(l) f'(x)``) through ``jax.custom_jvp``. The closed form makes the stopping property exact: for the
strict generators (js, hellinger, tv, jeffreys) the gradient is exactly zero where ``l == u``. Values and
gradients are finite and accurate for |l|, |u| up to 50 (and further, until the true value leaves float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DIVERGENCES = ("js", "hellinger", "tv", "kl", "reverse_kl", "jeffreys")
LOSSES = ("lad", "grpo", "gspo", "pg")
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

_LOG2 = math.log(2.0)


def _choose(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}")


def _check_positive(name: str, value) -> None:
    """Checks concrete values; a traced value (e.g. eta swept under jit) cannot be inspected and passes."""
    if isinstance(value, jax.core.Tracer):
        return
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0 (got {value!r})")


def _exp_diff(l, u):
    """exp(l) - exp(u), as sign * exp(max) * (1 - exp(-|l - u|)): no cancellation, no needless overflow."""
    d = l - u
    return jnp.sign(d) * jnp.exp(jnp.maximum(l, u)) * -jnp.expm1(-jnp.abs(d))


def _log_two_sigmoid(d):
    """log(2 * sigmoid(d)) = log(2x / (x + 1)) with x = exp(d); exactly 0 at d = 0, accurate on both tails.

    Near zero it is log1p(tanh(d / 2)); for d <= -1 it is log 2 + log_sigmoid(d), which has no cancellation there.
    The clamps keep the branch that where() discards finite.
    """
    near = jnp.log1p(jnp.tanh(jnp.maximum(d, -1.0) * 0.5))
    far = _LOG2 + jax.nn.log_sigmoid(jnp.minimum(d, -1.0))
    return jnp.where(d > -1.0, near, far)


def _hellinger_dl(l, u):
    """0.5 * (exp(l) - exp((l + u) / 2)), written per sign of d so that the expm1 factor stays in (-1, 1)."""
    d = l - u
    pos = -0.5 * jnp.exp(l) * jnp.expm1(-0.5 * jnp.maximum(d, 0.0))
    neg = 0.5 * jnp.exp(0.5 * (l + u)) * jnp.expm1(0.5 * jnp.minimum(d, 0.0))
    return jnp.where(d >= 0.0, pos, neg)


def _terms(divergence: str, l, u):
    """(value, d value / d l, d value / d u) of exp(u) * f(exp(l - u)), all in closed form.

    d/dl = exp(l) f'(x);  d/du = exp(u) (f(x) - x f'(x)).
    """
    d = l - u
    if divergence == "js":  # f = 0.5 [x log(2x/(x+1)) + log(2/(x+1))]; symmetric in (l, u)
        a, b = _log_two_sigmoid(d), _log_two_sigmoid(-d)
        dl, du = 0.5 * jnp.exp(l) * a, 0.5 * jnp.exp(u) * b
        return dl + du, dl, du
    if divergence == "hellinger":  # f = 0.5 (sqrt(x) - 1)^2; symmetric in (l, u)
        value = 0.5 * jnp.exp(jnp.maximum(l, u)) * jnp.square(jnp.expm1(-0.5 * jnp.abs(d)))
        return value, _hellinger_dl(l, u), _hellinger_dl(u, l)
    if divergence == "tv":  # f = |x - 1|; subgradient 0 at x = 1
        value = jnp.exp(jnp.maximum(l, u)) * -jnp.expm1(-jnp.abs(d))
        s = jnp.sign(d)
        return value, s * jnp.exp(l), -s * jnp.exp(u)
    if divergence == "kl":  # f = x log x
        el = jnp.exp(l)
        return el * d, el * (d + 1.0), -el
    if divergence == "reverse_kl":  # f = -log x
        eu = jnp.exp(u)
        return -eu * d, -eu, eu * (1.0 - d)
    if divergence == "jeffreys":  # f = (x - 1) log x
        diff = _exp_diff(l, u)
        return diff * d, jnp.exp(l) * d + diff, -jnp.exp(u) * d - diff
    raise ValueError(f"divergence={divergence!r} is not supported; use one of {DIVERGENCES}")


def _make_objective(divergence: str):
    @jax.custom_jvp
    def objective(l, u):
        return _terms(divergence, l, u)[0]

    @objective.defjvp
    def objective_jvp(primals, tangents):
        l, u = primals
        tl, tu = tangents
        value, dl, du = _terms(divergence, l, u)
        return value, dl * tl + du * tu

    return objective


_OBJECTIVES = {name: _make_objective(name) for name in DIVERGENCES}


def lad_objective(log_ratio, advantage, *, eta: float, divergence: str = "js", log_ratio_clip: float | None = None):
    """Elementwise practical LAD loss ``exp(u) * f(exp(l - u))`` with ``l = log_ratio``, ``u = advantage / eta``.

    Args:
      log_ratio: log pi_theta - log pi_old (any shape); differentiable.
      advantage: broadcastable against ``log_ratio``; a constant in training (its gradient is still exact).
      eta: temperature > 0 (kappa = 1 / eta; the paper's math runs use kappa = 4, i.e. eta = 0.25).
      divergence: one of ``DIVERGENCES``; ``js`` (default), ``hellinger``, ``tv`` have ``f'(1) = 0`` (self-stopping),
        and so does ``jeffreys``; ``kl`` and ``reverse_kl`` do not.
      log_ratio_clip: optional c > 0; clamps l to [-c, c] first (zero gradient outside). This clamp is ours,
        not the paper's, and is off by default.
    Returns float32 loss with the broadcast shape of the inputs.
    """
    _choose("divergence", divergence, DIVERGENCES)
    _check_positive("eta", eta)
    l = jnp.asarray(log_ratio, jnp.float32)
    u = jnp.asarray(advantage, jnp.float32) / jnp.asarray(eta, jnp.float32)
    if log_ratio_clip is not None:
        _check_positive("log_ratio_clip", log_ratio_clip)
        l = jnp.clip(l, -log_ratio_clip, log_ratio_clip)
    l, u = jnp.broadcast_arrays(l, u)
    return _OBJECTIVES[divergence](l, u)


def _masked_mean(x_bt, mask_bt):
    x = jax.lax.stop_gradient(x_bt)
    return jnp.sum(jnp.where(mask_bt, x, 0.0)) / jnp.maximum(jnp.sum(mask_bt), 1).astype(jnp.float32)


def _sequence_broadcast(x_b, shape):
    """A per-sequence value carried by every token of its sequence."""
    return jnp.broadcast_to(x_b[:, None], shape)


def lad_token_loss(log_ratio_bt, seq_log_ratio_b, adv_bt, mask_bt, *, eta, divergence, ratio_level,
                   log_ratio_clip):
    """LAD per-token loss ``exp(u) f(exp(l - u))`` and its ``above_target_frac`` metric."""
    l_bt = log_ratio_bt if ratio_level == "token" else _sequence_broadcast(seq_log_ratio_b, log_ratio_bt.shape)
    loss_bt = lad_objective(l_bt, adv_bt, eta=eta, divergence=divergence, log_ratio_clip=log_ratio_clip)
    above_bt = l_bt > adv_bt / jnp.asarray(eta, jnp.float32)
    return loss_bt, {"above_target_frac": _masked_mean(above_bt.astype(jnp.float32), mask_bt)}


def clipped_surrogate_loss(l_bt, adv_bt, mask_bt, *, clip_eps_low, clip_eps_high):
    """PPO-clipped surrogate ``-min(r A, clip(r) A)`` with ``r = exp(l_bt)`` (GRPO / DAPO / GSPO) and ``clip_frac``."""
    ratio = jnp.exp(l_bt)
    clipped = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    surrogate = jnp.minimum(ratio * adv_bt, clipped * adv_bt)
    is_clipped = ((adv_bt > 0) & (ratio > 1.0 + clip_eps_high)) | ((adv_bt < 0) & (ratio < 1.0 - clip_eps_low))
    return -surrogate, {"clip_frac": _masked_mean(is_clipped.astype(jnp.float32), mask_bt)}


def grpo_token_loss(log_ratio_bt, seq_log_ratio_b, adv_bt, mask_bt, *, ratio_level, clip_eps_low, clip_eps_high):
    """GRPO: clipped surrogate on the token (or whole-sequence) ratio."""
    l_bt = log_ratio_bt if ratio_level == "token" else _sequence_broadcast(seq_log_ratio_b, log_ratio_bt.shape)
    return clipped_surrogate_loss(l_bt, adv_bt, mask_bt, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)


def gspo_token_loss(log_ratio_bt, seq_log_ratio_b, length_b, adv_bt, mask_bt, *, clip_eps_low, clip_eps_high):
    """GSPO: clipped surrogate on the sequence geometric-mean ratio."""
    mean_b = seq_log_ratio_b / jnp.maximum(length_b, 1).astype(jnp.float32)
    l_bt = _sequence_broadcast(mean_b, log_ratio_bt.shape)
    return clipped_surrogate_loss(l_bt, adv_bt, mask_bt, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)


def pg_token_loss(logp_bt, adv_bt):
    """REINFORCE ``-A log pi`` (the advantage is already baseline-corrected)."""
    return -adv_bt * logp_bt, {}


def regularized_token_loss(loss_bt, logp_bt, mask_bt, *, ref_logp_bt, kl_coef, kl_estimator, entropy_bt,
                           entropy_coef):
    """Adds the optional KL-to-reference penalty and entropy bonus; their means are metrics whenever given."""
    metrics = {}
    if ref_logp_bt is not None:
        ref = jax.lax.stop_gradient(jnp.where(mask_bt, jnp.asarray(ref_logp_bt, jnp.float32), 0.0))
        delta = ref - logp_bt
        if kl_estimator == "k1":
            kl_bt = -delta
        elif kl_estimator == "k2":
            kl_bt = 0.5 * jnp.square(delta)
        else:  # k3
            kl_bt = jnp.expm1(delta) - delta
        metrics["kl_ref"] = _masked_mean(kl_bt, mask_bt)
        if kl_coef != 0.0:
            loss_bt = loss_bt + jnp.float32(kl_coef) * kl_bt
    if entropy_bt is not None:
        entropy = jnp.where(mask_bt, jnp.asarray(entropy_bt, jnp.float32), 0.0)
        metrics["entropy"] = _masked_mean(entropy, mask_bt)
        if entropy_coef != 0.0:
            loss_bt = loss_bt - jnp.float32(entropy_coef) * entropy
    return loss_bt, metrics


def aggregate(loss_bt, mask_bt, length_b, *, aggregation, max_length_norm):
    """(numerator, denominator) of the aggregated loss; padding is zeroed and the denominator has no gradient."""
    loss_bt = jnp.where(mask_bt, loss_bt, 0.0)
    has_tokens_b = (length_b > 0).astype(jnp.float32)
    if aggregation == "token-mean":
        numerator = jnp.sum(loss_bt)
        denominator = jnp.sum(length_b).astype(jnp.float32)
    elif aggregation == "seq-mean-token-mean":
        numerator = jnp.sum(jnp.sum(loss_bt, axis=1) / jnp.maximum(length_b, 1).astype(jnp.float32))
        denominator = jnp.sum(has_tokens_b)
    elif aggregation == "seq-mean-token-sum":
        numerator = jnp.sum(loss_bt)
        denominator = jnp.sum(has_tokens_b)
    else:  # seq-mean-token-sum-norm
        numerator = jnp.sum(loss_bt) / jnp.float32(max_length_norm)
        denominator = jnp.sum(has_tokens_b)
    return numerator, jax.lax.stop_gradient(denominator)


def policy_loss(
    logp_bt,
    old_logp_bt,
    advantages_b,
    mask_bt,
    *,
    loss: str = "lad",
    divergence: str = "js",
    eta: float = 0.25,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
    max_length_norm: float | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    log_ratio_clip: float | None = None,
    ref_logp_bt=None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_bt=None,
    entropy_coef: float = 0.0,
):
    """Policy loss for one (micro-)batch of responses: returns ``(numerator, denominator, metrics)``.

    The loss is ``numerator / denominator``. The denominator (token or sequence count) carries no gradient and both
    parts are sums over rows, so for micro-batches ``sum(grad numerator_i) / sum(denominator_i)`` is exactly the
    gradient of one big batch: accumulate numerators (or their gradients) and denominators, divide once.

    Args:
      logp_bt: float [b, t] log pi_theta of the response tokens (differentiable).
      old_logp_bt: float [b, t] behaviour log-probs (pi_old; treated as constants).
      advantages_b: float [b] sequence advantage, broadcast to every token of the response.
      mask_bt: [b, t] True on response tokens; padding and prompt tokens are False and change nothing.
      loss: ``lad`` (default), ``grpo`` (PPO-clipped surrogate; DAPO clip-higher = ``clip_eps_high=0.28``),
        ``gspo`` (sequence geometric-mean ratio, clipped; the GSPO paper uses eps 3e-4 / 4e-4), ``pg`` (REINFORCE
        ``-A log pi`` with the advantage as baseline-corrected return).
      divergence, eta, log_ratio_clip: LAD generator, temperature and optional clamp (see ``lad_objective``).
      ratio_level: for ``lad`` and ``grpo``: ``token`` (default; per-token log-ratio) or ``sequence`` (sum of token
        log-ratios, whose per-sequence loss is carried by every token of the sequence). ``gspo`` always uses the
        sequence geometric mean and ``pg`` has no ratio, so neither reads it.
      aggregation: ``token-mean`` (default; sum over all tokens / token count), ``seq-mean-token-mean``,
        ``seq-mean-token-sum`` or ``seq-mean-token-sum-norm`` (Dr. GRPO: token sum / ``max_length_norm``, mean over
        sequences). Sequence counts include only rows with at least one response token.
      ref_logp_bt, kl_coef, kl_estimator: optional per-token KL-to-reference penalty (``k1 = logp - ref``,
        ``k2 = (logp - ref)^2 / 2`` or ``k3 = exp(ref - logp) - (ref - logp) - 1``), off by default. k2 and k3 have
        zero value and zero gradient where ``logp == ref``; k1 has zero value there but gradient ``grad logp``
        (zero only in expectation over samples from pi_theta).
      entropy_bt, entropy_coef: optional entropy bonus (subtracts ``entropy_coef * entropy``), off by default.
    Metrics (float32 scalars, no gradient, means over response tokens): ``loss``, ``ratio_mean`` (token ratio
    pi_theta / pi_old), ``approx_kl`` (k3 estimate of KL(pi_old || pi_theta)); ``above_target_frac`` (lad: ratio
    above its target exp(A / eta)); ``clip_frac`` (grpo, gspo); ``kl_ref`` and ``entropy`` when given.
    """
    _choose("loss", loss, LOSSES)
    _choose("ratio_level", ratio_level, RATIO_LEVELS)
    _choose("aggregation", aggregation, AGGREGATIONS)
    _choose("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if loss == "lad":
        _choose("divergence", divergence, DIVERGENCES)
        _check_positive("eta", eta)
    if loss in ("grpo", "gspo") and not (0.0 <= clip_eps_low < 1.0 and clip_eps_high >= 0.0):
        raise ValueError(
            f"clip_eps_low must be in [0, 1) and clip_eps_high >= 0 (got {clip_eps_low}, {clip_eps_high})"
        )
    if aggregation == "seq-mean-token-sum-norm":
        if max_length_norm is None:
            raise ValueError(
                "aggregation='seq-mean-token-sum-norm' needs max_length_norm (e.g. the max response length)"
            )
        _check_positive("max_length_norm", max_length_norm)
    if kl_coef != 0.0 and ref_logp_bt is None:
        raise ValueError("kl_coef != 0 needs ref_logp_bt (reference-model log-probs); pass it or set kl_coef=0")
    if entropy_coef != 0.0 and entropy_bt is None:
        raise ValueError("entropy_coef != 0 needs entropy_bt (per-token entropies); pass it or set entropy_coef=0")

    logp_bt = jnp.asarray(logp_bt, jnp.float32)
    shape = logp_bt.shape
    if logp_bt.ndim != 2:
        raise ValueError(f"logp_bt must be [batch, time], got shape {shape}")
    named = {"old_logp_bt": old_logp_bt, "mask_bt": mask_bt, "ref_logp_bt": ref_logp_bt, "entropy_bt": entropy_bt}
    for name, array in named.items():
        if array is not None and jnp.shape(array) != shape:
            raise ValueError(f"{name} has shape {jnp.shape(array)}; it must match logp_bt {shape}")
    if jnp.shape(advantages_b) != shape[:1]:
        raise ValueError(f"advantages_b has shape {jnp.shape(advantages_b)}; it must be [batch] = {shape[:1]}")

    mask = jnp.asarray(mask_bt).astype(bool)
    # Sanitize padding first so that garbage there (inf, NaN) can reach neither the loss nor the gradient.
    logp = jnp.where(mask, logp_bt, 0.0)
    old = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(old_logp_bt, jnp.float32), 0.0))
    adv_b = jax.lax.stop_gradient(jnp.asarray(advantages_b, jnp.float32))
    adv_bt = jnp.broadcast_to(adv_b[:, None], shape)
    length_b = jnp.sum(mask, axis=1)
    log_ratio_bt = logp - old
    seq_log_ratio_b = jnp.sum(log_ratio_bt, axis=1)

    if loss == "lad":
        loss_bt, metrics = lad_token_loss(log_ratio_bt, seq_log_ratio_b, adv_bt, mask, eta=eta,
                                          divergence=divergence, ratio_level=ratio_level,
                                          log_ratio_clip=log_ratio_clip)
    elif loss == "grpo":
        loss_bt, metrics = grpo_token_loss(log_ratio_bt, seq_log_ratio_b, adv_bt, mask, ratio_level=ratio_level,
                                           clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
    elif loss == "gspo":
        loss_bt, metrics = gspo_token_loss(log_ratio_bt, seq_log_ratio_b, length_b, adv_bt, mask,
                                           clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
    else:
        loss_bt, metrics = pg_token_loss(logp, adv_bt)
    loss_bt, extra = regularized_token_loss(loss_bt, logp, mask, ref_logp_bt=ref_logp_bt, kl_coef=kl_coef,
                                            kl_estimator=kl_estimator, entropy_bt=entropy_bt,
                                            entropy_coef=entropy_coef)
    metrics = {**metrics, **extra}
    numerator, denominator = aggregate(loss_bt, mask, length_b, aggregation=aggregation,
                                       max_length_norm=max_length_norm)

    metrics["loss"] = jax.lax.stop_gradient(numerator) / jnp.maximum(denominator, 1.0)
    metrics["ratio_mean"] = _masked_mean(jnp.exp(log_ratio_bt), mask)
    metrics["approx_kl"] = _masked_mean(jnp.expm1(log_ratio_bt) - log_ratio_bt, mask)
    return numerator, denominator, metrics

"""Group-relative advantages from rewards shaped [num_prompts, G] and zero-signal accounting.

A group whose rewards are all equal carries no learning signal: its advantages are exactly zero for every method
(never NaN, never rounding noise divided by eps), and ``zero_signal_groups`` reports such groups so the trainer can
log and optionally filter them.
"""

from __future__ import annotations

import jax.numpy as jnp

METHODS = ("grpo", "drgrpo", "rloo")


def zero_signal_groups(rewards_pg):
    """Returns ``(no_signal_p, count)``: bool [p] True where all G rewards of a prompt are equal, and int32 count."""
    rewards = _as_rewards(rewards_pg)
    no_signal = jnp.max(rewards, axis=1) == jnp.min(rewards, axis=1)
    return no_signal, jnp.sum(no_signal).astype(jnp.int32)


def group_advantages(rewards_pg, *, method: str = "grpo", normalize_std: bool | None = None, eps: float = 1e-6):
    """Float32 advantages [p, G] from rewards [p, G].

    Methods:
      ``grpo``: (r - mean) / (std + eps), std the unbiased (ddof=1, as in TRL and verl) group standard deviation;
        ``normalize_std=False`` keeps only the mean baseline.
      ``drgrpo``: r - mean (Dr. GRPO: no std division; ``normalize_std=True`` is rejected).
      ``rloo``: r_i - mean of the other G - 1 rewards = G / (G - 1) * (r_i - mean); ``normalize_std=True`` also
        divides by (std + eps). Needs G >= 2.
    ``normalize_std=None`` means the method's own default (True for grpo, False otherwise).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {', '.join(map(repr, METHODS))}")
    if normalize_std is None:
        normalize_std = method == "grpo"
    if method == "drgrpo" and normalize_std:
        raise ValueError("method='drgrpo' is mean-only by definition; use method='grpo' to divide by the std")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0 (got {eps})")
    rewards = _as_rewards(rewards_pg)
    group = rewards.shape[1]
    if method == "rloo" and group < 2:
        raise ValueError(f"method='rloo' needs at least 2 samples per group, got G={group}")

    mean = jnp.mean(rewards, axis=1, keepdims=True)
    centered = rewards - mean
    if method == "rloo":
        centered = centered * (group / (group - 1))
    if normalize_std:
        var = jnp.sum(jnp.square(rewards - mean), axis=1, keepdims=True) / max(group - 1, 1)
        centered = centered / (jnp.sqrt(var) + jnp.float32(eps))
    no_signal, _ = zero_signal_groups(rewards)
    return jnp.where(no_signal[:, None], 0.0, centered).astype(jnp.float32)


def _as_rewards(rewards_pg):
    rewards = jnp.asarray(rewards_pg, jnp.float32)
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards_pg must be [num_prompts, G] with G >= 1, got shape {rewards.shape}")
    return rewards

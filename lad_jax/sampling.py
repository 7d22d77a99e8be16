"""Sampling methods: small frozen dataclasses plus the jittable next-token draw.

A `Sampling` splits into a static `SamplingMode` (which code paths exist: greedy or not, top-k on or off, top-p on or
off) and traced `SamplingParams` (the values), so a new temperature / top-k / top-p does not recompile the sampler.

Log-prob convention (DESIGN.md): the behaviour log-prob of a sampled token is the full-vocabulary
`log_softmax(logits / temperature)` at that token, whatever top-k / top-p truncation was used to draw it; greedy
decoding reports `log_softmax(logits)` (temperature 1). The trainer recomputes exactly this quantity for pi_theta.

Why no sort: XLA's CPU sort of a 32k vocabulary costs ~100 ms per step, far more than the decode step itself. Top-k
and top-p thresholds are instead found by a 31-step bisection over the bit patterns of the (non-negative float32)
probabilities, which orders them exactly like the floats; each step is one compare-and-reduce over the vocabulary.
Draws use the inverse CDF (one uniform per row) rather than Gumbel noise (one uniform and two logs per vocab entry),
in two levels (`inverse_cdf`): a running sum over the whole vocabulary is the slowest op of a draw on XLA:CPU.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

_INF_BITS = 0x7F800000  # bit pattern of +inf in float32; every finite non-negative float is below it
_BISECT_STEPS = 31  # ceil(log2(_INF_BITS + 1))
_CDF_BLOCK = 128  # inverse-CDF block: vocab / block block sums, then one block's running sum


class SamplingMode(NamedTuple):
    """The static (compile-time) part of a sampling method."""

    greedy: bool
    top_k: bool
    top_p: bool


@struct.dataclass
class SamplingParams:
    """The traced (run-time) part of a sampling method: scalars, so new values do not recompile."""

    temperature: jax.Array  # float32[]
    top_k: jax.Array  # int32[]
    top_p: jax.Array  # float32[]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Temperature / top-k / top-p sampling, combinable; `temperature=0` is greedy decoding.

    top_k=0 and top_p=1.0 switch the truncation off (no truncation code is compiled then). Truncation is applied in
    the usual order: temperature, then top-k, then top-p on the renormalized top-k distribution. Tokens tied with the
    last kept probability are all kept.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"Sampling.top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.temperature == 0.0 and (self.top_k or self.top_p < 1.0):
            raise ValueError(
                "Sampling: greedy decoding (temperature=0) ignores top_k/top_p; leave them at 0 / 1.0 "
                f"(got top_k={self.top_k}, top_p={self.top_p})"
            )

    @classmethod
    def greedy(cls) -> "Sampling":
        return cls(temperature=0.0)

    @property
    def mode(self) -> SamplingMode:
        return SamplingMode(greedy=self.temperature == 0.0, top_k=self.top_k > 0, top_p=self.top_p < 1.0)

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=jnp.asarray(self.temperature if self.temperature > 0 else 1.0, jnp.float32),
            top_k=jnp.asarray(self.top_k, jnp.int32),
            top_p=jnp.asarray(self.top_p, jnp.float32),
        )


def _smallest_passing_threshold(pred, hi_b: jax.Array) -> jax.Array:
    """Smallest float t >= 0 with pred(t) true, per row, given pred monotone (false -> true) and pred(hi) true."""

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = pred(jax.lax.bitcast_convert_type(mid, jnp.float32)[:, None])
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.zeros_like(hi_b)
    _, hi = jax.lax.fori_loop(0, _BISECT_STEPS, body, (lo, hi_b))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)[:, None]


def _tempered(logits_bv: jax.Array, params: SamplingParams):
    """(z = logits / T in float32, its row max [b, 1], e = exp(z - max): the unnormalized full-vocab probabilities)."""
    z_bv = logits_bv.astype(jnp.float32) / params.temperature
    max_b1 = jnp.max(z_bv, axis=-1, keepdims=True)
    return z_bv, max_b1, jnp.exp(z_bv - max_b1)


def _truncate(q_bv: jax.Array, params: SamplingParams, mode: SamplingMode) -> jax.Array:
    """Zero the probabilities top-k / top-p drop (the thresholds do not depend on q's normalization)."""
    if mode.top_k or mode.top_p:
        hi_b = jax.lax.bitcast_convert_type(jnp.max(q_bv, axis=-1), jnp.int32)
    if mode.top_k:
        # keep q >= t where t is the smallest value with fewer than k probabilities strictly above it
        t = _smallest_passing_threshold(
            lambda t: jnp.sum(q_bv > t, axis=-1) < params.top_k, hi_b
        )
        q_bv = jnp.where(q_bv >= t, q_bv, 0.0)
    if mode.top_p:
        # keep q >= t where t is the smallest value whose strictly-larger mass is below top_p (of the kept mass)
        target_b = params.top_p * jnp.sum(q_bv, axis=-1)
        t = _smallest_passing_threshold(
            lambda t: jnp.sum(jnp.where(q_bv > t, q_bv, 0.0), axis=-1) < target_b, hi_b
        )
        q_bv = jnp.where(q_bv >= t, q_bv, 0.0)
    return q_bv


def truncated_probs(logits_bv: jax.Array, params: SamplingParams, mode: SamplingMode):
    """(unnormalized probabilities actually sampled from [b, v], full-vocab log-probs [b, v]) for a non-greedy mode."""
    z_bv, max_b1, e_bv = _tempered(logits_bv, params)
    logp_bv = z_bv - max_b1 - jnp.log(jnp.sum(e_bv, axis=-1, keepdims=True))
    return _truncate(e_bv, params, mode), logp_bv


def inverse_cdf(q_bv: jax.Array, uniform_b: jax.Array, block: int = _CDF_BLOCK) -> jax.Array:
    """Per row, the first index whose cumulative weight reaches `(1 - u) * sum(q)`: a draw from q / sum(q).

    `q_bv` >= 0 with a positive sum per row; `uniform_b` in [0, 1). The index returned always has q > 0.
    Two levels (block sums, then one block) instead of a cumulative sum over the whole vocabulary, which XLA:CPU
    runs ~7x slower than the rest of the draw.
    """
    b, v = q_bv.shape
    nb = -(-v // block)
    q_bnk = jnp.pad(q_bv, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    cum_bn = jnp.cumsum(jnp.sum(q_bnk, axis=-1), axis=-1)
    # u in (0, total]: cum is nondecreasing and rises only where q > 0, so the first index reaching u has q > 0
    u_b = (1.0 - uniform_b) * cum_bn[:, -1]
    blk_b = jnp.minimum(jnp.sum(cum_bn < u_b[:, None], axis=-1), nb - 1)
    before_b = jnp.where(blk_b > 0, jnp.take_along_axis(cum_bn, jnp.maximum(blk_b - 1, 0)[:, None], -1)[:, 0], 0.0)
    q_bk = jnp.take_along_axis(q_bnk, blk_b[:, None, None], axis=1)[:, 0]
    cum_bk = before_b[:, None] + jnp.cumsum(q_bk, axis=-1)
    iota_k = jnp.arange(block, dtype=jnp.int32)
    # rounding can leave the block's own running sum a hair below u: fall back to its last positive entry
    last_b = jnp.max(jnp.where(q_bk > 0, iota_k, 0), axis=-1)
    within_b = jnp.minimum(jnp.sum(cum_bk < u_b[:, None], axis=-1), last_b)
    return (blk_b * block + within_b).astype(jnp.int32)


def sample_tokens(logits_bv: jax.Array, keys_b: jax.Array, params: SamplingParams, mode: SamplingMode):
    """Draw one token per row. Returns (tokens int32[b], behaviour log-probs float32[b]).

    keys_b: one typed PRNG key per row (each row's stream is independent of the others).
    """
    uniform_b = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_b)
    return sample_tokens_from_uniform(logits_bv, uniform_b, params, mode)


def sample_tokens_from_uniform(logits_bv: jax.Array, uniform_b: jax.Array, params: SamplingParams,
                               mode: SamplingMode):
    """`sample_tokens` given each row's U[0, 1) draw (the sampler draws a whole response's noise up front)."""
    logits_bv = logits_bv.astype(jnp.float32)
    if mode.greedy:
        max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
        # first index of the max (= jnp.argmax); XLA:CPU's variadic argmax reduce is ~15x slower than this
        iota_v = jnp.arange(logits_bv.shape[-1], dtype=jnp.int32)
        tokens_b = jnp.min(jnp.where(logits_bv == max_b1, iota_v, logits_bv.shape[-1] - 1), axis=-1)
        # the argmax token's logit is the row max, so no gather is needed
        logp_b = max_b1[:, 0] - jax.nn.logsumexp(logits_bv, axis=-1)
        return tokens_b, logp_b
    z_bv, max_b1, e_bv = _tempered(logits_bv, params)
    tokens_b = inverse_cdf(_truncate(e_bv, params, mode), uniform_b)
    # only the drawn token's log-prob is needed: no [b, v] log-softmax is materialized
    log_norm_b = max_b1[:, 0] + jnp.log(jnp.sum(e_bv, axis=-1))
    logp_b = jnp.take_along_axis(z_bv, tokens_b[:, None], axis=-1)[:, 0] - log_norm_b
    return tokens_b, logp_b

"""Token log-probs without materialising `[b, t, v]` float32 logits: the head runs per sequence chunk."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lad_jax.models.attention import SlotMask
from lad_jax.models.transformer import project


def logprobs_from_logits(logits_btv, targets_bt, temperature: float = 1.0, *, return_entropy: bool = False):
    """float32 log_softmax(logits / temperature)[target] (and the entropy of that distribution)."""
    z = logits_btv.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = jnp.take_along_axis(z, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0] - lse
    if not return_entropy:
        return logp
    probs = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(probs * z, axis=-1)
    return logp, entropy


def chunked_head_logprobs(hidden_btd, w, tied: bool, dtype, targets_bt, *, temperature: float = 1.0,
                          chunk_size: int = 256, return_entropy: bool = False):
    """Apply the output head and log-softmax per chunk of `chunk_size` positions (lax.map + jax.checkpoint, so
    neither the forward nor the backward pass keeps more than one chunk of logits)."""
    b, t, d = hidden_btd.shape
    chunk = max(1, min(int(chunk_size), t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    h_nbcd = hidden_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
    tgt_nbc = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h_bcd, tgt_bc = args
        logits = project(h_bcd, w, tied, dtype)
        return logprobs_from_logits(logits, tgt_bc, temperature, return_entropy=True)

    logp_nbc, ent_nbc = jax.lax.map(one, (h_nbcd, tgt_nbc))
    logp = logp_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    if not return_entropy:
        return logp
    return logp, ent_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def token_logprobs(model, tokens_bt, positions_bt, mask, targets_bt, *, temperature: float = 1.0,
                   chunk_size: int = 256, return_entropy: bool = False):
    """float32 `[b, t]` log_softmax(logits / temperature)[targets] for `model` (differentiable).

    `mask`: a `SlotMask` (the kernel follows `model.config.attention`) or a bool `[b, t, t]` (dense attention).
    With `return_entropy=True` returns `(logp_bt, entropy_bt)`; entropy is of the same tempered distribution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if isinstance(mask, SlotMask):
        hidden_btd, _ = model.hidden(tokens_bt, positions_bt, mask=mask)
    else:
        hidden_btd, _ = model.hidden(tokens_bt, positions_bt, mask_bts=mask)
    w, tied = model.head_weight()
    return chunked_head_logprobs(hidden_btd, w, tied, model.config.jnp_dtype, targets_bt,
                                 temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy)

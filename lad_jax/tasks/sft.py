"""Supervised warm-start for the numbers task: next-token cross-entropy on (prompt, answer + EOS) pairs.

The generated answers (`numbers.sft_examples`) mix correct numbers drawn from a fixed, skewed (Zipf) preference
per prompt with near misses (digit sum off by one), in the share `task.sft_correct_fraction`. The warm-started
policy is therefore only moderately accurate and already prefers some correct answers to others: the starting
point where RL either keeps the spread among correct answers (LAD) or concentrates it on the favourites (GRPO).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lad_jax.tasks import numbers
from lad_jax.train_step import sequence_logprobs


def encode_pairs(tokenizer, pairs, length: int):
    """Right-padded [b, length] tokens / positions / valid and a target mask over answer + EOS tokens."""
    b = len(pairs)
    cache: dict[tuple[str, bool], list[int]] = {}  # batches repeat few distinct strings; tokenize each once

    def encode(text: str, special: bool) -> list[int]:
        key = (text, special)
        if key not in cache:
            cache[key] = tokenizer(text, add_special_tokens=special)["input_ids"]
        return cache[key]

    tokens = np.full((b, length), tokenizer.pad_token_id, np.int32)
    target = np.zeros((b, length), bool)
    for i, (prompt, answer) in enumerate(pairs):
        p = encode(prompt, True)
        a = encode(answer, False) + [tokenizer.eos_token_id]
        ids = (p + a)[:length]
        tokens[i, :len(ids)] = ids
        target[i, len(p):len(ids)] = True
    valid = tokens != tokenizer.pad_token_id
    valid[:, 0] = True
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    return tokens, positions, valid, target


def warm_start(graphdef, params, tokenizer, *, steps: int, batch_size: int, lr: float, correct_fraction: float,
               seed: int, length: int = 8, log=print):
    """Returns trained params (host numpy arrays, same pytree as `params`) and the final loss.

    The warm-start is a small supervised prelude for the built-in task's small models, so it runs on one device,
    replicated on every host: no cross-device reduction, whose summation order would depend on the device layout,
    so it gives bit-identical weights on 1 process x 8 devices and 2 processes x 4 (Adam turns last-bit gradient
    differences into learning-rate-sized steps)."""
    from lad_jax import distributed

    device = jax.local_devices()[0]
    params = jax.device_put(jax.tree.map(distributed.to_host, params), device)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), max(steps, 2), lr * 0.1))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens, positions, valid, target):
        def loss_fn(p):
            logp, _ = sequence_logprobs(graphdef, p, tokens, positions, valid, temperature=1.0)
            return -jnp.sum(jnp.where(target, logp, 0.0)) / jnp.maximum(jnp.sum(target), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    loss = float("nan")
    for i in range(steps):
        pairs = numbers.sft_examples(rng, batch_size, correct_fraction)
        batch = jax.device_put(encode_pairs(tokenizer, pairs, length), device)
        params, opt_state, loss = step(params, opt_state, *batch)
        if log is not None and (i + 1) % max(steps // 4, 1) == 0:
            log(f"warm-start step {i + 1}/{steps}: loss {float(loss):.3f}")
    return jax.device_get(params), float(loss)

"""One RL step's experience: prompts -> G samples -> rewards -> group advantages -> train minibatches.

`collect` runs the sampler on the current policy and scores the responses; `Experience` holds host arrays laid out
for `train_step` (prompt slots then response slots; see train_step.py) plus the rollout metrics; `minibatches`
cuts it into `mu` shuffled passes of `[n_micro, m, t]` minibatches, deterministic in (seed, step).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from lad_jax import advantages as adv_lib
from lad_jax import decode_memory, distributed, sampler, sampler_continuous
from lad_jax.config import Config
from lad_jax.train_step import REF_KEY

MINIBATCH_FIELDS = ("tokens_bt", "positions_bt", "valid_bt", "response_bt", "old_logp_bt", "advantages_b")
REF_FIELD = REF_KEY  # only with algorithm.kl_coef > 0: the frozen reference policy's log-probs


@dataclasses.dataclass
class Experience:
    arrays: dict[str, np.ndarray]  # MINIBATCH_FIELDS (+ REF_FIELD), rows grouped by prompt (G consecutive rows)
    completions: list[str]
    rewards: np.ndarray  # [B]
    no_signal_p: np.ndarray  # bool [P]: all G rewards of the prompt equal (zero advantage, no learning signal)
    metrics: dict[str, float]


def prompt_bucket(c: Config) -> int:
    """Fixed prompt slot count (a power of two >= data.max_prompt_tokens), so shapes never change."""
    return sampler.bucket_length(c.data.max_prompt_tokens, minimum=1)


def resolve_decode_slots(c: Config, model_config, mesh, params=None) -> decode_memory.SlotChoice:
    """rollout.decode_slots as a choice: `auto` sized against the memory free now (less the rollout's copy of
    `params`, the model's weights), a number taken as given."""
    if c.rollout.decode_slots == "auto":
        return decode_memory.for_rollout(c, model_config, mesh, decode_memory.free_bytes_per_device(), params)
    return dataclasses.replace(decode_memory.for_rollout(c, model_config, mesh, None), slots=c.rollout.decode_slots)


def layout(prompt_tokens_bs, prompt_lengths_b, tokens_bt, logprobs_bt, lengths_b) -> dict[str, np.ndarray]:
    """Sampler output (left-padded prompt, response) -> train-step arrays over [prompt slots | response slots]."""
    b, s = prompt_tokens_bs.shape
    n = tokens_bt.shape[1]
    prompt_valid = np.arange(s)[None, :] >= (s - prompt_lengths_b[:, None])
    resp_valid = np.arange(n)[None, :] < lengths_b[:, None]
    positions = np.concatenate([np.maximum(np.cumsum(prompt_valid, 1) - 1, 0),
                                prompt_lengths_b[:, None] + np.arange(n)[None, :]], axis=1)
    return {
        "tokens_bt": np.concatenate([prompt_tokens_bs, tokens_bt], 1).astype(np.int32),
        "positions_bt": positions.astype(np.int32),
        "valid_bt": np.concatenate([prompt_valid, resp_valid], 1),
        "response_bt": np.concatenate([np.zeros((b, s), bool), resp_valid], 1),
        "old_logp_bt": np.concatenate([np.zeros((b, s), np.float32), np.where(resp_valid, logprobs_bt, 0.0)],
                                      1).astype(np.float32),
    }


def decode(tokenizer, responses: Sequence[Sequence[int]]) -> list[str]:
    return tokenizer.batch_decode([list(r) for r in responses], skip_special_tokens=True)


def collect(c: Config, model, rows: list[dict[str, Any]], tokenizer, reward_fn: Callable, *, key, mesh,
            stop_ids: Sequence[int], recompute: Callable | None = None,
            reference: Callable | None = None, decode_slots: int | None = None) -> Experience:
    """Samples G responses per prompt row, scores them and computes group advantages.

    `recompute` / `reference`: `(tokens_bt, positions_bt, valid_bt) -> logp_bt` of the current / the frozen
    reference policy; the first replaces the sampler's old log-probs, the second (given only when
    algorithm.kl_coef > 0, so a run without the KL term pays nothing) fills `ref_logp_bt`.

    `decode_slots`: 0 = static batches, N = continuous batching over N slots; default rollout.decode_slots, its
    `auto` resolved now (`decode_memory.for_rollout`; the trainer resolves it once and passes the number).

    Several processes: every process passes the same global `rows` and gets the same global `Experience` (the
    sampler gathers its output to every host; each host scores a share of the rows, see `distributed.score_rows`).
    """
    r, g = c.rollout, c.rollout.num_samples
    t0 = time.perf_counter()
    kw = dict(max_new_tokens=r.max_new_tokens, num_samples=g, temperature=r.temperature, top_k=r.top_k,
              top_p=r.top_p, stop_token_ids=stop_ids, seed=key, pad_id=tokenizer.pad_token_id,
              min_prompt_bucket=prompt_bucket(c), mesh=mesh)
    prompts = [row["prompt_ids"] for row in rows]
    if decode_slots is None:
        decode_slots = resolve_decode_slots(c, model.config, mesh, nnx.state(model, nnx.Param)).slots
    if decode_slots:
        out = sampler_continuous.generate_continuous(model, prompts, decode_slots=decode_slots, **kw)
    else:
        out = sampler.generate(model, prompts, **kw)
    host = jax.device_get({"pt": out.prompt_tokens_bs, "pl": out.prompt_lengths_b, "t": out.tokens_bt,
                           "lp": out.logprobs_bt, "n": out.lengths_b, "stop": out.stopped_b})
    t1 = time.perf_counter()
    completions = decode(tokenizer, [host["t"][i, :host["n"][i]] for i in range(len(host["n"]))])
    rows_b = [rows[i // g] for i in range(len(completions))]
    rewards, reward_metrics = distributed.score_rows(reward_fn, completions, rows_b, num_tokens=np.asarray(host["n"]))
    rewards_pg = rewards.reshape(len(rows), g)
    adv_pg = np.asarray(adv_lib.group_advantages(rewards_pg, method=c.algorithm.advantage,
                                                 eps=c.algorithm.advantage_eps))
    no_signal = np.asarray(adv_lib.zero_signal_groups(rewards_pg)[0])
    t2 = time.perf_counter()
    arrays = layout(host["pt"], host["pl"], host["t"], host["lp"], host["n"])
    if recompute is not None:
        fresh = np.asarray(recompute(arrays["tokens_bt"], arrays["positions_bt"], arrays["valid_bt"]))
        arrays["old_logp_bt"] = np.where(arrays["response_bt"], fresh, 0.0).astype(np.float32)
    if reference is not None:
        ref = np.asarray(reference(arrays["tokens_bt"], arrays["positions_bt"], arrays["valid_bt"]))
        arrays[REF_FIELD] = np.where(arrays["response_bt"], ref, 0.0).astype(np.float32)
    arrays["advantages_b"] = adv_pg.reshape(-1).astype(np.float32)
    lengths = np.asarray(host["n"])
    resp = arrays["response_bt"]
    metrics = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()),
        "rollout/accuracy": float((rewards >= c.reward.correct_threshold).mean()),
        "rollout/zero_signal_frac": float(no_signal.mean()),
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/clip_frac_max_tokens": float((~np.asarray(host["stop"])).mean()),
        "rollout/neg_logp_mean": float(-(arrays["old_logp_bt"] * resp).sum() / max(resp.sum(), 1)),
        "rollout/distinct_frac": float(np.mean([len(set(completions[i * g:(i + 1) * g])) / g
                                                for i in range(len(rows))])),
        "time/generate_s": t1 - t0,
        "time/reward_s": t2 - t1,
        "tokens/generated": float(lengths.sum()),
    }
    metrics.update({f"reward/{k}": float(v) for k, v in (reward_metrics or {}).items()})
    return Experience(arrays, completions, rewards, no_signal, metrics)


def minibatches(c: Config, exp: Experience, rng: np.random.Generator):
    """Yields `mu` passes of shuffled minibatches as dicts of [n_micro, m, ...] arrays.

    With `algorithm.filter_zero_signal`, rows of all-equal-reward groups are dropped and the survivors padded with
    masked-out rows (no response tokens: no loss, no gradient) up to a whole number of minibatches, so shapes (and
    the compiled step) never change. Yields nothing when every group is filtered.
    """
    a = c.algorithm
    arrays = exp.arrays
    idx = np.arange(len(exp.rewards))
    if a.filter_zero_signal:
        idx = idx[np.repeat(~exp.no_signal_p, c.rollout.num_samples)]
    if len(idx) == 0:
        return
    fields = MINIBATCH_FIELDS + ((REF_FIELD,) if REF_FIELD in arrays else ())
    n_mb = -(-len(idx) // a.minibatch_size)
    for _ in range(a.mu):
        order = rng.permutation(idx)
        pad = n_mb * a.minibatch_size - len(order)
        for j in range(n_mb):
            take = order[j * a.minibatch_size:(j + 1) * a.minibatch_size]
            mb = {k: arrays[k][take] for k in fields}
            if j == n_mb - 1 and pad:
                mb = {k: _pad_rows(v, pad, k) for k, v in mb.items()}
            yield {k: v.reshape((a.minibatch_size // a.micro_batch_size, a.micro_batch_size) + v.shape[1:])
                   for k, v in mb.items()}


def _pad_rows(x: np.ndarray, pad: int, name: str) -> np.ndarray:
    filler = np.zeros((pad,) + x.shape[1:], x.dtype)
    if name == "valid_bt":
        filler[:, 0] = True  # one valid key per row keeps attention well-defined
    return np.concatenate([x, filler], 0)

"""Continuous batching: a fixed number of decode slots streams all `P * G` requests inside one `lax.while_loop`.

`generate_continuous(model, prompts, num_samples=G, decode_slots=S, ...)` returns the same `SampleOutput` as
`sampler.generate` (row r = request r = sample `r % G` of prompt `r // G`), but decodes with S slots instead of one row
per request: when a slot's request emits a stop token or reaches its budget (`max_new_tokens`, or its own entry of
`max_new_tokens_r`), the slot takes the next pending request at once, on device, in the same loop iteration. Static
batching keeps every row's slot until the longest row of the batch ends, so on a long-tailed length mix most of its
slot-steps are padding; here a slot only idles once no request is left.

Flow:
1. The P prompts are left-padded to a bucket `Lp` and prefilled once (`sampler_loop.prefill`, `cache_len = Lp`): a
   prefix store of P prompt caches and P last-position logits (prefix sharing: a prompt is prefilled once, not G
   times).
2. One jitted `lax.while_loop` (`run`): each iteration runs one model step over all S slots (a slot at response
   position n feeds its token n - 1 and writes its key/value at cache slot `Lp + n - 1`, per slot, so slots at
   different positions share the step), draws each live slot's token n, retires slots that stopped or hit their
   budget, and refills free slots in request order: the slot's first `Lp` cache slots get the request's prompt cache
   copied from the prefix store and its token 0 is drawn from the prompt's prefill logits (no model step). Stale
   keys/values behind a refilled slot's position are masked out, so nothing is cleared. Nothing returns to the host
   until every request is done, and the slot count, `Lp` and `max_new_tokens` are the only shapes: a new request
   never recompiles.

RNG: the same per-request stream as the static sampler: request r's token t uses `uniform(fold_in(key, r), [T])[t]`,
with `key` derived from `seed` as in `generate`. A request's tokens and behaviour log-probs therefore depend only on
(seed, prompt, request index, position), never on the slot or loop step that produced them, and continuous and static
generation give the same tokens for the same seed (tested greedy and sampled; log-probs agree to float rounding).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding

from lad_jax import distributed, sampler_loop
from lad_jax.models.cache import LAYER_CACHE_LAYOUT, LAYER_CACHE_LOGICAL_AXES
from lad_jax.models.transformer import decoder_layer, rms_norm
from lad_jax.sampler import SampleOutput, _call_key, _resolve_mesh, _resolve_sampling, bucket_length
from lad_jax.sampling import Sampling, SamplingMode, SamplingParams, sample_tokens_from_uniform
from lad_jax.sharding import constrain, spec_for_shape


def default_decode_slots(num_requests: int, batch_shards: int = 1) -> int:
    """A quarter of the requests (so each slot serves ~4 on average, enough to even out long-tailed lengths while the
    step's batch stays large), rounded up to a multiple of the devices the slots are sharded over."""
    slots = max(1, -(-num_requests // 4))
    return -(-slots // batch_shards) * batch_shards


@struct.dataclass
class SlotState:
    """The loop's carry: S slots, R requests of up to T tokens."""

    cache: dict  # per-layer slot caches over Lp + T cache slots
    req_s: jax.Array  # int32 [S] the slot's request (meaningful while active_s)
    n_s: jax.Array  # int32 [S] tokens the slot's request has emitted
    last_s: jax.Array  # int32 [S] its last token (the next model input)
    active_s: jax.Array  # bool [S]
    next_r: jax.Array  # int32 [] first request not yet given a slot
    steps: jax.Array  # int32 [] model steps run (slot-steps = steps * S)
    tokens_rt: jax.Array
    logprobs_rt: jax.Array
    lengths_r: jax.Array
    stopped_r: jax.Array


def _emit(s: SlotState, sel_s, logits_sv, uniform_rt, budget_r, stop_ids, params: SamplingParams,
          mode: SamplingMode) -> SlotState:
    """Draw token `n_s` of each selected slot's request from its logits and record it; retire finished slots."""
    num_r, t = uniform_rt.shape
    r_s, n_s = jnp.clip(s.req_s, 0, num_r - 1), jnp.clip(s.n_s, 0, t - 1)
    tok_s, logp_s = sample_tokens_from_uniform(logits_sv, uniform_rt[r_s, n_s], params, mode)
    stop_s = jnp.any(tok_s[:, None] == stop_ids[None, :], axis=-1)
    done_s = stop_s | (n_s + 1 >= budget_r[r_s])
    w_s = jnp.where(sel_s, r_s, num_r)  # unselected slots write out of range (dropped)
    return s.replace(
        n_s=jnp.where(sel_s, n_s + 1, s.n_s),
        last_s=jnp.where(sel_s, tok_s, s.last_s),
        active_s=jnp.where(sel_s, ~done_s, s.active_s),
        tokens_rt=s.tokens_rt.at[w_s, n_s].set(tok_s, mode="drop"),
        logprobs_rt=s.logprobs_rt.at[w_s, n_s].set(logp_s, mode="drop"),
        lengths_r=s.lengths_r.at[w_s].set(n_s + 1, mode="drop"),
        stopped_r=s.stopped_r.at[w_s].set(stop_s, mode="drop"),
    )


def _refill(s: SlotState, prefix, logits_pv, uniform_rt, budget_r, stop_ids, params, mode, num_samples):
    """Give free slots the next pending requests (in request order) and draw their token 0 from the prefill logits;
    repeated while a request retires at once (stop token or budget 1) and requests are pending."""
    num_r = uniform_rt.shape[0]

    def pending(s):
        return jnp.any(~s.active_s) & (s.next_r < num_r)

    def fill(s):
        free_s = ~s.active_s
        new_s = s.next_r + jnp.cumsum(free_s.astype(jnp.int32)) - 1
        assign_s = free_s & (new_s < num_r)
        req_s = jnp.where(assign_s, new_s, s.req_s)
        p_s = jnp.clip(req_s, 0, num_r - 1) // num_samples

        def copy(name, slot_cache):  # the request's prompt cache into the first Lp cache slots of assigned slots
            out = []
            for a, pre in zip(slot_cache, prefix[name]):
                head = jax.lax.slice_in_dim(a, 0, pre.shape[-1 if name == "k" else 2], axis=3 if name == "k" else 2)
                head = jnp.where(assign_s[:, None, None, None], jnp.take(pre, p_s, axis=0).astype(a.dtype), head)
                out.append(constrain(jax.lax.dynamic_update_slice(a, head, (0, 0, 0, 0)),
                                     LAYER_CACHE_LOGICAL_AXES[name]))
            return tuple(out)

        cache = dict(s.cache, k=copy("k", s.cache["k"]), v=copy("v", s.cache["v"]))
        s = s.replace(cache=cache, req_s=req_s, n_s=jnp.where(assign_s, 0, s.n_s),
                      next_r=s.next_r + jnp.sum(assign_s.astype(jnp.int32)))
        return _emit(s, assign_s, jnp.take(logits_pv, p_s, axis=0), uniform_rt, budget_r, stop_ids, params, mode)

    return jax.lax.while_loop(pending, fill, s)


def _slot_step(model, layer_params, tokens_s1, pos_s1, cache, write_s, mask_s1w):
    """`Transformer.hidden_unrolled` with a per-slot cache write position `write_s` (slots are at different
    positions); same layer math (`decoder_layer`)."""
    c = model.config
    dt = c.jnp_dtype
    x, (cos, sin) = model._inputs(tokens_s1, pos_s1)
    rows = jnp.arange(tokens_s1.shape[0])
    new_k, new_v = [], []
    for p, k_cache, v_cache in zip(layer_params, cache["k"], cache["v"]):
        def write(k_btkx, v_btkx, k_cache=k_cache, v_cache=v_cache):
            k_cache = k_cache.at[rows, :, :, write_s].set(k_btkx[:, 0].astype(k_cache.dtype))
            v_cache = v_cache.at[rows, :, write_s, :].set(v_btkx[:, 0].astype(v_cache.dtype))
            return k_cache.astype(dt), v_cache.astype(dt), (k_cache, v_cache)

        x, (k_cache, v_cache) = decoder_layer(c, x, p, cos, sin, mask_s1w, write,
                                              (LAYER_CACHE_LAYOUT["k"], LAYER_CACHE_LAYOUT["v"]))
        new_k.append(constrain(k_cache, LAYER_CACHE_LOGICAL_AXES["k"]))
        new_v.append(constrain(v_cache, LAYER_CACHE_LOGICAL_AXES["v"]))
    x = rms_norm(x, model.final_norm[...], c.rms_norm_eps)
    return x, dict(cache, k=tuple(new_k), v=tuple(new_v))


def _run_impl(graphdef, state, layer_params, prefix, logits_pv, valid_pl, lengths_p, budget_r, stop_ids,
              params: SamplingParams, key, pad_id, *, mode: SamplingMode, num_samples: int, slots: int,
              max_new_tokens: int, cache_dtype):
    sampler_loop.TRACES["continuous"] += 1
    model = nnx.merge(graphdef, state)
    num_r, t = budget_r.shape[0], max_new_tokens
    lp = valid_pl.shape[1]
    window = lp + t
    # the static sampler's per-request stream (sampler_loop.start): request r's token t draws uniform_rt[r, t]
    keys_r = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(num_r, dtype=jnp.uint32))
    uniform_rt = jax.vmap(lambda k: jax.random.uniform(k, (t,), jnp.float32))(keys_r)
    c = model.config
    kv = (c.num_kv_heads, c.head_dim)
    cache = {
        "k": tuple(constrain(jnp.zeros((slots, kv[0], kv[1], window), cache_dtype), LAYER_CACHE_LOGICAL_AXES["k"])
                   for _ in range(c.num_layers)),
        "v": tuple(constrain(jnp.zeros((slots, kv[0], window, kv[1]), cache_dtype), LAYER_CACHE_LOGICAL_AXES["v"])
                   for _ in range(c.num_layers)),
        "index": jnp.zeros((), jnp.int32),  # unused: every slot writes at its own position
    }
    zero_s = constrain(jnp.zeros((slots,), jnp.int32), ("batch",))
    s = SlotState(cache=cache, req_s=zero_s, n_s=zero_s, last_s=zero_s, active_s=zero_s > 0,
                  next_r=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32),
                  tokens_rt=jnp.full((num_r, t), pad_id, jnp.int32), logprobs_rt=jnp.zeros((num_r, t), jnp.float32),
                  lengths_r=jnp.zeros((num_r,), jnp.int32), stopped_r=jnp.zeros((num_r,), bool))
    refill = lambda s: _refill(s, prefix, logits_pv, uniform_rt, budget_r, stop_ids, params, mode,  # noqa: E731
                               num_samples)
    cache_slots = jnp.arange(window)

    def body(s: SlotState) -> SlotState:
        p_s = jnp.clip(s.req_s, 0, num_r - 1) // num_samples
        valid_sw = jnp.pad(jnp.take(valid_pl, p_s, axis=0), ((0, 0), (0, t)))
        mask_s1w = (valid_sw | ((cache_slots[None, :] >= lp) & (cache_slots[None, :] < lp + s.n_s[:, None])))[:, None]
        pos_s1 = (jnp.take(lengths_p, p_s) + s.n_s - 1)[:, None]
        hidden_s1d, cache = _slot_step(model, layer_params, s.last_s[:, None], pos_s1, s.cache, lp + s.n_s - 1,
                                       mask_s1w)
        s = s.replace(cache=cache, steps=s.steps + 1)
        s = _emit(s, s.active_s, model.logits(hidden_s1d)[:, 0], uniform_rt, budget_r, stop_ids, params, mode)
        return refill(s)

    s = jax.lax.while_loop(lambda s: jnp.any(s.active_s), body, refill(s))
    return s.tokens_rt, s.logprobs_rt, s.lengths_r, s.stopped_r, s.steps


run = jax.jit(_run_impl, static_argnames=("graphdef", "mode", "num_samples", "slots", "max_new_tokens",
                                          "cache_dtype"))


def generate_continuous(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    max_new_tokens_r: Sequence[int] | None = None,
    decode_slots: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    sampling: Sampling | None = None,
    stop_token_ids: Sequence[int] = (),
    seed=None,
    pad_id: int = 0,
    min_prompt_bucket: int = 16,
    cache_dtype=None,
    mesh=None,
    stats: dict | None = None,
) -> SampleOutput:
    """`sampler.generate` with continuous batching over `decode_slots` slots (see the module docstring).

    `max_new_tokens_r`: optional per-request budgets (one per row, `P * G`, each in [1, max_new_tokens]).
    `decode_slots`: default `default_decode_slots`. `stats`, if given, receives `steps` (model steps run) and
    `slot_steps` (steps * slots) for utilisation measurements. Other arguments as in `generate`; with several
    processes every process passes the same arguments and gets the whole output.
    """
    method = _resolve_sampling(sampling, temperature, top_k, top_p)
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("generate_continuous: prompts must be a non-empty list of token-id lists")
    prompts = [list(map(int, p)) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("generate_continuous: every prompt needs at least one token")
    max_new_tokens, num_samples = int(max_new_tokens), int(num_samples)
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"generate_continuous: max_new_tokens and num_samples must be >= 1, got {max_new_tokens}, "
                         f"{num_samples}")
    config = model.config
    for name, ids in (("prompts", [t for p in prompts for t in p]), ("stop_token_ids", list(stop_token_ids))):
        bad = [t for t in ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"generate_continuous: {name} contains token ids outside [0, {config.vocab_size}): "
                             f"{bad[:5]}")
    num_prompts = len(prompts)
    num_r = num_prompts * num_samples
    if max_new_tokens_r is None:
        budget_r = np.full((num_r,), max_new_tokens, np.int32)
    else:
        budget_r = np.asarray(max_new_tokens_r, np.int32)
        if budget_r.shape != (num_r,) or budget_r.min() < 1 or budget_r.max() > max_new_tokens:
            raise ValueError(f"generate_continuous: max_new_tokens_r must hold {num_r} budgets in "
                             f"[1, {max_new_tokens}]")
    mesh = _resolve_mesh(mesh)
    shards = 1 if mesh is None else int(np.prod([mesh.shape.get(a, 1) for a in ("data", "fsdp")]))
    slots = default_decode_slots(num_r, shards) if decode_slots is None else int(decode_slots)
    if slots < 1:
        raise ValueError(f"generate_continuous: decode_slots must be >= 1, got {decode_slots}")
    multi = jax.process_count() > 1
    if multi and (mesh is None or seed is None):
        raise ValueError("generate_continuous: with several processes pass the global mesh= and seed=")
    lp = bucket_length(max(len(p) for p in prompts), min_prompt_bucket)
    if lp + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"generate_continuous: bucketed prompt length {lp} + max_new_tokens {max_new_tokens} "
                         f"exceeds the model's max_position_embeddings={config.max_position_embeddings}")
    tokens_pl = np.full((num_prompts, lp), pad_id, np.int32)
    valid_pl = np.zeros((num_prompts, lp), bool)
    for i, p in enumerate(prompts):
        tokens_pl[i, lp - len(p):] = p
        valid_pl[i, lp - len(p):] = True
    positions_pl = np.maximum(np.cumsum(valid_pl, axis=1) - 1, 0).astype(np.int32)
    lengths_p = valid_pl.sum(axis=1).astype(np.int32)
    stop_ids = np.asarray(list(stop_token_ids) or [-1], np.int32)
    key = _call_key(seed)
    if multi:
        distributed.check_same("generate_continuous: the prompts, sampling settings or seeds", prompts,
                               max_new_tokens, num_samples, budget_r.tolist(), slots, method, list(stop_token_ids),
                               pad_id, np.asarray(jax.random.key_data(key)).tolist())
    graphdef, state = nnx.split(model)
    dtype = config.jnp_dtype if cache_dtype is None else jnp.dtype(cache_dtype)

    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        if mesh is not None:
            def put(a):
                names = ("batch",) + (None,) * (a.ndim - 1)
                return distributed.global_array(a, NamedSharding(mesh, spec_for_shape(names, a.shape, mesh)))

            def put_replicated(a):
                return distributed.global_array(np.asarray(a), NamedSharding(mesh, jax.sharding.PartitionSpec()))
        else:
            put = put_replicated = jnp.asarray
        logits_pv, prefix = sampler_loop.prefill(graphdef, state, put(tokens_pl), put(positions_pl), put(valid_pl),
                                                 cache_len=lp, num_samples=1, cache_dtype=dtype)
        layer_params = sampler_loop.split_layers(graphdef, state)
        key_data = put_replicated(np.asarray(jax.random.key_data(key)))
        params = jax.tree.map(lambda a: put_replicated(np.asarray(a)), method.params())
        tokens_rt, logprobs_rt, lengths_r, stopped_r, steps = run(
            graphdef, state, layer_params, prefix, logits_pv, put_replicated(valid_pl), put_replicated(lengths_p),
            put_replicated(budget_r), put_replicated(stop_ids), params,
            jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key)),
            put_replicated(np.asarray(pad_id, np.int32)), mode=method.mode, num_samples=num_samples, slots=slots,
            max_new_tokens=max_new_tokens, cache_dtype=dtype)
        if multi:
            tokens_rt, logprobs_rt, lengths_r, stopped_r = (
                jnp.asarray(distributed.to_host(x)) for x in (tokens_rt, logprobs_rt, lengths_r, stopped_r))
    if stats is not None:
        stats["steps"] = int(steps)
        stats["slot_steps"] = int(steps) * slots
    rep = lambda a: np.repeat(a, num_samples, axis=0)  # noqa: E731
    return SampleOutput(
        tokens_bt=tokens_rt, logprobs_bt=logprobs_rt, lengths_b=lengths_r, stopped_b=stopped_r,
        prompt_index_b=jnp.asarray(rep(np.arange(num_prompts, dtype=np.int32))),
        prompt_tokens_bs=jnp.asarray(rep(tokens_pl)), prompt_lengths_b=jnp.asarray(rep(lengths_p)),
        num_samples=num_samples,
    )

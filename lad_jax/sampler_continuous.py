"""Continuous batching: a fixed number of decode slots streams all `P * G` requests through on-device loops.

`generate_continuous(model, prompts, num_samples=G, decode_slots=S, ...)` returns the same `SampleOutput` as
`sampler.generate` (row r = request r = sample `r % G` of prompt `r // G`), but decodes with S slots instead of one row
per request: when a slot's request emits a stop token or reaches its budget (`max_new_tokens`, or its own entry of
`max_new_tokens_r`), the slot takes the next pending request at once, on device, before the next model step. Static
batching keeps every row's slot until the longest row of the batch ends, so on a long-tailed length mix most of its
slot-steps are padding; here a slot only idles once no request is left.

Flow:
1. The P prompts are left-padded to a bucket `Lp` and prefilled once (`sampler_loop.prefill`, `cache_len = Lp`): a
   prefix store of P prompt caches and P last-position logits (prefix sharing: a prompt is prefilled once, not G
   times).
2. `start` (jitted) gives every slot a request; then jitted `phase`s run `lax.while_loop`s: each iteration runs one
   model step over all S slots (a slot at response position n feeds its token n - 1 and writes its key/value at
   cache slot `Lp + n - 1`, per slot, so slots at different positions share the step), draws each live slot's token
   n and retires slots that stopped or hit their budget; once a slot is free while requests are pending, free slots
   are refilled in request order: the slot's first `Lp` cache slots get the request's prompt cache copied from the
   prefix store and its token 0 is drawn from the prompt's prefill logits (no model step). Stale keys/values behind
   a refilled slot's position are masked out, so nothing is cleared.
3. Attention windows, as in the static sampler's `decode_windows` schedule: a phase's slot caches hold `Lp + end`
   cache slots, the smallest scheduled window covering every active slot's position, and the phase ends when that
   changes (a slot outgrows the window, or the longest slots retire and a smaller window covers the rest). The host
   reads one scalar per phase, `resize`s the caches (layer by layer) and dispatches the next phase. Attending over
   the whole `Lp + max_new_tokens` every step made same-length rollouts ~25% slower than static batching. The slot
   count, `Lp`, `max_new_tokens` and the window are the only shapes: a refill never recompiles.

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
from lad_jax.models.attention import current_platform, dense_attention
from lad_jax.models.cache import LAYER_CACHE_LAYOUT, LAYER_CACHE_LOGICAL_AXES, LAYER_CACHE_SEQUENCE_AXIS
from lad_jax.models.transformer import decoder_layer, rms_norm
from lad_jax.sampler import SampleOutput, _call_key, _resolve_mesh, _resolve_sampling, prompt_batch
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
    uniform_rt: jax.Array  # float32 [R, T] the RNG stream: request r's U[0, 1) draw for token t


def _emit(s: SlotState, sel_s, logits_sv, budget_r, stop_ids, params: SamplingParams, mode: SamplingMode) -> SlotState:
    """Draw token `n_s` of each selected slot's request from its logits and record it; retire finished slots."""
    num_r, t = s.uniform_rt.shape
    r_s, n_s = jnp.clip(s.req_s, 0, num_r - 1), jnp.clip(s.n_s, 0, t - 1)
    tok_s, logp_s = sample_tokens_from_uniform(logits_sv, s.uniform_rt[r_s, n_s], params, mode)
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


def _refill(s: SlotState, prefix, logits_pv, budget_r, stop_ids, params, mode, num_samples):
    """Give free slots the next pending requests (in request order) and draw their token 0 from the prefill logits;
    repeated while a request retires at once (stop token or budget 1) and requests are pending."""
    num_r = s.uniform_rt.shape[0]

    def pending(s):
        return jnp.any(~s.active_s) & (s.next_r < num_r)

    def fill(s):
        free_s = ~s.active_s
        new_s = s.next_r + jnp.cumsum(free_s.astype(jnp.int32)) - 1
        assign_s = free_s & (new_s < num_r)
        req_s = jnp.where(assign_s, new_s, s.req_s)
        p_s = jnp.clip(req_s, 0, num_r - 1) // num_samples

        # the request's prompt cache into the first Lp cache slots of assigned slots, scattered along the slot axis
        # (others write out of range, dropped): a select over every slot's prompt head made the TPU compiler copy the
        # whole slot caches
        w_s = jnp.where(assign_s, jnp.arange(assign_s.shape[0]), assign_s.shape[0])

        def copy(name, slot_cache):
            seq = LAYER_CACHE_SEQUENCE_AXIS[name]
            out = []
            for a, pre in zip(slot_cache, prefix[name]):
                head = (w_s,) + (slice(None),) * (seq - 1) + (slice(0, pre.shape[seq]),)
                a = a.at[head].set(jnp.take(pre, p_s, axis=0).astype(a.dtype), mode="drop")
                out.append(constrain(a, LAYER_CACHE_LOGICAL_AXES[name]))
            return tuple(out)

        cache = dict(s.cache, k=copy("k", s.cache["k"]), v=copy("v", s.cache["v"]))
        s = s.replace(cache=cache, req_s=req_s, n_s=jnp.where(assign_s, 0, s.n_s),
                      next_r=s.next_r + jnp.sum(assign_s.astype(jnp.int32)))
        return _emit(s, assign_s, jnp.take(logits_pv, p_s, axis=0), budget_r, stop_ids, params, mode)

    return jax.lax.while_loop(pending, fill, s)


def _slot_step(model, layer_params, tokens_s1, pos_s1, cache, write_s, mask_s1w):
    """`Transformer.hidden_unrolled` with a per-slot cache write position `write_s` (slots are at different
    positions); same layer math (`decoder_layer`)."""
    c = model.config
    dt = c.jnp_dtype
    x, (cos, sin) = model._inputs(tokens_s1, pos_s1)
    rows = jnp.arange(tokens_s1.shape[0])
    # TPU: a one-hot select over the window. A scatter into the cache's sequence axis makes the TPU compiler re-lay
    # the caches out (a second copy of each in the phase's temporaries, twice the bytes accessed per step); on CPU
    # the scatter is in place and the select, which rewrites the whole window, halves same-length throughput.
    # one mask for every layer (all layers' caches span the same window)
    hit_sw = (jnp.arange(cache["v"][0].shape[LAYER_CACHE_SEQUENCE_AXIS["v"]])[None, :] == write_s[:, None]
              if current_platform() == "tpu" else None)
    layout = (LAYER_CACHE_LAYOUT["k"], LAYER_CACHE_LAYOUT["v"])
    attend = lambda q, k_all, v_all: dense_attention(q, k_all, v_all, mask_s1w, layout)  # noqa: E731
    new_k, new_v = [], []
    for p, k_cache, v_cache in zip(layer_params, cache["k"], cache["v"]):
        def write(k_btkx, v_btkx, k_cache=k_cache, v_cache=v_cache):
            k_new, v_new = k_btkx[:, 0].astype(k_cache.dtype), v_btkx[:, 0].astype(v_cache.dtype)
            if hit_sw is not None:
                k_cache = jnp.where(hit_sw[:, None, None, :], k_new[..., None], k_cache)
                v_cache = jnp.where(hit_sw[:, None, :, None], v_new[:, :, None, :], v_cache)
            else:
                k_cache = k_cache.at[rows, :, :, write_s].set(k_new)
                v_cache = v_cache.at[rows, :, write_s, :].set(v_new)
            return k_cache.astype(dt), v_cache.astype(dt), (k_cache, v_cache)

        x, (k_cache, v_cache) = decoder_layer(c, x, p, cos, sin, attend, write)
        new_k.append(constrain(k_cache, LAYER_CACHE_LOGICAL_AXES["k"]))
        new_v.append(constrain(v_cache, LAYER_CACHE_LOGICAL_AXES["v"]))
    x = rms_norm(x, model.final_norm[...], c.rms_norm_eps)
    return x, dict(cache, k=tuple(new_k), v=tuple(new_v))


def _need(s: SlotState) -> jax.Array:
    """The response positions the next step needs: the largest `n_s` of an active slot (a slot at `n` writes cache
    slot `Lp + n - 1` and attends `Lp + n` slots); 0 once no slot is active."""
    return jnp.max(jnp.where(s.active_s, s.n_s, 0))


def _start_impl(prefix, logits_pv, budget_r, stop_ids, params: SamplingParams, key, pad_id, *, mode: SamplingMode,
                num_samples: int, slots: int, max_new_tokens: int, window: int):
    """The loop's first state: empty slot caches of `window` cache slots, every slot given a request."""
    sampler_loop.TRACES["continuous_start"] += 1
    num_r, t = budget_r.shape[0], max_new_tokens
    # the static sampler's per-request stream (sampler_loop.start): request r's token t draws uniform_rt[r, t]
    keys_r = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(num_r, dtype=jnp.uint32))
    uniform_rt = jax.vmap(lambda k: jax.random.uniform(k, (t,), jnp.float32))(keys_r)

    def empty(name, pre):  # a prefix cache [P, ...] with the sequence axis at `window`, over S slots
        shape = list(pre.shape)
        shape[0], shape[LAYER_CACHE_SEQUENCE_AXIS[name]] = slots, window
        return constrain(jnp.zeros(shape, pre.dtype), LAYER_CACHE_LOGICAL_AXES[name])

    cache = {name: tuple(empty(name, pre) for pre in prefix[name]) for name in ("k", "v")}
    cache["index"] = jnp.zeros((), jnp.int32)  # unused: every slot writes at its own position
    zero_s = constrain(jnp.zeros((slots,), jnp.int32), ("batch",))
    s = SlotState(cache=cache, req_s=zero_s, n_s=zero_s, last_s=zero_s, active_s=zero_s > 0,
                  next_r=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32),
                  tokens_rt=jnp.full((num_r, t), pad_id, jnp.int32), logprobs_rt=jnp.zeros((num_r, t), jnp.float32),
                  lengths_r=jnp.zeros((num_r,), jnp.int32), stopped_r=jnp.zeros((num_r,), bool),
                  uniform_rt=uniform_rt)
    s = _refill(s, prefix, logits_pv, budget_r, stop_ids, params, mode, num_samples)
    return s, _need(s)


start = jax.jit(_start_impl, static_argnames=("mode", "num_samples", "slots", "max_new_tokens", "window"))


def _phase_impl(graphdef, state, weights, s: SlotState, prefix, logits_pv, valid_pl, lengths_p, budget_r, stop_ids,
                params: SamplingParams, *, mode: SamplingMode, num_samples: int, low: int, end: int):
    """Steps over slot caches of `Lp + end` cache slots while the active slots need more than `low` and at most `end`
    response positions (`_need`): the window covers every active slot, and no smaller window of the schedule would.
    Returns the state and its `_need`, from which the host picks the next phase's window."""
    sampler_loop.TRACES["continuous"] += 1
    model = nnx.merge(graphdef, state)
    # `sampler_loop.decode_weights`: compute dtype, made once per call (no FSDP gathers inside the loop)
    top, layer_params = weights
    for name, w in top.items():  # set_value replaces the array (`[...] =` would cast back to the param dtype)
        getattr(model, name).set_value(w)
    lp = valid_pl.shape[1]
    window = lp + end
    cache_slots = jnp.arange(window)

    def body(s: SlotState) -> SlotState:
        p_s = jnp.clip(s.req_s, 0, budget_r.shape[0] - 1) // num_samples
        valid_sw = jnp.pad(jnp.take(valid_pl, p_s, axis=0), ((0, 0), (0, end)))
        mask_s1w = (valid_sw | ((cache_slots[None, :] >= lp) & (cache_slots[None, :] < lp + s.n_s[:, None])))[:, None]
        pos_s1 = (jnp.take(lengths_p, p_s) + s.n_s - 1)[:, None]
        hidden_s1d, cache = _slot_step(model, layer_params, s.last_s[:, None], pos_s1, s.cache, lp + s.n_s - 1,
                                       mask_s1w)
        s = s.replace(cache=cache, steps=s.steps + 1)
        return _emit(s, s.active_s, model.logits(hidden_s1d)[:, 0], budget_r, stop_ids, params, mode)

    def fits(s: SlotState):
        need = _need(s)
        return (need > low) & (need <= end)

    def until_refill(s: SlotState) -> SlotState:
        # model steps until a slot is free while requests are pending (or the window no longer fits); the refill
        # check is part of this loop's condition, so a step without a refill runs no extra control flow (a refill
        # while_loop in every step cost ~7% of a tiny-model step on CPU)
        pending = lambda s: jnp.any(~s.active_s) & (s.next_r < budget_r.shape[0])  # noqa: E731
        s = jax.lax.while_loop(lambda s: fits(s) & ~pending(s), body, s)
        return _refill(s, prefix, logits_pv, budget_r, stop_ids, params, mode, num_samples)

    # every state entering a phase is refilled (`start`, or the refill that ends `until_refill`): each free slot
    # takes the next request right after the step that freed it
    s = jax.lax.while_loop(fits, until_refill, s)
    return s, _need(s)


phase = jax.jit(_phase_impl, static_argnames=("graphdef", "mode", "num_samples", "low", "end"),
                donate_argnames=("s",))


def _resize_layer_impl(a, *, name: str, window: int):
    """One layer's slot cache cut or zero-extended to `window` cache slots (everything an active slot has written
    lies below the smaller of the two windows)."""
    sampler_loop.TRACES["continuous_resize"] += 1
    axis = LAYER_CACHE_SEQUENCE_AXIS[name]
    if window < a.shape[axis]:
        a = jax.lax.slice_in_dim(a, 0, window, axis=axis)
    else:
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, window - a.shape[axis])
        a = jnp.pad(a, widths)
    return constrain(a, LAYER_CACHE_LOGICAL_AXES[name])


resize_layer = jax.jit(_resize_layer_impl, static_argnames=("name", "window"))


def resize(s: SlotState, *, window: int) -> SlotState:
    """`s` with its slot caches at `window` cache slots; consumes `s`. Layer by layer, deleting each old buffer once
    its copy is dispatched (as `sampler_loop.grow`), so only one layer's old and new buffers coexist."""
    if s.cache["v"][0].shape[LAYER_CACHE_SEQUENCE_AXIS["v"]] == window:
        return s
    return s.replace(cache=sampler_loop.replace_layers(
        s.cache, lambda a, name: resize_layer(a, name=name, window=window)))


def generate_continuous(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    max_new_tokens_r: Sequence[int] | None = None,
    decode_slots: int | None = None,
    decode_phases: int = 4,
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
    `decode_slots`: default `default_decode_slots`. `decode_phases`: the attention-window schedule, as in `generate`
    (`decode_windows`; each window is one more compiled phase). `stats`, if given, receives `steps` (model steps
    run), `slot_steps` (steps * slots) for utilisation measurements and `phases` (window changes + 1). Other arguments
    as in `generate`; with several processes every process passes the same arguments and gets the whole output.
    """
    method = _resolve_sampling(sampling, temperature, top_k, top_p)
    max_new_tokens, num_samples = int(max_new_tokens), int(num_samples)
    config = model.config
    batch = prompt_batch("generate_continuous", config, prompts, max_new_tokens=max_new_tokens,
                         num_samples=num_samples, stop_token_ids=stop_token_ids, pad_id=pad_id,
                         min_prompt_bucket=min_prompt_bucket)
    prompts, lp = batch.prompts, batch.lp
    tokens_pl, valid_pl, positions_pl, lengths_p = batch.tokens_pl, batch.valid_pl, batch.positions_pl, batch.lengths_p
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
    if int(decode_phases) < 1:
        raise ValueError(f"generate_continuous: decode_phases must be >= 1, got {decode_phases}")
    multi = jax.process_count() > 1
    if multi and (mesh is None or seed is None):
        raise ValueError("generate_continuous: with several processes pass the global mesh= and seed=")
    ends = [e for e, _ in sampler_loop.decode_windows(lp, max_new_tokens, decode_phases)]
    stop_ids = batch.stop_ids
    key = _call_key(seed)
    if multi:
        distributed.check_same("generate_continuous: the prompts, sampling settings or seeds", prompts,
                               max_new_tokens, num_samples, budget_r.tolist(), slots, int(decode_phases), method,
                               list(stop_token_ids), pad_id, np.asarray(jax.random.key_data(key)).tolist())
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
        weights = sampler_loop.decode_weights(graphdef, state)
        key_data = put_replicated(np.asarray(jax.random.key_data(key)))
        params = jax.tree.map(lambda a: put_replicated(np.asarray(a)), method.params())
        valid_d, lengths_d, budget_d, stop_d = (put_replicated(a) for a in (valid_pl, lengths_p, budget_r, stop_ids))
        s, need = start(prefix, logits_pv, budget_d, stop_d, params,
                        jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key)),
                        put_replicated(np.asarray(pad_id, np.int32)), mode=method.mode, num_samples=num_samples,
                        slots=slots, max_new_tokens=max_new_tokens, window=lp + ends[0])
        phases = 0
        # Each phase attends over the smallest scheduled window covering every active slot and ends when that
        # window changes (a slot outgrows it, or the longest slots retire and a smaller one suffices); the host
        # reads one scalar per phase to pick the next window. Windows are the schedule's few static shapes, so a
        # refill never recompiles.
        while (need := int(need)) > 0:
            j = next(i for i, e in enumerate(ends) if e >= need)
            s = resize(s, window=lp + ends[j])
            s, need = phase(graphdef, state, weights, s, prefix, logits_pv, valid_d, lengths_d, budget_d, stop_d,
                            params, mode=method.mode, num_samples=num_samples, low=ends[j - 1] if j else 0,
                            end=ends[j])
            phases += 1
        tokens_rt, logprobs_rt, lengths_r, stopped_r = s.tokens_rt, s.logprobs_rt, s.lengths_r, s.stopped_r
        steps = s.steps
        if multi:
            tokens_rt, logprobs_rt, lengths_r, stopped_r = (
                jnp.asarray(distributed.to_host(x)) for x in (tokens_rt, logprobs_rt, lengths_r, stopped_r))
    if stats is not None:
        stats["steps"] = int(steps)
        stats["slot_steps"] = int(steps) * slots
        stats["phases"] = phases
    rep = lambda a: np.repeat(a, num_samples, axis=0)  # noqa: E731
    return SampleOutput(
        tokens_bt=tokens_rt, logprobs_bt=logprobs_rt, lengths_b=lengths_r, stopped_b=stopped_r,
        prompt_index_b=jnp.asarray(rep(np.arange(num_prompts, dtype=np.int32))),
        prompt_tokens_bs=jnp.asarray(rep(tokens_pl)), prompt_lengths_b=jnp.asarray(rep(lengths_p)),
        num_samples=num_samples,
    )

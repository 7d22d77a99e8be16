"""Grouped generation: a jitted prefill per prompt, then a jitted `lax.while_loop` decode over all samples.

Flow of `generate(model, prompts, num_samples=G, ...)` for P prompts, B = P * G rows (the jitted pieces live in
`lad_jax/sampler_loop.py`):
1. Prompts are left-padded to a bucketed length `Lp` (a power of two >= `min_prompt_bucket`), so a new prompt length
   reuses the compiled functions. Padding is masked out of attention; positions count real tokens only.
2. `prefill` (jitted) runs the model once over the P prompts into a KV cache, then repeats the cache and the
   last-position logits G times along the batch axis (prefix sharing: the prompt is prefilled once, not G times).
   Row `p * G + g` is sample g of prompt p. The cache is handed to decode in the per-layer form (`unstack_cache`),
   so each decode step neither slices stacked weights nor copies cache layers.
3. `start` draws the first token from the prefill logits; `decode` (jitted, state donated so the `lax.while_loop`
   updates the cache in place) then runs one model step per token (`Transformer.hidden_unrolled`) until every row
   has emitted a stop token or the budget is spent. Its weights come from `decode_weights`, made once per call:
   per-layer dicts (`layer_params()`) and the embedding / head, converted to the compute dtype (exact: the layer
   math converts every weight before use) and replicated over the data and fsdp axes (`DECODE_WEIGHT_RULES`), so
   the loop neither converts fp32 master weights nor all-gathers FSDP shards on every step.
   The decode runs in a few phases over growing cache windows (`decode_windows`): attention in phase j reads the
   `Lp + end_j` slots that can be filled by its last step instead of all `Lp + max_new_tokens`. Between phases
   `grow` zero-extends the cache layer by layer, freeing each old buffer as it goes, so only one layer's old and new
   buffers coexist. The phases are dispatched back to back (a batch that has stopped runs no more steps in later
   phases), so nothing returns to the host until the end.

RNG: each call derives one key (from `seed`, or fresh OS entropy when `seed` is None); row r's stream is
`uniform(fold_in(key, r), [max_new_tokens])`, drawn before the loop (inverse-CDF sampling needs one U[0, 1) per row
and token), so rows and calls never share noise and the loop body does no RNG work.

Compiled functions are cached by jax per static signature (model graph, rows, `Lp`, `max_new_tokens`, G, sampling
mode, number of stop ids, decode window); temperature / top-k / top-p values and the seed are traced and never
recompile.
`compile_counts()` reports how many times each function was traced (each trace is one compilation).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import secrets
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding

from lad_jax import distributed, sampler_loop
from lad_jax.models.cache import LAYER_CACHE_SEQUENCE_AXIS
from lad_jax.sampler_loop import decode_windows  # noqa: F401  (public: the decode's phase schedule)
from lad_jax.sampling import Sampling
from lad_jax.sharding import spec_for_shape

_PREFILL_ROWS: collections.Counter = collections.Counter()


def compile_counts() -> dict[str, int]:
    """How many times each jitted sampler function (`sampler_loop`) was traced (= compiled) in this process."""
    return dict(sampler_loop.TRACES)


def prefill_rows() -> dict[str, int]:
    """`calls`: prefill executions; `rows`: prompt rows the model ran over in them (P per call with prefix sharing)."""
    return dict(_PREFILL_ROWS)


@struct.dataclass
class SampleOutput:
    """Result of `generate`; row r = sample `r % G` of prompt `prompt_index_b[r]` (rows grouped by prompt)."""

    tokens_bt: jax.Array  # int32 [B, T] response tokens, pad_id after the end
    logprobs_bt: jax.Array  # float32 [B, T] behaviour log-probs (sampling.py convention), 0 after the end
    lengths_b: jax.Array  # int32 [B] response length, including the stop token if any
    stopped_b: jax.Array  # bool [B] True: ended with a stop token; False: ran out of max_new_tokens
    prompt_index_b: jax.Array  # int32 [B] index into the `prompts` argument
    prompt_tokens_bs: jax.Array  # int32 [B, Lp] the row's prompt, left-padded with pad_id
    prompt_lengths_b: jax.Array  # int32 [B]
    num_samples: int = struct.field(pytree_node=False, default=1)

    @property
    def mask_bt(self) -> jax.Array:
        """True on real response tokens."""
        return jnp.arange(self.tokens_bt.shape[1])[None, :] < self.lengths_b[:, None]

    def finish_reasons(self) -> list[str]:
        return ["stop" if s else "length" for s in np.asarray(self.stopped_b)]

    def responses(self) -> list[list[int]]:
        """Response token lists without padding (host copy)."""
        toks, lens = np.asarray(self.tokens_bt), np.asarray(self.lengths_b)
        return [toks[i, : lens[i]].tolist() for i in range(toks.shape[0])]


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _resolve_sampling(sampling, temperature, top_k, top_p) -> Sampling:
    if sampling is not None:
        if not isinstance(sampling, Sampling):
            raise TypeError(f"generate: sampling must be a lad_jax.sampling.Sampling, got {type(sampling).__name__}")
        if (temperature, top_k, top_p) != (None, None, None):
            raise ValueError("generate: pass either sampling=Sampling(...) or temperature/top_k/top_p, not both")
        return sampling
    return Sampling(
        temperature=1.0 if temperature is None else float(temperature),
        top_k=0 if top_k is None else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
    )


def _resolve_mesh(mesh):
    if mesh is not None:
        return mesh
    mesh = jax.sharding.get_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def _call_key(seed) -> jax.Array:
    if seed is None:
        return jax.random.key(secrets.randbits(31))
    if isinstance(seed, jax.Array):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.shape == ():
            return seed
        if seed.dtype == jnp.uint32 and seed.shape == (2,):  # legacy jax.random.PRNGKey
            return jax.random.wrap_key_data(seed)
        if seed.shape == () and jnp.issubdtype(seed.dtype, jnp.integer):
            return jax.random.key(int(seed))
        raise ValueError(f"generate: seed must be an int, a scalar typed PRNG key or a legacy uint32[2] key; got "
                         f"an array of dtype {seed.dtype} and shape {seed.shape}")
    return jax.random.key(int(seed))


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Checked prompts, left-padded to the bucket `lp` (padding is masked out; positions count real tokens only)."""

    prompts: list  # list[list[int]]: the prompts as int lists
    lp: int  # the bucketed prompt length
    tokens_pl: np.ndarray  # int32 [P, Lp] left-padded with pad_id
    valid_pl: np.ndarray  # bool [P, Lp] real tokens
    positions_pl: np.ndarray  # int32 [P, Lp]
    lengths_p: np.ndarray  # int32 [P]
    stop_ids: np.ndarray  # int32 [>= 1] the stop ids ([-1] when none: matches no token)


def prompt_batch(caller: str, config, prompts, *, max_new_tokens: int, num_samples: int, stop_token_ids, pad_id: int,
                 min_prompt_bucket: int) -> PromptBatch:
    """Validate the arguments `generate` and `generate_continuous` share (errors name `caller`) and build the
    left-padded prompt arrays."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError(f"{caller}: prompts must be a non-empty list of token-id lists")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"{caller}: prompts[{i}] is empty; every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"{caller}: max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"{caller}: num_samples must be >= 1, got {num_samples}")
    vocab = config.vocab_size
    for name, ids in (("prompts", [t for p in prompts for t in p]), ("stop_token_ids", list(stop_token_ids))):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{caller}: {name} contains token ids outside [0, {vocab}): {bad[:5]}")
    lp = bucket_length(max(len(p) for p in prompts), min_prompt_bucket)
    if lp + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"{caller}: bucketed prompt length {lp} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_position_embeddings={config.max_position_embeddings}; shorten prompts or max_new_tokens")
    tokens_pl = np.full((len(prompts), lp), pad_id, np.int32)
    valid_pl = np.zeros((len(prompts), lp), bool)
    for i, p in enumerate(prompts):
        tokens_pl[i, lp - len(p):] = p
        valid_pl[i, lp - len(p):] = True
    return PromptBatch(prompts=prompts, lp=lp, tokens_pl=tokens_pl, valid_pl=valid_pl,
                       positions_pl=np.maximum(np.cumsum(valid_pl, axis=1) - 1, 0).astype(np.int32),
                       lengths_p=valid_pl.sum(axis=1).astype(np.int32),
                       stop_ids=np.asarray(list(stop_token_ids) or [-1], np.int32))


def _unchanged(tree):
    """Single-process inputs need no placement beyond what jit does."""
    return tree

def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    sampling: Sampling | None = None,
    stop_token_ids: Sequence[int] = (),
    seed=None,
    pad_id: int = 0,
    min_prompt_bucket: int = 16,
    cache_dtype=None,
    share_prefix: bool = True,
    decode_phases: int = 4,
    mesh=None,
) -> SampleOutput:
    """Sample `num_samples` responses for each prompt (a list of token ids). See the module docstring.

    Sampling: `sampling=Sampling(...)` or temperature/top_k/top_p (default temperature 1, full vocabulary;
    temperature=0 is greedy). `seed`: int or typed PRNG key; None draws fresh entropy. `share_prefix=False` prefills
    every copy of a prompt separately (only for benchmarking the saving). `mesh`: a Mesh (default: the one set with
    `jax.set_mesh`, if any); rows are sharded over its ('data', 'fsdp') axes, parameters keep their own shardings.
    `decode_phases`: how many growing attention windows the decode runs in (`decode_windows`; 1 = attend over the
    whole cache every step); each window is one more compiled decode.

    Several processes (jax.distributed): every process calls `generate` with the same global prompts and settings
    (checked) and the global `mesh`; each device samples only its own rows of the global batch (any mesh layout,
    e.g. a tensor axis spanning hosts), and every process gets back the whole output, the same as one process would.
    """
    method = _resolve_sampling(sampling, temperature, top_k, top_p)
    if int(decode_phases) < 1:
        raise ValueError(f"generate: decode_phases must be >= 1, got {decode_phases}")
    max_new_tokens, num_samples = int(max_new_tokens), int(num_samples)
    config = model.config
    batch = prompt_batch("generate", config, prompts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                         stop_token_ids=stop_token_ids, pad_id=pad_id, min_prompt_bucket=min_prompt_bucket)
    prompts, lp = batch.prompts, batch.lp
    tokens_pl, valid_pl, positions_pl, lengths_p = batch.tokens_pl, batch.valid_pl, batch.positions_pl, batch.lengths_p
    num_prompts = len(prompts)
    mesh = _resolve_mesh(mesh)
    multi = jax.process_count() > 1
    if multi:
        if mesh is None:
            raise ValueError("generate: with several processes pass the global mesh= (every process passes the same "
                             "global prompts)")
        if seed is None:
            raise ValueError("generate: with several processes pass seed= (the same on every process)")
    windows = decode_windows(lp, max_new_tokens, decode_phases)

    rep = lambda a: np.repeat(a, num_samples, axis=0)  # noqa: E731
    if share_prefix:
        pre_inputs, pre_samples = (tokens_pl, positions_pl, valid_pl), num_samples
    else:
        pre_inputs, pre_samples = (rep(tokens_pl), rep(positions_pl), rep(valid_pl)), 1
    stop_ids = batch.stop_ids

    key = _call_key(seed)
    if multi:
        distributed.check_same("generate: the prompts, sampling settings or seeds", prompts, max_new_tokens,
                               num_samples, method, list(stop_token_ids), pad_id,
                               np.asarray(jax.random.key_data(key)).tolist())
    graphdef, state = nnx.split(model)
    mode = method.mode
    dtype = config.jnp_dtype if cache_dtype is None else jnp.dtype(cache_dtype)

    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        if mesh is not None:
            # Global host arrays -> global device arrays: each device takes its own rows, whatever the mesh layout.
            def put(a):
                names = ("batch",) + (None,) * (a.ndim - 1)
                return distributed.global_array(a, NamedSharding(mesh, spec_for_shape(names, a.shape, mesh)))
        else:
            put = jnp.asarray
        if multi:
            from jax.experimental import multihost_utils

            def put_replicated(tree):
                return multihost_utils.host_local_array_to_global_array(tree, mesh, jax.sharding.PartitionSpec())
        else:
            put_replicated = _unchanged
        pre_inputs = tuple(put(a) for a in pre_inputs)
        _PREFILL_ROWS["calls"] += 1
        _PREFILL_ROWS["rows"] += int(pre_inputs[0].shape[0])
        logits_bv, cache = sampler_loop.prefill(
            graphdef, state, *pre_inputs, cache_len=windows[0][1], num_samples=pre_samples, cache_dtype=dtype
        )
        stop_ids, params, key, pad = put_replicated(
            (jnp.asarray(stop_ids), method.params(), key, jnp.asarray(pad_id, jnp.int32)))
        valid_bl, positions_b = put(rep(valid_pl)), put(rep(lengths_p))
        s = sampler_loop.start(cache, logits_bv, stop_ids, params, key, pad, mode=mode,
                               max_new_tokens=max_new_tokens)
        weights = sampler_loop.decode_weights(graphdef, state)
        for end_step, window in windows:  # dispatched back to back: no host sync between phases
            if window > s.cache["v"][0].shape[LAYER_CACHE_SEQUENCE_AXIS["v"]]:
                s = sampler_loop.grow(s, window=window)
            s = sampler_loop.decode(graphdef, state, weights, s, valid_bl, positions_b, stop_ids, params, pad,
                                    mode=mode, end_step=end_step, window=window)
        tokens_bt, logprobs_bt, lengths_b, stopped_b = s.tokens_bt, s.logprobs_bt, s.lengths_b, s.done_b
        if multi:  # every process gets the whole result
            tokens_bt, logprobs_bt, lengths_b, stopped_b = (
                jnp.asarray(distributed.to_host(x)) for x in (tokens_bt, logprobs_bt, lengths_b, stopped_b))
    return SampleOutput(
        tokens_bt=tokens_bt,
        logprobs_bt=logprobs_bt,
        lengths_b=lengths_b,
        stopped_b=stopped_b,
        prompt_index_b=jnp.asarray(np.repeat(np.arange(num_prompts, dtype=np.int32), num_samples)),
        prompt_tokens_bs=jnp.asarray(rep(tokens_pl)),
        prompt_lengths_b=jnp.asarray(rep(lengths_p)),
        num_samples=num_samples,
    )


def generate_text(model, tokenizer, prompts, *, chat: bool = True, system: str | None = None,
                  stop_token_ids: Sequence[int] | None = None, pad_id: int | None = None, **kwargs):
    """Text in, text out: `prompts` are strings (or chat message lists when `chat`), rendered with the tokenizer's
    chat template (`lad_jax.tokenizer.apply_chat_template`) or encoded as they are (`chat=False`).

    Stop ids default to the tokenizer's eos token, the pad id to its pad token. Returns (SampleOutput, texts) with
    texts[r] the decoded response of row r (special tokens skipped). Other kwargs go to `generate`.
    """
    from lad_jax.tokenizer import apply_chat_template

    if isinstance(prompts, str):
        raise ValueError("generate_text: prompts must be a list of strings / message lists, not one string")
    if chat:
        ids = [apply_chat_template(tokenizer, p, system=system, tokenize=True) for p in prompts]
    else:
        if system is not None:
            raise ValueError("generate_text: system= needs chat=True (it is a chat-template message)")
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    if stop_token_ids is None:
        stop_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if pad_id is None:
        if tokenizer.pad_token_id is None:
            raise ValueError("generate_text: the tokenizer has no pad_token; pass pad_id=")
        pad_id = tokenizer.pad_token_id
    out = generate(model, ids, stop_token_ids=stop_token_ids, pad_id=pad_id, **kwargs)
    texts = tokenizer.batch_decode(out.responses(), skip_special_tokens=True)
    return out, texts

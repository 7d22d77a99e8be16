"""Sampler memory: decode weights made once (no parameter all-gather in the decode loop), exact; layer-wise growth."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import sampler_loop
from lad_jax.models import create_model, tiny_config
from lad_jax.models.cache import LAYER_CACHE_SEQUENCE_AXIS
from lad_jax.sampler_plan import compile_rollout
from lad_jax.sampling import Sampling
from lad_jax.sharding import make_mesh

# fp32 master weights, bf16 compute: the recipes' setting, where the decode used to convert and gather every step
BF16 = dict(tie_word_embeddings=False, param_dtype="float32", dtype="bfloat16")


def _loop_computations(hlo: str) -> dict[str, list[str]]:
    """HLO computations reached from any while loop's body or condition (directly or through fusions / calls)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    todo = [m for lines in comps.values() for line in lines
            for m in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)]
    reached = set()
    while todo:
        c = todo.pop()
        if c in reached or c not in comps:
            continue
        reached.add(c)
        todo.extend(ref for line in comps[c] for ref in re.findall(r"%([\w.\-]+)", line) if ref in comps)
    return {c: comps[c] for c in reached}


def test_decode_loop_gathers_no_parameters():
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    phases = dict(compile_rollout(tiny_config("qwen2", **BF16), mesh, prompts=4, num_samples=2, prompt_bucket=16,
                                  max_new_tokens=64, decode_phases=2))
    assert [n for n in phases if n.startswith(("grow", "decode@"))] == ["decode@48", "grow_k@80", "grow_v@80",
                                                                       "decode@80"]
    top, layers = phases["decode_weights"].out_info
    for w in [*top.values(), *(w for p in layers for w in p.values())]:
        assert w.dtype == jnp.bfloat16
        assert "fsdp" not in jax.tree.leaves(tuple(w.sharding.spec))  # tensor-sharded at most
    for window in (48, 80):
        loop = _loop_computations(phases[f"decode@{window}"].as_text())
        assert loop, "no while loop found in the decode HLO"
        gathers = [line.strip()[:160] for lines in loop.values() for line in lines if "all-gather" in line]
        assert not gathers, gathers


def _decode(model, weights, seed):
    """prefill -> start -> one decode phase, as `generate` runs them, with the given decode weights."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    tokens_pl = jnp.asarray([[0, 0, 5, 17, 33, 2], [42, 7, 9, 100, 3, 8]], jnp.int32)
    valid_pl = tokens_pl != 0
    positions_pl = jnp.maximum(jnp.cumsum(valid_pl, axis=1) - 1, 0).astype(jnp.int32)
    g, new, lp = 2, 24, tokens_pl.shape[1]
    logits_bv, cache = sampler_loop.prefill(graphdef, state, tokens_pl, positions_pl, valid_pl, cache_len=lp + new,
                                            num_samples=g, cache_dtype=jnp.bfloat16)
    method = Sampling(temperature=1.0)
    stop_ids, pad = jnp.asarray([-1], jnp.int32), jnp.asarray(0, jnp.int32)
    s = sampler_loop.start(cache, logits_bv, stop_ids, method.params(), jax.random.key(seed), pad, mode=method.mode,
                           max_new_tokens=new)
    s = sampler_loop.decode(graphdef, state, weights(graphdef, state), s, jnp.repeat(valid_pl, g, axis=0),
                            jnp.repeat(valid_pl.sum(1), g).astype(jnp.int32), stop_ids, method.params(), pad,
                            mode=method.mode, end_step=new, window=lp + new)
    return np.asarray(s.tokens_bt), np.asarray(s.logprobs_bt)


def test_converted_decode_weights_are_exact():
    # the layer math converts each weight to the compute dtype before use, so converting once up front changes no bit
    model = create_model(tiny_config("qwen2", **BF16), seed=3)

    def raw(graphdef, state):  # what the decode read before: fp32 params, converted inside the loop
        from flax import nnx

        m = nnx.merge(graphdef, state)
        return {"embed": m.embed[...], "final_norm": m.final_norm[...], "lm_head": m.lm_head[...]}, m.layer_params()

    tokens, logprobs = _decode(model, sampler_loop.decode_weights, seed=1)
    ref_tokens, ref_logprobs = _decode(model, raw, seed=1)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(logprobs, ref_logprobs)
    assert len(set(tokens.ravel().tolist())) > 5  # sampled, not a degenerate constant stream


def test_grow_pads_each_layer_and_frees_the_old_buffers():
    b, k, x, s, window = 3, 2, 4, 5, 9
    rng = np.random.default_rng(0)
    old = {"k": tuple(jnp.asarray(rng.normal(size=(b, k, x, s)), jnp.float32) for _ in range(2)),
           "v": tuple(jnp.asarray(rng.normal(size=(b, k, s, x)), jnp.float32) for _ in range(2)),
           "index": jnp.asarray(s, jnp.int32)}
    host = jax.tree.map(np.asarray, old)
    state = sampler_loop.SamplerState(step=jnp.zeros((), jnp.int32), cache=old, last_b=jnp.zeros((b,), jnp.int32),
                                      tokens_bt=jnp.zeros((b, 4), jnp.int32), logprobs_bt=jnp.zeros((b, 4)),
                                      lengths_b=jnp.zeros((b,), jnp.int32), done_b=jnp.zeros((b,), bool),
                                      uniform_bt=jnp.zeros((b, 4)))
    grown = sampler_loop.grow(state, window=window)
    for name in ("k", "v"):
        axis = LAYER_CACHE_SEQUENCE_AXIS[name]
        for before, a, after in zip(host[name], old[name], grown.cache[name]):
            assert a.is_deleted()  # consumed: only one layer's old and new buffers ever coexist
            assert after.shape[axis] == window
            np.testing.assert_array_equal(np.take(np.asarray(after), np.arange(s), axis=axis), before)
            assert not np.take(np.asarray(after), np.arange(s, window), axis=axis).any()
    assert int(grown.cache["index"]) == s

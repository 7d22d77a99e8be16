"""The sampler's jitted phases compiled from abstract arrays, for memory plans and HLO checks (no weights needed).

`compile_rollout(model_config, mesh, ...)` lowers and compiles, in the order `sampler.generate` runs them, `prefill`,
`decode_weights`, `start`, then per decode window the cache growth (`grow_layer`, one layer's k and v buffers; the
growth runs it once per layer and buffer) and `decode`. Arguments are `jax.ShapeDtypeStruct`s on `mesh` (which may
hold compile-only TPU devices from `jax.experimental.topologies`): the model state from `nnx.eval_shape` placed by
`lad_jax.sharding.RULES` as the trainer places it, prompt arrays sharded over rows as `generate` puts them, and every
later phase's inputs are the previous compiled phase's outputs (`Compiled.out_info`: shapes, dtypes and the
shardings the compiler chose), so each executable is the one `generate` would run.
"""
from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lad_jax import sampler_loop
from lad_jax.models import ModelConfig, Transformer
from lad_jax.sampling import Sampling
from lad_jax.sharding import spec_for_shape, state_shardings


def _abstract(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _outputs(compiled):
    """A compiled phase's outputs as abstract arrays (shape, dtype, sharding) for the next phase."""
    return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), compiled.out_info)


class _Abstract:
    """What both samplers' phases take, as abstract arrays on `mesh`: the model state placed by the sharding rules,
    row-sharded prompt arrays (`rows`), replicated small inputs (`small`), the prompts' prefill and the weights."""

    def __init__(self, model_config: ModelConfig, mesh: Mesh, sampling: Sampling, num_stop_ids: int, cache_dtype):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
        self.graphdef, self.state = graphdef, jax.tree.map(_abstract, state, state_shardings(state, mesh))
        self.mesh, self.replicated = mesh, NamedSharding(mesh, P())
        self.dtype = model_config.jnp_dtype if cache_dtype is None else jnp.dtype(cache_dtype)
        self.stop_ids = self.small(jax.ShapeDtypeStruct((num_stop_ids,), jnp.int32))
        self.params = self.small(jax.eval_shape(sampling.params))
        self.key = self.small(jax.eval_shape(lambda: jax.random.key(0)))
        self.pad = self.small(jax.ShapeDtypeStruct((), jnp.int32))

    def rows(self, shape, dtype):
        names = ("batch",) + (None,) * (len(shape) - 1)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh,
                                                                         spec_for_shape(names, shape, self.mesh)))

    def small(self, tree):  # abstract shapes (from eval_shape: no arrays are made on the mesh's devices), replicated
        return jax.tree.map(lambda x: _abstract(x, self.replicated), tree)

    def prefill(self, prompts: int, prompt_bucket: int, cache_len: int, num_samples: int):
        return sampler_loop.prefill.lower(
            self.graphdef, self.state, self.rows((prompts, prompt_bucket), jnp.int32),
            self.rows((prompts, prompt_bucket), jnp.int32), self.rows((prompts, prompt_bucket), jnp.bool_),
            cache_len=cache_len, num_samples=num_samples, cache_dtype=self.dtype).compile()

    def decode_weights(self):
        return sampler_loop.decode_weights.lower(self.graphdef, self.state).compile()


def compile_rollout(model_config: ModelConfig, mesh: Mesh, *, prompts: int, num_samples: int, prompt_bucket: int,
                    max_new_tokens: int, decode_phases: int = 4, sampling: Sampling = Sampling(),
                    num_stop_ids: int = 1, cache_dtype=None) -> Iterator[tuple[str, jax.stages.Compiled]]:
    """Yields (phase name, compiled executable) for one `generate` call of `prompts` x `num_samples` rows.

    Names: "prefill", "decode_weights", "start", then for each decode window w (`decode_windows`) "grow_k@w" and
    "grow_v@w" (one layer's buffer; not for the first window) and "decode@w".
    """
    windows = sampler_loop.decode_windows(prompt_bucket, max_new_tokens, decode_phases)
    a = _Abstract(model_config, mesh, sampling, num_stop_ids, cache_dtype)
    graphdef, state, stop_ids, params, key, pad = a.graphdef, a.state, a.stop_ids, a.params, a.key, a.pad
    b = prompts * num_samples
    with jax.set_mesh(mesh):
        prefill = a.prefill(prompts, prompt_bucket, windows[0][1], num_samples)
        yield "prefill", prefill
        logits_bv, cache = _outputs(prefill)
        weights_c = a.decode_weights()
        yield "decode_weights", weights_c
        weights = _outputs(weights_c)
        start = sampler_loop.start.lower(cache, logits_bv, stop_ids, params, key, pad, mode=sampling.mode,
                                         max_new_tokens=max_new_tokens).compile()
        yield "start", start
        s = _outputs(start)
        valid_bl, positions_b = a.rows((b, prompt_bucket), jnp.bool_), a.rows((b,), jnp.int32)
        for end_step, window in windows:
            if window > windows[0][1]:
                grown = {}
                for name in ("k", "v"):
                    layer = sampler_loop.grow_layer.lower(s.cache[name][0], name=name, window=window).compile()
                    yield f"grow_{name}@{window}", layer
                    grown[name] = (_outputs(layer),) * model_config.num_layers
                s = s.replace(cache=dict(s.cache, **grown))
            decode = sampler_loop.decode.lower(graphdef, state, weights, s, valid_bl, positions_b, stop_ids, params,
                                               pad, mode=sampling.mode, end_step=end_step, window=window).compile()
            yield f"decode@{window}", decode
            s = _outputs(decode)


def compile_continuous(model_config: ModelConfig, mesh: Mesh, *, prompts: int, num_samples: int, prompt_bucket: int,
                       max_new_tokens: int, decode_slots: int, decode_phases: int = 4,
                       sampling: Sampling = Sampling(), num_stop_ids: int = 1,
                       cache_dtype=None) -> Iterator[tuple[str, jax.stages.Compiled]]:
    """Yields (phase name, compiled executable) for one `sampler_continuous.generate_continuous` call with
    `decode_slots` slots, in its order: "prefill" (the prefix store: each prompt once), "decode_weights", "start",
    then for each attention window w the slot caches' resize from the previous window ("grow_k@w", "grow_v@w": one
    layer's buffer; not for the first window) and "phase@w". Windows are visited in growing order, the largest
    caches a call can reach; a real call may also shrink between them (cheaper)."""
    from lad_jax import sampler_continuous

    ends = [e for e, _ in sampler_loop.decode_windows(prompt_bucket, max_new_tokens, decode_phases)]
    a = _Abstract(model_config, mesh, sampling, num_stop_ids, cache_dtype)
    graphdef, state, stop_ids, params, key, pad = a.graphdef, a.state, a.stop_ids, a.params, a.key, a.pad
    num_r = prompts * num_samples
    with jax.set_mesh(mesh):
        prefill = a.prefill(prompts, prompt_bucket, prompt_bucket, 1)  # the prefix store: each prompt once
        yield "prefill", prefill
        logits_pv, prefix = _outputs(prefill)
        weights_c = a.decode_weights()
        yield "decode_weights", weights_c
        weights = _outputs(weights_c)
        valid_pl = a.small(jax.ShapeDtypeStruct((prompts, prompt_bucket), jnp.bool_))
        lengths_p, budget_r = (a.small(jax.ShapeDtypeStruct((n,), jnp.int32)) for n in (prompts, num_r))
        start = sampler_continuous.start.lower(
            prefix, logits_pv, budget_r, stop_ids, params, key, pad, mode=sampling.mode, num_samples=num_samples,
            slots=decode_slots, max_new_tokens=max_new_tokens, window=prompt_bucket + ends[0]).compile()
        yield "start", start
        s, _ = _outputs(start)
        for j, end in enumerate(ends):
            window = prompt_bucket + end
            if j:
                resized = {}
                for name in ("k", "v"):
                    layer = sampler_continuous.resize_layer.lower(s.cache[name][0], name=name,
                                                                  window=window).compile()
                    yield f"grow_{name}@{window}", layer
                    resized[name] = (_outputs(layer),) * model_config.num_layers
                s = s.replace(cache=dict(s.cache, **resized))
            phase = sampler_continuous.phase.lower(
                graphdef, state, weights, s, prefix, logits_pv, valid_pl, lengths_p, budget_r, stop_ids, params,
                mode=sampling.mode, num_samples=num_samples, low=ends[j - 1] if j else 0, end=end).compile()
            yield f"phase@{window}", phase
            s, _ = _outputs(phase)

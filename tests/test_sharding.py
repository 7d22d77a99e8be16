"""Mesh construction, the logical-axis rules table and activation constraints on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from lad_jax.models import Transformer, tiny_config
from lad_jax.sharding import (RULES, constrain, logical_to_spec, make_mesh, model_shardings, shard_model,
                              spec_for_shape)


def test_make_mesh_fill_and_errors():
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(data=-1).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh(data=3, fsdp=-1)


def test_rules_table_specs():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("batch", "sequence", "act_embed"), mesh) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), mesh) == P(None, "fsdp", "tensor", None)
    # size-1 mesh axes are dropped
    assert logical_to_spec(("batch", "vocab"), make_mesh(fsdp=8)) == P("fsdp", None)
    # a dim not divisible by its mesh axes stays replicated instead of failing
    assert spec_for_shape(("vocab", "embed"), (7, 64), mesh) == P(None, "fsdp")
    with pytest.raises(KeyError, match="no entry"):
        logical_to_spec(("not_an_axis",))
    assert set(RULES) >= {"embed", "vocab", "heads", "kv_heads", "mlp", "batch", "layers", "head_dim"}


def test_model_param_shardings_and_constrained_forward():
    mesh = make_mesh(fsdp=4, tensor=2)
    model = Transformer(tiny_config("qwen2", tie_word_embeddings=False), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (8, 6), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(6), (8, 6))
    f = nnx.jit(lambda m, t, p: m(t, p)[0])
    ref = f(model, tokens, positions)
    shardings = model_shardings(model, mesh)
    assert shardings["blocks"]["wq"].get_value().spec == P(None, "fsdp", "tensor", None)
    assert shardings["lm_head"].get_value().spec == P("fsdp", "tensor")
    shard_model(model, mesh)
    w = model.blocks.w_down[...]
    assert max(s.data.nbytes for s in w.addressable_shards) * 8 == w.nbytes
    with jax.set_mesh(mesh):
        x = jax.jit(lambda a: constrain(a * 2, ("batch", "sequence", "act_embed")))(jnp.ones((8, 6, 4)))
        assert x.sharding.spec[0] in ("fsdp", ("fsdp",)) and all(a is None for a in x.sharding.spec[1:])
        got = f(model, tokens, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    # without a mesh context the constraint is a no-op
    assert constrain(jnp.ones((8, 2)), ("batch", None)).shape == (8, 2)

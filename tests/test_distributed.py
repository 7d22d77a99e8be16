"""`lad_jax.distributed` building blocks, in one process and in 2 local processes under `jax.distributed`."""
import os
import sys

import numpy as np
import pytest

from multihost import ProcessGroup, check_all_ok

def test_score_rows_single_process_matches_the_reward_fn():
    from lad_jax.distributed import score_rows, share

    def reward_fn(completions, rows, num_tokens=None):
        r = np.array([float(c == row["answer"]) for c, row in zip(completions, rows)], np.float32)
        return r, {"ok/mean": float(r.mean()), "tokens/sum": float(np.sum(num_tokens))}

    rows = [{"answer": "a"}, {"answer": "b"}, {"answer": "c"}]
    rewards, metrics = score_rows(reward_fn, ["a", "x", "c"], rows, num_tokens=np.array([1, 2, 3]))
    np.testing.assert_array_equal(rewards, [1, 0, 1])
    assert metrics == {"ok/mean": pytest.approx(2 / 3), "tokens/sum": 6.0}
    plain, none = score_rows(lambda c, r: np.ones(len(c)), ["a"], rows[:1])  # rewards only, no num_tokens
    assert plain.tolist() == [1.0] and none == {}
    assert [share(10, i, 3) for i in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert [share(2, i, 4) for i in range(4)] == [slice(0, 0), slice(0, 1), slice(1, 1), slice(1, 2)]


PROMPTS = [[3, 4, 5], [7], [9, 10, 11, 12, 13], [2, 2]]


def create_tiny(mesh):
    from lad_jax.models import ModelConfig, create_model

    config = ModelConfig(model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=64)
    return create_model(config, seed=0, mesh=mesh)


# Run by each of 2 processes (4 fake devices each). The mesh interleaves the processes' devices so that every
# tensor pair spans both hosts and each host holds rows that the other also holds.
_SCRIPT = r'''
import sys
import jax
import numpy as np
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from lad_jax import distributed
from test_distributed import PROMPTS, create_tiny

by_proc = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
order = [d for pair in zip(*by_proc) for d in pair]  # p0d0, p1d0, p0d1, p1d1, ...
mesh = Mesh(np.asarray(order).reshape(1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
host = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)
for spec in (P("fsdp"), P(("data", "fsdp")), P(None, "tensor"), P("fsdp", "tensor"), P()):
    x = distributed.global_array(host, NamedSharding(mesh, spec))
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    np.testing.assert_array_equal(distributed.to_host(x * 2), host * 2)

def reward_fn(completions, rows, num_tokens=None):
    r = np.array([len(c) + row["bonus"] for c, row in zip(completions, rows)], np.float32)
    return r, {"len/mean": float(np.mean([len(c) for c in completions])), "tokens/mean": float(np.mean(num_tokens))}

texts = ["a", "bb", "ccc", "dddd", "eeeee"]
rows = [{"bonus": i} for i in range(5)]
rewards, metrics = distributed.score_rows(reward_fn, texts, rows, num_tokens=np.arange(5) + 1)
np.testing.assert_array_equal(rewards, [1, 3, 5, 7, 9])
assert abs(metrics["len/mean"] - 3.0) < 1e-6 and abs(metrics["tokens/mean"] - 3.0) < 1e-6, metrics
try:
    distributed.check_same("the test values", jax.process_index())
except ValueError as e:
    assert "differ between processes" in str(e)
else:
    raise AssertionError("check_same accepted different values")
distributed.check_same("the test values", "same")

from lad_jax import sampler
model = create_tiny(mesh)
out = sampler.generate(model, PROMPTS, max_new_tokens=6, num_samples=2, temperature=1.0, seed=7, mesh=mesh)
assert sampler.prefill_rows() == {"calls": 1, "rows": len(PROMPTS)}  # each prompt prefilled once over both hosts
np.savez(sys.argv[3] + f"/gen{jax.process_index()}.npz", tokens=np.asarray(out.tokens_bt),
         logprobs=np.asarray(out.logprobs_bt), lengths=np.asarray(out.lengths_b))
from lad_jax.sampler_continuous import generate_continuous
# 8 requests through 4 slots (one per data x fsdp shard, each shard's slots on both hosts' devices)
cont = generate_continuous(model, PROMPTS, max_new_tokens=6, num_samples=2, temperature=1.0, seed=7, mesh=mesh,
                           decode_slots=4)
np.savez(sys.argv[3] + f"/cont{jax.process_index()}.npz", tokens=np.asarray(cont.tokens_bt),
         logprobs=np.asarray(cont.logprobs_bt), lengths=np.asarray(cont.lengths_b))
print("OK", jax.process_index())
'''


def test_global_arrays_and_scoring_across_two_processes(tmp_path):
    script = tmp_path / "mp_check.py"
    script.write_text(_SCRIPT)
    group = ProcessGroup.start(
        lambda i, port: [sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(tmp_path)],
        num_processes=2, devices_per_process=4, log_dir=tmp_path, pythonpath=os.path.dirname(__file__))
    results = group.wait(timeout=180)
    check_all_ok(results)
    assert [out.strip().splitlines()[-1] for _, out, _ in results] == ["OK 0", "OK 1"]

    # Both hosts got the whole output, equal to one process sampling the same prompts on 8 devices.
    from lad_jax import sampler
    from lad_jax.sharding import make_mesh

    mesh = make_mesh(1, 4, 2)
    ref = sampler.generate(create_tiny(mesh), PROMPTS, max_new_tokens=6, num_samples=2, temperature=1.0, seed=7,
                           mesh=mesh)
    # and continuous batching across both hosts draws the same tokens as the static sampler (issue 13's contract)
    for i in range(2):
        for name, atol in (("gen", 1e-6), ("cont", 1e-5)):
            got = np.load(tmp_path / f"{name}{i}.npz")
            np.testing.assert_array_equal(got["tokens"], np.asarray(ref.tokens_bt), err_msg=name)
            np.testing.assert_array_equal(got["lengths"], np.asarray(ref.lengths_b), err_msg=name)
            np.testing.assert_allclose(got["logprobs"], np.asarray(ref.logprobs_bt), atol=atol, err_msg=name)


def test_distributed_on_without_a_cluster_names_the_keys(tmp_path):
    import subprocess

    from multihost import REPO, process_env

    proc = subprocess.run([sys.executable, "-m", "lad_jax.train", "--config", "configs/tiny_test.yaml",
                           f"output_dir={tmp_path}", "mesh.distributed=on"], cwd=REPO, env=process_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: jax.distributed.initialize() failed") and "mesh.num_processes" in last

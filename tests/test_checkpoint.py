"""lad_jax.checkpoint: save/restore onto shardings, keep-last-K, atomicity under SIGKILL, SIGTERM flag."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lad_jax.checkpoint import (
    CheckpointError,
    CheckpointManager,
    install_preemption_handler,
    rng_from_json,
    rng_to_json,
)


def _state(scale):
    return {
        "params": {"w": jnp.arange(32.0).reshape(8, 4) * scale, "b": jnp.ones((4,), jnp.bfloat16) * scale},
        "step": jnp.asarray(int(scale), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(int(scale))),
    }


def test_save_every_keep_last_and_sharded_restore(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", save_every=2, keep_last=2, async_save=True)
    assert mgr.restore_latest(_state(0)) is None
    key = jax.random.key(7)
    saved = [s for s in range(1, 8) if mgr.save(s, _state(s), meta={"data": {"next_index": s}, "rng": rng_to_json(key)})]
    assert saved == [2, 4, 6]
    assert mgr.save(7, _state(7), meta={"data": {"next_index": 7}}, force=True)
    assert not mgr.save(7, _state(8), meta={}, force=True)  # an existing step is never overwritten
    mgr.wait()
    assert mgr.all_steps() == [6, 7] and mgr.latest_step() == 7
    mgr.close()

    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    w_sharding = NamedSharding(mesh, P("fsdp", "tensor"))
    rep = NamedSharding(mesh, P())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), _state(0))
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=w_sharding)
    reader = CheckpointManager(tmp_path / "ckpt", save_every=2, keep_last=2)
    assert reader.read_meta()["data"] == {"next_index": 7} and reader.read_meta(6)["data"] == {"next_index": 6}
    assert rng_from_json(reader.read_meta(6)["rng"]).shape == ()
    step, state, meta = reader.restore_latest(target)
    assert step == 7 and meta == {"data": {"next_index": 7}}
    assert state["params"]["w"].sharding == w_sharding
    assert len(state["params"]["w"].addressable_shards) == 8
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, _state(7))
    assert state["params"]["b"].dtype == jnp.bfloat16
    params_only, _ = reader.restore(6, {"params": target["params"]}, partial=True)
    assert set(params_only) == {"params"} and params_only["params"]["w"].sharding == w_sharding
    np.testing.assert_array_equal(np.asarray(params_only["params"]["w"]), np.asarray(_state(6)["params"]["w"]))
    with pytest.raises(ValueError):
        reader.restore(6, {"params": target["params"]})  # a structure mismatch is an error unless partial=True


def test_rng_json_roundtrip_and_bad_inputs(tmp_path):
    key = jax.random.split(jax.random.key(3), 2)
    back = rng_from_json(rng_to_json(key))
    np.testing.assert_array_equal(jax.random.key_data(back), jax.random.key_data(key))
    assert jax.random.uniform(back[1]) == jax.random.uniform(key[1])
    mgr = CheckpointManager(tmp_path / "c", save_every=1, keep_last=1, async_save=False)
    with pytest.raises(CheckpointError, match=r"\['rng'\].*key_data"):
        mgr.save(1, {"rng": jax.random.key(0)}, meta={})
    with pytest.raises(CheckpointError, match="JSON"):
        mgr.save(1, {"x": jnp.zeros(2)}, meta={"bad": object()})
    mgr.close()
    with pytest.raises(CheckpointError, match="keep_last"):
        CheckpointManager(tmp_path / "d", save_every=1, keep_last=0)


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from lad_jax.checkpoint import CheckpointManager

    mgr = CheckpointManager(sys.argv[1], save_every=1, keep_last=3, async_save=True)
    mgr.save(1, {"w": jnp.full((64, 64), 1.0)}, meta={"step": 1})
    mgr.wait()

    async def die_before_commit(self, *args, **kwargs):
        # every byte of step 2 is written, but the process dies before the commit (rename)
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die_before_commit
    mgr.save(2, {"w": jnp.full((64, 64), 2.0)}, meta={"step": 2})
    mgr.wait()
    print("NOT KILLED")
    """
)


def test_save_killed_half_way_keeps_last_good_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, directory], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    leftovers = [name for name in os.listdir(directory) if name.startswith("2.") and "tmp" in name]
    assert leftovers, os.listdir(directory)  # the unfinished save really started writing step 2
    reader = CheckpointManager(directory, save_every=1, keep_last=1, read_only=True)
    assert reader.latest_step() == 1 and reader.read_meta() == {"step": 1}
    assert all(os.path.exists(os.path.join(directory, n)) for n in leftovers)  # read-only never cleans up
    with pytest.raises(CheckpointError, match="read-only"):
        reader.save(5, {"w": jnp.zeros((64, 64))}, meta={}, force=True)
    mgr = CheckpointManager(directory, save_every=1, keep_last=3)
    assert mgr.latest_step() == 1
    step, state, meta = mgr.restore_latest({"w": jnp.zeros((64, 64))})
    assert step == 1 and meta == {"step": 1} and float(state["w"][0, 0]) == 1.0
    assert mgr.save(2, {"w": jnp.full((64, 64), 3.0)}, meta={"step": 2})  # re-saving the same step works
    mgr.wait()
    assert mgr.restore_latest({"w": jnp.zeros((64, 64))})[2] == {"step": 2}
    assert not [n for n in os.listdir(directory) if "tmp" in n]
    mgr.close()


def test_sigterm_sets_preemption_flag():
    calls = []
    flag = install_preemption_handler(lambda: calls.append(1))
    try:
        assert not flag.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.is_set() and calls == [1]
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not None


def _big(scale):  # large enough that its bytes live in a data file, not inline in the OCDBT manifest
    return {"w": jnp.arange(4096.0).reshape(64, 64) * scale, "step": jnp.asarray(int(scale), jnp.int32)}


@pytest.mark.parametrize("damage", ["truncated_array", "deleted_meta", "deleted_manifest"])
def test_damaged_newest_checkpoint_falls_back_and_is_kept(tmp_path, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    mgr = CheckpointManager("ckpt", save_every=1, keep_last=3)  # relative paths mean "from here"
    for step in (1, 2, 3):
        mgr.save(step, _big(step), meta={"step": step})
    mgr.close()
    newest = tmp_path / "ckpt" / "3"
    files = [p for p in newest.rglob("*") if p.is_file()]
    if damage == "truncated_array":
        big = max((p for p in files if "/d/" in str(p)), key=lambda p: p.stat().st_size)
        os.truncate(big, big.stat().st_size // 2)
    elif damage == "deleted_meta":
        (newest / "meta" / "metadata").unlink()
    else:
        for p in files:
            if p.name == "manifest.ocdbt":
                p.unlink()
    lines = []
    mgr = CheckpointManager("ckpt", save_every=1, keep_last=3)
    step, state, meta = mgr.restore_latest(_big(0), log=lines.append)
    assert step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_big(2)["w"]))
    assert len(lines) == 1 and "step 3" in lines[0] and "3.damaged" in lines[0] and "\n" not in lines[0]
    assert (tmp_path / "ckpt" / "3.damaged").is_dir() and not newest.exists()
    assert mgr.save(3, _big(3), meta={"step": 3})  # the step number is free again
    mgr.close()
    assert CheckpointManager("ckpt", save_every=1, keep_last=3).restore_latest(_big(0))[0] == 3


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", save_every=1, keep_last=2)
    mgr.save(1, _big(1), meta={"step": 1})
    mgr.close()
    (tmp_path / "ckpt" / "1" / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint .* can be restored .*step 1"):
        CheckpointManager(tmp_path / "ckpt", save_every=1, keep_last=2).restore_latest(_big(0))
    assert (tmp_path / "ckpt" / "1").is_dir()  # untouched

"""lad_jax.plan: every phase compiles on the 8 fake CPU devices with abstract arrays, its numbers are the trainer's own
programs' numbers, and the command line reports bad flags and configs that do not fit."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import plan
from lad_jax.config import load_config

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny_test.yaml")
# 64 new tokens: two decode windows, so a cache growth between them; eval with the rollout's own shapes (16 prompt
# slots, same prompts and samples), so its programs are the rollout's and come from the compilation cache.
OVERRIDES = ["rollout.max_new_tokens=64", "model.max_position_embeddings=96", "data.max_prompt_tokens=16",
             "rollout.old_logprobs=recompute", "eval.enabled=true", "eval.num_samples=4", "eval.max_prompts=8"]


@pytest.fixture(scope="module")
def report():
    c = load_config(TINY, OVERRIDES)
    return plan.plan(c, jax.devices()[:8])


def test_every_phase_compiles_and_reports_numbers(report):
    names = [p["name"] for p in report["phases"]]
    sampler = ["prefill", "decode_weights", "start", "decode_48", "grow_k_80", "grow_v_80", "decode_80"]
    assert names == ["train_step", "recompute", *(f"rollout_{n}" for n in sampler), *(f"eval_{n}" for n in sampler)]
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for p in report["phases"]:
        assert p["argument_bytes"] > 0 and p["output_bytes"] > 0, p
        assert p["peak_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
        assert p["fits"] is None  # CPU devices have no HBM limit unless one is given
    by = {p["name"]: p for p in report["phases"]}
    # The train step donates its state (aliased), the decode its loop state; the growth cannot (larger buffers).
    assert by["train_step"]["alias_bytes"] > 0 and by["rollout_decode_80"]["alias_bytes"] > 0
    # The rollout keeps the optimizer state resident; during the growth also the params, weights and other layers.
    # The decode's arguments are the decode weights and its state: jit drops the unused params, which the train state
    # keeps alive, so they count as resident there.
    assert by["rollout_decode_48"]["argument_bytes"] <= (by["rollout_decode_weights"]["output_bytes"]
                                                         + by["rollout_start"]["output_bytes"])
    assert by["rollout_decode_48"]["resident_bytes"] == report["train_state_bytes"] > \
        by["rollout_prefill"]["resident_bytes"] > 0
    assert by["rollout_grow_v_80"]["resident_bytes"] > by["rollout_grow_k_80"]["resident_bytes"] > \
        by["rollout_prefill"]["resident_bytes"]
    # eval was given the rollout's shapes: the same programs, the same numbers
    for phase in sampler:
        assert by[f"eval_{phase}"]["peak_bytes"] == by[f"rollout_{phase}"]["peak_bytes"]
    text = plan.format_report(report)
    assert "train_step" in text and "MiB" in text and "no HBM limit" in text


def test_auto_decode_slots_follow_the_chips_memory(report):
    """rollout.decode_slots=auto (the default): with room for every request the plan compiles static batches; with
    a chip whose free memory (usable HBM less the train state) holds 2 slots per shard it resolves the trainer's rule
    to 16 continuous-batching slots and compiles those; with room for none it reports the rollout as not fitting."""
    from lad_jax import decode_memory
    from lad_jax.sharding import make_mesh
    from lad_jax.train_step import full_params

    c = load_config(TINY, OVERRIDES)
    assert c.rollout.decode_slots == "auto" and report["decode_slots_auto"].endswith("cap 256/shard)")
    assert "static batches" in report["decode_slots_auto"]
    mesh = make_mesh(1, 8, 1, devices=jax.devices()[:8])
    planner = plan.Planner(c, mesh)
    need = decode_memory.for_rollout(c, planner.model_config, mesh, None, full_params(planner.state))
    free = (need.fixed_bytes + 2 * need.slot_bytes + need.slot_bytes // 2) / c.rollout.decode_memory_fraction
    small = plan.plan(c, jax.devices()[:8], hbm_gib=(report["train_state_bytes"] + free) / 2 ** 30,
                      groups=("rollout",))
    assert "-> 16 continuous-batching slots (32 requests over 8 shard(s)" in small["decode_slots_auto"]
    names = [p["name"] for p in small["phases"]]
    assert names[:4] == ["rollout_prefill", "rollout_decode_weights", "rollout_start", "rollout_phase_48"]
    none = plan.plan(c, jax.devices()[:8], hbm_gib=report["train_state_bytes"] / 2 ** 30, groups=("rollout",))
    assert [p["name"] for p in none["phases"]] == ["rollout_decode_slots"] and none["fits"] is False
    assert "rollout.decode_memory_fraction" in none["phases"][0]["error"]
    assert "not compiled" in plan.format_report(none)


def _analysis(compiled):
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)


def test_train_step_is_the_trainers_own(report, tmp_path):
    """The plan's train-step numbers equal compiling the Trainer's TrainStep on real (initialized) arrays."""
    from lad_jax.train_setup import build
    from lad_jax.train_step import TrainStep, init_train_state

    c = load_config(TINY, OVERRIDES + [f"output_dir={tmp_path}"])
    s = build(c)
    step = TrainStep(c, s.graphdef, s.tx, s.schedule, s.mesh, s.shardings)
    state = init_train_state(s.tx, s.params, s.shardings)
    t = 16 + 64
    dtypes = {"tokens_bt": jnp.int32, "positions_bt": jnp.int32, "valid_bt": jnp.bool_, "response_bt": jnp.bool_,
              "old_logp_bt": jnp.float32, "advantages_b": jnp.float32}
    batch = {k: jax.device_put(np.zeros((2, 8) if k == "advantages_b" else (2, 8, t), d), step.batch_shardings[k])
             for k, d in dtypes.items()}
    real = _analysis(step.lower(state, batch).compile())
    p = next(p for p in report["phases"] if p["name"] == "train_step")
    assert real == (p["argument_bytes"], p["output_bytes"], p["alias_bytes"], p["temp_bytes"])


def test_does_not_fit_exits_nonzero(capsys):
    # the fixture's config again (compiled programs come from the cache), checked against a 1 KiB chip
    code = plan.main(["--config", TINY, "--devices", "8", "--hbm-gib", "1e-6", *OVERRIDES])
    out = capsys.readouterr().out
    assert code == 3
    assert "DOES NOT FIT" in out and "largest:" in out


def test_bad_topology_names_the_flag(capsys):
    assert plan.main(["--config", TINY, "--topology", "v9-7"]) == 2
    err = capsys.readouterr().err
    assert "--topology 'v9-7' is not known" in err and "v5p-64" in err


def test_topology_table_sizes():
    t = plan.TOPOLOGIES
    assert t["v5p-64"] == ("v5:2x4x4", "megacore", (2, 2, 1))  # 32 chips (v5p names count TensorCores)
    assert t["v4-8"][0] == "v4:2x2x1" and t["v5litepod-16"] == t["v5e-16"] == ("v5e:4x4", "default", (2, 2, 1))
    for name, (topo, _, _) in t.items():
        chips = int(np.prod([int(x) for x in topo.split(":")[1].split("x")]))
        n = int(name.rsplit("-", 1)[1])
        assert chips == (n // 2 if name.startswith(("v4", "v5p")) else n), name


def test_continuous_batching_plans_its_own_phases():
    """rollout.decode_slots > 0: the plan compiles generate_continuous's programs (prefix store, slot phases per
    attention window, slot-cache resizes), not the static sampler's."""
    reports = {slots: plan.plan(load_config(TINY, [*OVERRIDES, f"rollout.decode_slots={slots}"]), jax.devices()[:8],
                                groups=("rollout",)) for slots in (8, 16)}
    names = [p["name"] for p in reports[8]["phases"]]
    assert names == ["rollout_prefill", "rollout_decode_weights", "rollout_start", "rollout_phase_48",
                     "rollout_grow_k_80", "rollout_grow_v_80", "rollout_phase_80"]
    by = {s: {p["name"]: p for p in r["phases"]} for s, r in reports.items()}
    for p in by[8].values():
        assert p["argument_bytes"] > 0 and p["error"] is None, p
    assert by[8]["rollout_phase_80"]["argument_bytes"] > by[8]["rollout_phase_48"]["argument_bytes"]  # wider window
    assert by[16]["rollout_phase_80"]["argument_bytes"] > by[8]["rollout_phase_80"]["argument_bytes"]  # more slots
    # the prefix store stays alive through a resize, beside the params and decode weights
    assert by[8]["rollout_grow_k_80"]["resident_bytes"] > by[8]["rollout_start"]["resident_bytes"]
    # the prefill is the prefix store's: each prompt once, whatever the slot count
    assert by[8]["rollout_prefill"]["output_bytes"] == by[16]["rollout_prefill"]["output_bytes"]

"""rollout.decode_slots=auto (`lad_jax.decode_memory`): static batches when every request gets a slot, otherwise the
most slots that fit the memory budget, a multiple of the batch shards; the trainer resolves it once and uses it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lad_jax import decode_memory
from lad_jax.config import ConfigError, load_config
from lad_jax.decode_memory import MAX_SLOTS_PER_SHARD, choose

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny_test.yaml")


def test_static_when_every_request_gets_a_slot():
    assert choose(256, shards=1, slot_bytes=100, fixed_bytes=0, budget_bytes=None).slots == 0
    assert choose(256, shards=1, slot_bytes=100, fixed_bytes=50, budget_bytes=50 + 256 * 100).slots == 0
    # 8 shards: 33 requests need 5 slots per shard
    assert choose(33, shards=8, slot_bytes=100, fixed_bytes=0, budget_bytes=5 * 100).slots == 0


def test_memory_bound_slots_are_a_multiple_of_the_shards():
    c = choose(256, shards=1, slot_bytes=100, fixed_bytes=50, budget_bytes=50 + 255 * 100 + 99)
    assert c.slots == 255
    c = choose(1024, shards=8, slot_bytes=1000, fixed_bytes=10_000, budget_bytes=10_000 + 37_500)
    assert c.slots == 37 * 8 and c.slots % c.shards == 0
    assert "296 continuous-batching slots" in c.describe() and "1024 requests over 8 shard(s)" in c.describe()


def test_the_cap_bounds_the_slots_per_shard():
    c = choose(4 * MAX_SLOTS_PER_SHARD + 1, shards=2, slot_bytes=1, fixed_bytes=0, budget_bytes=None)
    assert c.slots == 2 * MAX_SLOTS_PER_SHARD
    assert choose(2 * MAX_SLOTS_PER_SHARD, shards=2, slot_bytes=1, fixed_bytes=0, budget_bytes=None).slots == 0


def test_not_one_slot_names_the_settings():
    with pytest.raises(ValueError, match="rollout.max_new_tokens.*rollout.decode_memory_fraction"):
        choose(64, shards=1, slot_bytes=2 ** 20, fixed_bytes=2 ** 20, budget_bytes=2 ** 20 + 2 ** 19)


def test_slot_bytes_count_the_decode_cache():
    """The KV part equals the sampler's cache for one row; kv heads split over tensor only when they divide."""
    from lad_jax.models import ModelConfig
    from lad_jax.models.cache import init_cache

    cfg = ModelConfig(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    cache = init_cache(cfg, 1, 48)
    kv = cache["k"].nbytes + cache["v"].nbytes
    vocab_rows = decode_memory.VOCAB_ROWS_PER_SLOT * 4 * 100
    assert decode_memory.slot_bytes(cfg, cache_len=48, tensor=1) == kv + vocab_rows
    assert decode_memory.slot_bytes(cfg, cache_len=48, tensor=2) == kv // 2 + vocab_rows
    assert decode_memory.slot_bytes(cfg, cache_len=48, tensor=4) == kv + vocab_rows  # 2 kv heads stay whole


def test_config_accepts_auto_and_counts_and_names_bad_values():
    assert load_config(TINY, []).rollout.decode_slots == "auto"
    assert load_config(TINY, ["rollout.decode_slots=16"]).rollout.decode_slots == 16
    for bad, match in (("rollout.decode_slots=many", "rollout.decode_slots='many' must be auto"),
                       ("rollout.decode_slots=-2", "rollout.decode_slots=-2 must be auto"),
                       ("rollout.decode_memory_fraction=0", "rollout.decode_memory_fraction=0")):
        with pytest.raises(ConfigError, match=match):
            load_config(TINY, [bad])


def test_trainer_resolves_auto_once_against_free_memory(tmp_path, monkeypatch):
    """A budget for 3 slots per shard on the 8 fake devices: the trainer streams its 32 requests over 24
    continuous-batching slots, logs the choice, reports it, and asks for the free memory once."""
    from lad_jax.train_setup import build  # noqa: F401  (imports jax with the fake devices first)
    from lad_jax.trainer import Trainer

    c = load_config(TINY, [f"output_dir={tmp_path}", "steps=2", "eval.enabled=false", "eval.at_start=false",
                           "logging.progress_bar=false"])
    calls = []
    lines = []
    trainer = Trainer(c, log=lines.append)
    choice = decode_memory.for_rollout(c, trainer.s.model_config, trainer.s.mesh, None, trainer.s.params)
    assert choice.fixed_bytes > decode_memory.decode_weights_bytes(trainer.s.params, trainer.s.model_config, 1) > 0
    assert (choice.requests, choice.shards) == (32, 8)
    budget = choice.fixed_bytes + 3 * choice.slot_bytes + choice.slot_bytes // 2

    def free():
        calls.append(1)
        return int(budget / c.rollout.decode_memory_fraction) + 1

    monkeypatch.setattr(decode_memory, "free_bytes_per_device", free)
    trainer.run()
    assert len(calls) == 1 and trainer.decode_slots == 24
    assert any("rollout.decode_slots=auto -> 24 continuous-batching slots" in line for line in lines), lines
    assert _metrics(c)["rollout/decode_slots"] == [24.0, 24.0]


def _metrics(c) -> dict:
    import json

    rows = [json.loads(line) for line in (Path(c.run_dir) / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in rows for k in r}
    return {k: [r[k] for r in rows if k in r] for k in keys}


def test_an_explicit_count_is_used_as_given(tmp_path):
    from lad_jax import experience
    from lad_jax.train_setup import build

    c = load_config(TINY, [f"output_dir={tmp_path}", "rollout.decode_slots=0"])
    s = build(c)
    assert experience.resolve_decode_slots(c, s.model_config, s.mesh).slots == 0
    c = dataclasses.replace(c, rollout=dataclasses.replace(c.rollout, decode_slots=8))
    assert experience.resolve_decode_slots(c, s.model_config, s.mesh).slots == 8

"""logging.wandb in offline mode (no network): a short training run writes W&B's own run files under the run dir,
with exactly the scalars of metrics.jsonl at the same steps, and a resumed run continues the same W&B run."""
import glob
import json
import os
import struct
import time

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from lad_jax.config import ConfigError, load_config  # noqa: E402
from lad_jax.metrics_log import MetricsWriter, WandbOptions  # noqa: E402
from lad_jax.trainer import Trainer  # noqa: E402

_HEADER = 7  # ":W&B", a 2-byte magic number and a version byte
_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32 u32, length u16, type u8, data)


def _records(path):
    """The protobuf `Record`s of a .wandb file, fragments (types first=2, middle=3, last=4) joined."""
    data, i, pending = open(path, "rb").read(), _HEADER, b""
    while i + 7 <= len(data):
        if _BLOCK - i % _BLOCK < 7:  # a block tail too short for a record header is padding
            i += _BLOCK - i % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[i : i + 7])
        pending += data[i + 7 : i + 7 + length]
        i += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finished_records(path, timeout_s=60.0):
    """The records once the run's `exit` record is on disk: W&B's service process still writes the file for a
    moment after `finish()` has returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_runs(run_dir):
    """{offline run dir: (run id, {step: {key: value}})} with W&B's own `_step` / `_runtime` / `_timestamp` dropped."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run_id, history = None, {}
        for record in _finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                # W&B files a key containing "/" under nested_key
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                step = items.pop("_step")
                history.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
        out[path] = (run_id, history)
    return out


def _jsonl(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {row.pop("step"): row for row in rows}


def test_offline_wandb_logs_the_jsonl_scalars_and_resume_continues_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = [f"output_dir={tmp_path}", "run_name=wb", "checkpoint.every=1", "checkpoint.export_hf=false",
            "logging.tensorboard=true", "logging.wandb.mode=offline", "logging.wandb.project=lad_jax_test",
            "rollout.prompts_per_step=4", "task.num_train_prompts=32", "steps=1"]
    config = load_config("configs/tiny_test.yaml", base)
    Trainer(config, log=lambda *a, **k: None).run()
    run_dir = config.run_dir
    run_id = open(os.path.join(run_dir, "wandb_run_id")).read().strip()
    (first,) = _wandb_runs(run_dir).values()
    assert first[0] == run_id
    jsonl = _jsonl(run_dir)
    assert list(first[1]) == [1] and first[1] == jsonl  # same names, same steps, same values
    assert "rollout/accuracy" in jsonl[1] and "train/loss" in jsonl[1]

    # A resumed run (the trainer's writer reopened on the same run dir) logs into the same W&B run.
    options = WandbOptions(mode="offline", project="lad_jax_test", entity=None, run_name="wb")
    with MetricsWriter(run_dir, tensorboard=False, resume_step=1, wandb=options) as writer:
        writer.write(2, {"train/loss": 0.5})
    runs = _wandb_runs(run_dir)
    assert len(runs) == 2 and {rid for rid, _ in runs.values()} == {run_id}
    assert runs[sorted(runs)[-1]][1] == {2: {"train/loss": 0.5}}
    assert open(os.path.join(run_dir, "wandb_run_id")).read().strip() == run_id

    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        load_config("configs/tiny_test.yaml", ["logging.wandb.mode=offlne"])

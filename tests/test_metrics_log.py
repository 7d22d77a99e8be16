"""lad_jax.metrics_log: JSONL + TensorBoard writing."""
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from tensorboardX.proto import event_pb2

from lad_jax.metrics_log import MetricsWriter, to_float


def _read_scalars(event_file):
    """(step, tag, value) triples from a TensorBoard event file (TFRecord framing: len, crc, data, crc)."""
    data, i, out = event_file.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12 : i + 12 + n])
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        i += 16 + n
    return out


def test_writer_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path / "run") as writer:
        out = writer.write(1, {"loss": jnp.float32(0.5), "acc": np.float64(0.25), "n": 3, "lr": jnp.array([1e-3])})
        writer.write(2, {"loss": 0.25, "kl": float("nan")})
    assert out == {"loss": 0.5, "acc": 0.25, "n": 3.0, "lr": pytest.approx(1e-3)}
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[0]["loss"] == 0.5 and lines[0]["n"] == 3.0
    assert lines[1] == {"step": 2, "loss": 0.25, "kl": "nan"}
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = _read_scalars(events[0])
    assert (1, "loss", 0.5) in scalars and (2, "loss", 0.25) in scalars and (1, "acc", 0.25) in scalars
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:  # a resumed run appends
        writer.write(3, {"loss": 0.125})
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="scalar"):
        to_float(jnp.zeros(3))


def test_writer_resume_drops_steps_after_the_checkpoint(tmp_path):
    """A run killed after logging steps past its last checkpoint rewrites them once on resume, not twice."""
    run = tmp_path / "run"
    with MetricsWriter(run, tensorboard=False) as writer:
        for step in range(1, 7):
            writer.write(step, {"loss": float(step)})
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "lo')  # torn by the kill
    with MetricsWriter(run, tensorboard=False, resume_step=4) as writer:
        for step in range(5, 9):
            writer.write(step, {"loss": float(step)})
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    with MetricsWriter(run, tensorboard=False, resume_step=0) as writer:  # no checkpoint: a fresh start
        writer.write(1, {"loss": 9.0})
    assert (run / "metrics.jsonl").read_text().splitlines() == ['{"step": 1, "loss": 9.0}']


def _tensorboard_series(run_dir, tag):
    """The (step, value) series TensorBoard shows for `tag`: event files read in name (time) order, and a
    SessionLog.START at step s (what `purge_step` writes) discards every earlier event at step >= s, as TensorBoard's
    event accumulator does."""
    series: dict[int, float] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 16 + n
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                series = {s: v for s, v in series.items() if s < event.step}
            for v in event.summary.value:
                if v.tag == tag:
                    assert event.step not in series, f"step {event.step} of {tag} logged twice"
                    series[event.step] = v.simple_value
    return sorted(series.items())


def test_tensorboard_resume_purges_steps_after_the_checkpoint(tmp_path):
    """A resumed run's TensorBoard shows each step once, with the resumed attempt's values."""
    run = tmp_path / "run"
    with MetricsWriter(run) as writer:
        for step in range(1, 7):
            writer.write(step, {"loss": float(step)})
    with MetricsWriter(run, resume_step=4) as writer:  # killed after step 6, last checkpoint at step 4
        for step in range(5, 9):
            writer.write(step, {"loss": 10.0 * step})
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    assert _tensorboard_series(run, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0),
                                                (7, 70.0), (8, 80.0)]


def test_writer_remote_url_rewrites_the_whole_object(tmp_path, monkeypatch):
    """Object stores have no append: a URL run dir keeps its lines and rewrites metrics.jsonl (fsspec memory://)."""
    import uuid

    import fsspec

    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would show up here
    url = f"memory://bucket-{uuid.uuid4().hex}/runs/r1"
    fs, root = fsspec.core.url_to_fs(url)

    def lines():
        return [json.loads(x) for x in fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()]

    with MetricsWriter(url, tensorboard=True, remote_upload_s=0.0) as writer:
        writer.write(1, {"loss": 1.0})
        assert lines() == [{"step": 1, "loss": 1.0}]  # uploaded right away with remote_upload_s=0
        writer.write(2, {"loss": 0.5})
    assert [r["step"] for r in lines()] == [1, 2]
    events = [p for p in fs.ls(root, detail=False) if "events.out.tfevents" in p]
    assert len(events) == 1
    event_file = tmp_path / "events.bin"
    event_file.write_bytes(fs.cat_file(events[0]))
    assert (2, "loss", 0.5) in _read_scalars(event_file)
    event_file.unlink()

    with MetricsWriter(url, tensorboard=False) as writer:  # a resumed run: read the object, then append
        writer.write(3, {"loss": 0.25})
        assert [r["step"] for r in lines()] == [1, 2]  # throttled: not uploaded yet
        writer.flush()
        assert [r["step"] for r in lines()] == [1, 2, 3]
        writer.write(4, {"loss": 0.125})
    assert [r["step"] for r in lines()] == [1, 2, 3, 4]
    assert list(tmp_path.iterdir()) == []  # no local "memory:" directory

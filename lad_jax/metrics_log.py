"""Metric sinks: `metrics.jsonl` (one JSON object per step) plus TensorBoard scalars."""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from typing import Any, Mapping

import numpy as np

from lad_jax import run_files


def to_float(value: Any) -> float:
    """A Python float from a Python/numpy/jax scalar (or size-1 array); raises on anything else."""
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return float(value)
    array = np.asarray(value)  # a jax array blocks here until it is computed
    if array.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


def _line_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn or unreadable line counts as after every step (it is dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _json_number(value: float) -> float | str:
    # Strict JSON has no NaN/Infinity literals; keep them visible as strings.
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Appends `{"step": step, **metrics}` lines to `run_dir/metrics.jsonl` and (optionally) TensorBoard events.

    `run_dir` may be local or a URL (gs://..., any fsspec protocol); TensorBoard event files go to `run_dir` itself.
    `resume_step`: the step the run (re)starts from; lines of later steps, written by an earlier attempt that died
    before its next checkpoint, are dropped (and TensorBoard purges their events), so a resumed run's files hold each
    step once, as an uninterrupted run's do. None keeps the file as it is.

    Object stores have no append (gcsfs silently turns append mode into overwrite), so for a URL the writer reads
    the existing object once, keeps all lines in memory and rewrites the whole object: at most every
    `remote_upload_s` seconds from `write`, and always on `flush` / `close`.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, remote_upload_s: float = 30.0,
                 resume_step: int | None = None):
        self.run_dir = os.fspath(run_dir)
        self.remote = run_files.is_remote(self.run_dir)
        run_files.makedirs(self.run_dir)
        self.path = run_files.join(self.run_dir, "metrics.jsonl")
        self._remote_upload_s = remote_upload_s
        self._file = None
        self._lines: list[str] = []
        self._dirty = False
        self._uploaded_at = time.monotonic()
        lines: list[str] = []
        if self.remote or resume_step is not None:  # a local file is only read to drop steps after the resume
            existing = run_files.read_text(self.path) or ""
            if existing and not existing.endswith("\n"):
                existing += "\n"  # a torn last line stays on its own line
            lines = existing.splitlines(keepends=True)
        if resume_step is not None:
            kept = [line for line in lines if _line_step(line) <= resume_step]
            if len(kept) != len(lines):
                lines = kept
                run_files.write_text(self.path, "".join(lines))
        if self.remote:
            self._lines = lines
        else:
            self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            if self.remote:
                _ensure_tensorboard_backend(self.run_dir)
            purge = None if resume_step is None else int(resume_step) + 1
            # tensorboardX names event files by the second and opens them with "wb": a writer started in the same
            # second as an earlier one (a fast resume) would truncate its file. The nanosecond suffix keeps names
            # unique and in time order, which is the order TensorBoard reads them in.
            self._tb = SummaryWriter(logdir=self.run_dir, purge_step=purge, filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Writes one step's scalars; returns them as floats."""
        values = {name: to_float(value) for name, value in metrics.items()}
        record = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._uploaded_at >= self._remote_upload_s:
                self._upload()
        else:
            self._file.write(line)
            self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=int(step))
        return values

    def _upload(self) -> None:
        run_files.write_text(self.path, "".join(self._lines))
        self._dirty = False
        self._uploaded_at = time.monotonic()

    def flush(self) -> None:
        if self.remote:
            if self._dirty:
                self._upload()
        else:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self.remote:
            if self._dirty:
                self._upload()
        elif not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FsspecRecordWriter:
    """tensorboardX record writer for fsspec URLs: buffers the event file and rewrites the object on flush."""

    def __init__(self, path: str):
        self.path = path
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        run_files.write_bytes(self.path, bytes(self.buffer))

    def close(self) -> None:
        self.flush()


class _FsspecRecordWriterFactory:
    def open(self, path: str) -> _FsspecRecordWriter:
        return _FsspecRecordWriter(path)

    def directory_check(self, path: str) -> None:
        run_files.makedirs(path)


def _ensure_tensorboard_backend(url: str) -> None:
    """tensorboardX writes gs:// and s3:// itself; any other URL scheme gets the fsspec writer above."""
    from tensorboardX import record_writer

    scheme = url.split("://", 1)[0]
    if scheme not in record_writer.REGISTERED_FACTORIES:
        record_writer.register_writer_factory(scheme, _FsspecRecordWriterFactory())


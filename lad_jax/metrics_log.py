"""Metric sinks: `metrics.jsonl` (one JSON object per step) plus TensorBoard scalars, and one-step-late reading.

`DeferredMetrics` implements the "read metrics one step late" pattern: the train loop hands it step N's metrics
while they are still device arrays (still being computed), dispatches step N+1, and only then converts step N's
metrics to Python floats. The blocking device->host copy therefore overlaps with step N+1's computation instead
of stalling dispatch.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Mapping

import numpy as np
from etils import epath


def to_float(value: Any) -> float:
    """A Python float from a Python/numpy/jax scalar (or size-1 array); raises on anything else."""
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return float(value)
    array = np.asarray(value)  # a jax array blocks here until it is computed
    if array.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


def _json_number(value: float) -> float | str:
    # Strict JSON has no NaN/Infinity literals; keep them visible as strings.
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Appends `{"step": step, **metrics}` lines to `run_dir/metrics.jsonl` and (optionally) TensorBoard events.

    `run_dir` may be local or any etils.epath URL (gs://...); TensorBoard event files go to `run_dir` itself.
    Appending means a resumed run continues the same file (steps after the resume point are written again).
    """

    def __init__(self, run_dir: str | epath.PathLike, *, tensorboard: bool = True):
        self.run_dir = epath.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.run_dir))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Writes one step's scalars; returns them as floats."""
        values = {name: to_float(value) for name, value in metrics.items()}
        record = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=int(step))
        return values

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeferredMetrics:
    """Holds one step's device metrics until the next step has been dispatched.

    Loop shape::

        deferred = DeferredMetrics()
        for step in ...:
            state, metrics = train_step(state, batch)            # dispatched, not finished
            ready = deferred.push(step, metrics)                   # converts the *previous* step's metrics
            if ready: writer.write(*ready)
        ready = deferred.flush()                                   # the last step's metrics
    """

    def __init__(self):
        self._pending: tuple[int, Mapping[str, Any]] | None = None

    def push(self, step: int, metrics: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
        """Stores `metrics` for `step`; returns the previously stored step's metrics as floats (or None)."""
        previous, self._pending = self._pending, (int(step), metrics)
        return self._materialise(previous)

    def flush(self) -> tuple[int, dict[str, float]] | None:
        """Returns (and clears) the stored metrics as floats, or None when nothing is pending."""
        previous, self._pending = self._pending, None
        return self._materialise(previous)

    @staticmethod
    def _materialise(entry):
        if entry is None:
            return None
        step, metrics = entry
        return step, {name: to_float(value) for name, value in metrics.items()}

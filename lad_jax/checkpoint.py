"""Checkpoints (orbax): atomic, asynchronous, keep-last-K saves of the train state plus JSON metadata.

A checkpoint step directory holds two items:
  * ``state``: the array pytree (params, optimizer state, step counter, RNG key data, ...), saved with orbax's
    PyTreeSave so every process writes only its shards; restored onto the shardings of an abstract pytree
    (``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``), so restoring never gathers a full copy on one device;
  * ``meta``: a JSON dict (data-iterator state, resolved config, anything small and non-array).

Atomicity comes from orbax: a step is written into ``<step>.orbax-checkpoint-tmp-*`` and renamed to ``<step>``
only once every item is complete (on object stores that lack rename, orbax uses a commit-success marker instead).
`latest_step` and `restore_latest` only see finished steps, so a process killed half-way through a save leaves the
last good checkpoint in place; the stale tmp directory is removed by the next `CheckpointManager` on that directory.
Directories may be local paths or ``gs://`` URLs (orbax resolves them through etils.epath).

PRNG keys: typed key arrays (``jax.random.key``) cannot be serialised directly. Save ``jax.random.key_data(key)``
(a uint32 array) inside the state pytree, or `rng_to_json(key)` inside ``meta``, and rewrap on restore with
``jax.random.wrap_key_data(data, impl=...)`` / `rng_from_json`. `save` rejects typed keys with that advice.

Preemption: `install_preemption_handler()` turns SIGTERM into a flag that the train loop polls after each step,
so it can do a final ``save(step, ..., force=True)``, ``wait()`` and exit cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lad_jax import distributed


class CheckpointError(ValueError):
    """Invalid checkpoint input (non-JSON metadata, typed PRNG keys in the state, bad options)."""


def rng_to_json(key: jax.Array) -> dict[str, Any]:
    """A typed PRNG key (or key array) as JSON: {"impl": name, "data": nested list of uint32}."""
    return {"impl": str(jax.random.key_impl(key)), "data": np.asarray(jax.random.key_data(key)).tolist()}


def rng_from_json(value: dict[str, Any]) -> jax.Array:
    """Inverse of `rng_to_json`."""
    return jax.random.wrap_key_data(np.asarray(value["data"], dtype=np.uint32), impl=value["impl"])


def _check_state(state: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise CheckpointError(
                f"state leaf {jax.tree_util.keystr(path)} is a typed PRNG key; store "
                f"jax.random.key_data(key) instead and rewrap with jax.random.wrap_key_data on restore"
            )


def _abstract(tree: Any) -> Any:
    """Concrete arrays -> ShapeDtypeStruct with the same sharding; ShapeDtypeStructs pass through."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


class CheckpointManager:
    """Saves every `save_every` steps (or when forced), keeps the last `keep_last` finished checkpoints."""

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        save_every: int,
        keep_last: int,
        async_save: bool = True,
        read_only: bool = False,
    ):
        """`read_only=True` (e.g. evaluating a run that is still training) never writes, deletes or cleans up."""
        if save_every <= 0:
            raise CheckpointError(f"save_every must be a positive number of steps, got {save_every}")
        if keep_last <= 0:
            raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
        directory = os.fspath(directory)
        # orbax wants absolute paths; a relative one on any command line means "from here"
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        self.save_every = save_every
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1,  # the step % save_every decision is ours
            max_to_keep=None if read_only else keep_last,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # remove leftovers of saves that were killed half-way
            read_only=read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, *, meta: dict[str, Any], force: bool = False) -> bool:
        """Starts saving `state` and `meta` if `step % save_every == 0` (or `force`); returns whether it did.

        With async saving the arrays are copied off-device before this returns, so the caller may donate or
        overwrite `state` right away; the files are written in the background (see `wait`).
        """
        if self.read_only:
            raise CheckpointError(f"this CheckpointManager on {self.directory} is read-only; it cannot save")
        try:
            meta = json.loads(json.dumps(meta))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint meta must be JSON-serialisable: {e}") from e
        _check_state(state)
        if not force and int(step) % self.save_every != 0:
            return False
        if int(step) in self._manager.all_steps():
            return False  # e.g. the final save after SIGTERM lands on a step that was just saved
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def latest_step(self) -> int | None:
        """The newest finished step (unfinished saves are invisible), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any, *, partial: bool = False,
                       log: Callable[[str], None] = print) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest finished checkpoint that restores cleanly, or None when there is none.

        Damaged newer steps (truncated or missing files) are skipped, each with one line through `log` naming the step
        and the error, and moved aside to `<step>.damaged` (never deleted), so the run resumes from the newest good
        step and later saves can reuse the step numbers. When no step restores, nothing is moved and CheckpointError
        says why (a run must not silently start over). With several processes a step counts as damaged when it fails
        on any process. See `restore` for the arguments.
        """
        self.wait()
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state, partial=partial)
                error = None
            except Exception as e:  # orbax / tensorstore raise many types for damaged files
                state = meta = None
                error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if distributed.allgather(np.asarray([error is not None], np.int32)).any():
                damaged.append((step, error or "failed on another process"))
                continue
            for bad, why in damaged:
                if self.read_only:
                    log(f"checkpoint step {bad} in {self.directory} cannot be restored ({why}); using step {step}")
                else:
                    log(f"checkpoint step {bad} in {self.directory} cannot be restored ({why}); skipped it, kept as "
                        f"{self._move_aside(bad).name}; resuming from step {step}")
            return step, state, meta
        if damaged:
            bad, why = damaged[0]
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored (newest: step {bad}: {why}); "
                                  "repair or move the directory away to start over, or set checkpoint.resume=false")
        return None

    def _move_aside(self, step: int) -> epath.Path:
        aside = self.directory / f"{step}.damaged"
        n = 1
        while aside.exists():
            n += 1
            aside = self.directory / f"{step}.damaged{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"lad_jax checkpoint {step} moved aside")
        self._manager.reload()
        return aside

    def restore(self, step: int, abstract_state: Any, *, partial: bool = False) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of a finished `step`.

        `abstract_state` is a pytree like the saved one whose leaves are `jax.ShapeDtypeStruct`s with shardings
        (or concrete arrays, whose shardings are used); arrays are restored directly onto those shardings.
        `partial=True` restores only the subtrees present in `abstract_state` (e.g. {"params": ...} for evaluation,
        skipping the optimizer state); otherwise the structure must match the saved one.
        """
        self.wait()
        abstract = _abstract(abstract_state)
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=partial,
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        """The JSON meta of `step` (default: the newest finished step) without touching the arrays; None if none."""
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until any in-flight asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionFlag:
    """Set by SIGTERM once `install_preemption_handler` ran; the train loop polls `is_set()`."""

    def __init__(self):
        self._event = threading.Event()
        self._previous: Any = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()

    def uninstall(self) -> None:
        """Restores the SIGTERM handler that was active before installation."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def install_preemption_handler(callback: Callable[[], None] | None = None) -> PreemptionFlag:
    """Installs a SIGTERM handler that sets the returned flag (and calls `callback`, which must be quick).

    The handler only records the request: the train loop checks `flag.is_set()` between steps, saves with
    ``force=True``, waits for the save and exits. Must be called from the main thread (a Python rule for signals).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_preemption_handler must be called from the main thread")
    flag = PreemptionFlag()

    def handler(signum, frame):
        flag.set()
        if callback is not None:
            callback()

    flag._previous = signal.signal(signal.SIGTERM, handler)
    return flag

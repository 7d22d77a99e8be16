"""Errors a user can fix end a command with one line that names the file or key and the fix, not a traceback.

`main_with_clear_errors(fn, argv)` runs an entry point's `fn(argv)`; a `ConfigError` (config and YAML), `DataError`
(data files), `CheckpointError` or `OSError` (missing paths, unwritable output directories, HF checkpoints that
cannot be found) exits with status 2 and "<kind> error: <message>". `LAD_DEBUG=1` re-raises with the traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

_KINDS = (("lad_jax.config_checks", "ConfigError", "config"), ("lad_jax.data", "DataError", "data"),
          ("lad_jax.checkpoint", "CheckpointError", "checkpoint"))


def _kind(e: BaseException) -> str | None:
    for module, name, kind in _KINDS:
        loaded = sys.modules.get(module)  # an error type can only have been raised if its module is loaded
        if loaded is not None and isinstance(e, getattr(loaded, name)):
            return kind
    return "file" if isinstance(e, OSError) else None


def main_with_clear_errors(fn: Callable[[Any], Any], argv=None) -> Any:
    try:
        return fn(argv)
    except Exception as e:  # noqa: BLE001 - only user-fixable kinds are turned into one line
        kind = _kind(e)
        if kind is None or os.environ.get("LAD_DEBUG") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{kind} error: {message} (LAD_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

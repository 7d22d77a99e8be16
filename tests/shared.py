"""Work done once per test session, shared by every pytest-xdist worker (expensive reference runs).

    with shared_dir(tmp_path_factory, "e2e") as (path, first):
        if first:
            ...  # make the run in `path`; other workers wait on the lock, then reuse it
"""
from __future__ import annotations

import contextlib
import os

from filelock import FileLock


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name: str):
    base = tmp_path_factory.getbasetemp()
    # Under xdist every worker's base temp dir sits in the session's own directory; alone, use the base itself.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with FileLock(f"{root}.lock"):
        first = not (root / ".done").exists()
        root.mkdir(exist_ok=True)
        yield root, first
        if first:
            (root / ".done").touch()

"""Run-directory file I/O that works the same for local paths and URLs (gs://, s3://, memory://, any fsspec protocol).

Every file the trainer writes into its run directory goes through here, so `output_dir=gs://bucket/runs` lands in
the bucket instead of a local directory literally named `gs:`. Local paths use plain `os`/`open`; URLs use fsspec
(gs:// needs the `gcs` extra: gcsfs). Object stores have no append and no directories, so the helpers only offer
whole-file writes; `local_dir` gives code that can only write local files (e.g. HF `save_pretrained`) a temporary
local directory that is copied up when the block ends.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs (`scheme://...`), which must not be touched with local file calls."""
    return "://" in os.fspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)  # (filesystem, path without the protocol)


def makedirs(path: str | os.PathLike) -> None:
    path = os.fspath(path)
    if is_remote(path):
        fs, p = _fs(path)
        fs.makedirs(p, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if is_remote(path):
        fs, p = _fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes (replaces) the whole file or object; a local parent directory is created. Local files are replaced
    atomically (a temporary file renamed over the old one), so a crash never leaves a half-written file."""
    path = os.fspath(path)
    if is_remote(path):
        fs, p = _fs(path)
        with fs.open(p, "wb") as fh:
            fh.write(data)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; keep the permissions a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str | os.PathLike) -> str | None:
    """The file's text, or None when it does not exist."""
    path = os.fspath(path)
    if not exists(path):
        return None
    if is_remote(path):
        fs, p = _fs(path)
        with fs.open(p, "rb") as fh:
            return fh.read().decode("utf-8")
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def upload_dir(local: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies the local directory tree `local` to `target` (local or URL), file by file, replacing files."""
    local, target = os.fspath(local), os.fspath(target)
    if not is_remote(target):
        shutil.copytree(local, target, dirs_exist_ok=True)
        return
    fs, root = _fs(target)
    fs.makedirs(root, exist_ok=True)
    for folder, _, files in os.walk(local):
        rel = os.path.relpath(folder, local)
        for name in files:
            dest = root.rstrip("/") + "/" + (name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
            fs.put_file(os.path.join(folder, name), dest)


@contextlib.contextmanager
def local_dir(target: str | os.PathLike) -> Iterator[str]:
    """A local directory whose contents end up in `target`: `target` itself when it is local, otherwise a temporary
    directory uploaded to `target` when the block exits without an exception."""
    target = os.fspath(target)
    if not is_remote(target):
        os.makedirs(target, exist_ok=True)
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="lad_jax_upload_") as tmp:
        yield tmp
        upload_dir(tmp, target)

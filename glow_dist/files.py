"""Files that are never seen half-written: atomic replacement, directory fsync, sha256 of a file.

Checkpoints, the MLflow model's weights, cached attribute directions and data shards all use these, so "written"
means the same thing everywhere: a temporary file beside the target, flushed and fsynced, then renamed over it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside `directory` durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object],
                 before_rename: Callable[[], None] | None = None) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`: a reader (or a process
    killed at any moment) sees the old file or the new one, never a part. `before_rename` runs between the fsync and
    the rename (a fault drill holds writes there)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

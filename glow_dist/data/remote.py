"""Opening URL roots: the store behind a URL, and shards read from it while training (data.cache=never).

    store = open_store("s3://shards/celeba256")
    with open_shard("s3://shards/celeba256/train-000000.tar") as f:   # or a local path
        f.seek(offset); f.read(n)                                      # ranged GETs through an 8 MiB buffer

webdataset's gopen has no s3:// handler of its own; `register_webdataset_handlers` adds ours (and replaces its curl
pipe for http(s)://): boto3 or urllib, ranged reads, each retried with backoff while the store is away.
"""
from __future__ import annotations

import functools
import importlib
import io
from typing import Any

from glow_dist.data.object_store import CHUNK, SCHEMES, HttpStore, Store, is_url


def open_store(root: str) -> Store:
    if root.startswith("s3://"):
        from glow_dist.data.s3_store import S3Store

        return S3Store(root)
    return HttpStore(root)


class RangedFile(io.RawIOBase):
    """A read-only, seekable view of one object, each read a ranged GET (retried): webdataset streams tars from it
    through a large buffer (open_ranged)."""

    def __init__(self, store: Store, name: str, size: int) -> None:
        super().__init__()
        self.store, self.name, self.length, self.pos = store, name, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        end = min(self.length, self.pos + len(buffer))
        if end <= self.pos:
            return 0
        data = self.store.read(self.name, self.pos, end)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_ranged(url: str, size: int | None = None, buffer: int = 8 * CHUNK) -> io.BufferedReader:
    """A buffered, seekable reader of the object at `url` (webdataset's handler for s3:// and http(s)://)."""
    root, name = url.rsplit("/", 1)
    store = open_store(root)
    return io.BufferedReader(RangedFile(store, name, store.size(name) if size is None else size), buffer)


def open_shard(path: str) -> Any:
    """A shard for reading: a local file, or a URL through webdataset.gopen's handler table (ours, registered)."""
    if not is_url(path):
        return open(path, "rb")
    register_webdataset_handlers()
    return importlib.import_module("webdataset.gopen").gopen(path)


def read_url(url: str) -> bytes:
    """The whole object at `url` (verification of a streamed shard)."""
    root, name = url.rsplit("/", 1)
    return open_store(root).read(name)


@functools.cache
def register_webdataset_handlers() -> None:
    """Let webdataset.gopen open s3:// (it has no handler of its own) and http(s):// (instead of its curl pipe)
    through `open_ranged`: boto3 or urllib, ranged reads, retries with backoff."""
    table = importlib.import_module("webdataset.gopen").gopen_schemes   # `webdataset.gopen` is also a function
    for scheme in SCHEMES:
        # webdataset's bufsize (8 KiB by default) would make every 8 KiB a request: one 8 MiB buffer instead
        table[scheme] = lambda url, mode="rb", bufsize=0, **kw: open_ranged(url)

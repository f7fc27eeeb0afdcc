"""`glow-dist prepare ... --out s3://bucket/prefix`: the data set is written to a local staging folder as usual, then
uploaded: shards and index files first (several at once; a shard above 64 MiB in multipart parts), manifest.json
last, so a half-uploaded data set is never taken for a complete one (shard_cache refuses a root without a manifest).
A non-empty prefix is refused as a non-empty folder is; with --overwrite the old manifest goes first, then our files
that the new data set does not replace.
"""
from __future__ import annotations

import fnmatch
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from glow_dist.data.manifest import MANIFEST, DataError
from glow_dist.data.object_store import Store
from glow_dist.data.remote import open_store

UPLOADS = 4   # files at once (each multipart upload runs 8 parts at once itself)


def check_target(url: str, overwrite: bool, our_files: tuple[str, ...]) -> tuple[Store, list[str]]:
    """The store behind `url` and the objects of ours already under it; DataError when it is not empty and
    `overwrite` is not given (before anything is prepared, so the mistake costs nothing)."""
    store = open_store(url)
    names = store.names()
    if names and not overwrite:
        raise DataError(f"--out {url} is not empty ({len(names)} object(s), e.g. {names[0]}); pass --overwrite to "
                        "replace the data set in it")
    return store, [n for n in names if any(fnmatch.fnmatch(n, p) for p in our_files)]


def publish(folder: Path, store: Store, old: list[str]) -> int:
    """Upload the prepared `folder` to `store`, manifest last; returns the bytes uploaded."""
    if MANIFEST in old:
        store.delete([MANIFEST])   # from here on the old data set is incomplete, never half-new
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST),
                   key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(UPLOADS) as pool:
        list(pool.map(lambda p: store.upload(str(p), p.name), files))
    stale = sorted(set(old) - {p.name for p in files} - {MANIFEST})
    if stale:
        store.delete(stale)
    store.upload(str(folder / MANIFEST), MANIFEST)
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def refuse_listing_only(url: str) -> None:
    if not url.startswith("s3://"):
        raise DataError(f"--out {url}: prepare writes to a folder or an s3:// prefix, not to a web server")

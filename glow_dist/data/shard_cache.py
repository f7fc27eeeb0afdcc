"""The node-local shard cache: a data root that is a URL (or, with data.cache=always, a shared folder) becomes a
folder on this node's disk that the loaders read as today (DALI's GPU decoding unchanged).

    opened = open_root(cfg.data)     # once per process; every rank calls it, one per node downloads
    opened.root                      # the folder to read: the cache, or for streaming (data.cache=never) a folder of
                                     # index files whose manifest points the shards at the URL
    opened.line                      # what happened, for the log

- Where: data.cache_dir, default `$XDG_CACHE_HOME/glow-dist/shards/<data set id>` (~/.cache when unset); the id is
  the first 16 hex digits of the manifest's sha256, so a data set prepared again at the same URL is a new folder.
  `{host}` in data.cache_dir is the node's hostname (a home folder shared by the nodes: one cache per node).
- One download per node: whoever takes the folder's lock (flock on .lock) fills it, the other ranks and jobs wait,
  then find every file there and download nothing. manifest.json is written last: a folder with one is complete.
- Checked while downloading: each shard streams into `NAME.part` through sha256 and is renamed only when the digest
  equals the manifest's; a mismatch is fetched once more, then it is an error naming the shard. A `.part` left by a
  killed fill is hashed and continued from where it stopped. A cached file whose size, mtime or inode changed since
  it was stamped (.stamps.json) is hashed again and fetched again unless it still matches.
- Size bound (data.cache_max_gb, 0: none): before a fill, whole shards of *other* data sets under the same parent
  folder are deleted, least recently used data set first, until this one fits; a data set that a running job holds
  (a shared flock on its .in-use, held for the job's life) is never touched, nor is the one being filled. A data set
  larger than the bound alone is an error that says to raise it or stream (data.cache=never).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glow_dist.config import DataConfig
from glow_dist.data.manifest import MANIFEST, DataError, parse_manifest
from glow_dist.data.object_store import START_RETRY_S, Store, is_url
from glow_dist.data.remote import open_store
from glow_dist.files import write_atomic

STAMPS = ".stamps.json"
MARK = ".glow-dist-cache"       # marks a folder this module made (eviction only ever touches those)
PARALLEL = 8                    # files downloaded at once
_held: list[int] = []           # .in-use locks of this process, held until it exits


@dataclass(frozen=True)
class Opened:
    root: str
    line: str


def cache_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glow-dist" / "shards"


def open_root(data: DataConfig) -> Opened:
    return _open_root(data.root, data.cache, data.cache_dir, data.cache_max_gb)


def local_root(data: DataConfig) -> str:
    return open_root(data).root


@functools.lru_cache(maxsize=8)
def _open_root(root: str, mode: str, cache_dir: str, max_gb: float) -> Opened:
    if not is_url(root) and mode != "always":
        return Opened(root, "")
    store = open_store(root) if is_url(root) else FolderStore(root)
    text = fetch_manifest(store)
    manifest = parse_manifest(text, f"{root}/{MANIFEST}")
    # {host}: one folder per node under a home directory that the nodes share (flock is not to be trusted on NFS)
    folder = (Path(cache_dir.replace("{host}", socket.gethostname())).expanduser() if cache_dir
              else cache_base() / hashlib.sha256(text).hexdigest()[:16])
    if mode == "never":
        try:
            return stream_index(store, manifest, text, folder / "index-only")
        except FileNotFoundError as e:
            raise missing_object(store, e) from None
    return fill(store, manifest, text, folder, max_gb)


def fetch_manifest(store: Store) -> bytes:
    """manifest.json of the root; the first request of a job, so an absent store fails after START_RETRY_S."""
    try:
        return store.read(MANIFEST, budget=START_RETRY_S)
    except FileNotFoundError:
        raise DataError(f"{store.root} has no {MANIFEST}: not a prepared data set, or its upload has not finished "
                        f"(prepare writes the manifest last); run `glow-dist prepare ... --out {store.root}`",
                        everywhere=True) from None


def remote_manifest(root: str) -> dict[str, Any]:
    """The manifest at a URL root, nothing downloaded but it (`glow-dist plan`)."""
    return parse_manifest(fetch_manifest(open_store(root)), f"{root}/{MANIFEST}")


def all_files(manifest: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(file name, sha256 or None for index files) of every split."""
    return [f for split in manifest["splits"].values() for s in split.get("shards", [])
            for f in ((s["file"], s["sha256"]), (s["index"], None))]


def _lock(path: Path, kind: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, kind)
    return fd


def missing_object(store: Store, error: FileNotFoundError) -> DataError:
    return DataError(f"{error} is listed in {store.root}/{MANIFEST} but missing from the store; upload it again or "
                     f"re-run `glow-dist prepare ... --out {store.root} --overwrite`", everywhere=True)


def fill(store: Store, manifest: dict[str, Any], text: bytes, folder: Path, max_gb: float) -> Opened:
    try:
        return _fill(store, manifest, text, folder, max_gb)
    except FileNotFoundError as e:
        raise missing_object(store, e) from None


def _fill(store: Store, manifest: dict[str, Any], text: bytes, folder: Path, max_gb: float) -> Opened:
    t0 = time.monotonic()
    fd = _lock(folder / ".lock", fcntl.LOCK_EX)   # one filler per node; the others wait here
    try:
        _held.append(_lock(folder / ".in-use", fcntl.LOCK_SH))
        (folder / MARK).touch()
        stamps = _load(folder / STAMPS)
        missing = [(name, sha) for name, sha in all_files(manifest) if not _cached(folder, name, sha, stamps)]
        if missing:
            (folder / MANIFEST).unlink(missing_ok=True)   # incomplete from here until every file is in
            with ThreadPoolExecutor(PARALLEL) as pool:
                sizes = dict(zip([n for n, _ in missing], pool.map(store.size, [n for n, _ in missing]), strict=True))
            make_room(folder, sum(sizes.values()), max_gb, manifest)
            order = sorted(missing, key=lambda f: -sizes[f[0]])   # the large ones first: the pool ends together
            with ThreadPoolExecutor(PARALLEL) as pool:
                for name, digest in pool.map(lambda f: (f[0], download(store, folder, *f)), order):
                    stamps[name] = _identity(folder / name, digest)
                    _save(folder / STAMPS, stamps)
        if not (folder / MANIFEST).is_file():
            write_atomic(folder / MANIFEST, lambda f: f.write(text))
        os.utime(folder / MARK)   # last used: eviction goes oldest first
    finally:
        os.close(fd)
    got = sum(sizes.values()) if missing else 0
    seconds = time.monotonic() - t0
    line = (f"data: {store.root} cached in {folder}: {len(missing)} file(s) downloaded ({got / 1e6:.1f} MB in "
            f"{seconds:.1f} s, {got / 1e6 / max(seconds, 1e-9):.0f} MB/s), "
            f"{len(all_files(manifest)) - len(missing)} already there")
    return Opened(str(folder), line)


def download(store: Store, folder: Path, name: str, sha256: str | None) -> str:
    """Fetch `name` into folder/name through NAME.part, checked against `sha256` (twice at most); its digest."""
    for attempt in (1, 2):
        part = folder / f"{name}.part"
        digest = hashlib.sha256()
        if part.exists():   # a killed fill's: keep its bytes, continue after them
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        with open(part, "ab") as out:
            for chunk in store.stream(name, part.stat().st_size):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if sha256 is None or digest.hexdigest() == sha256:
            os.replace(part, folder / name)
            return digest.hexdigest()
        part.unlink()
        if attempt == 2:
            raise DataError(f"shard {store.root}/{name} differs from its {MANIFEST} (sha256 {digest.hexdigest()[:12]}"
                            f"... twice, {sha256[:12]}... when prepared): the object is damaged or was replaced; "
                            f"upload it again or re-run `glow-dist prepare ... --out {store.root} --overwrite`",
                            everywhere=True)
    raise AssertionError("unreachable")


def _identity(path: Path, digest: str) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, digest]


def _cached(folder: Path, name: str, sha256: str | None, stamps: dict[str, list]) -> bool:
    """Is folder/name whole? Unchanged since stamped (a stat), else, for a shard, its sha256 read again."""
    path = folder / name
    if not path.is_file():
        return False
    stamp = stamps.get(name)
    if stamp and _identity(path, stamp[3]) == stamp and (sha256 is None or stamp[3] == sha256):
        return True
    if sha256 is None:
        return False
    from glow_dist.files import sha256_file

    if sha256_file(path) != sha256:
        path.unlink()
        return False
    stamps[name] = _identity(path, sha256)
    return True


def make_room(folder: Path, need: int, max_gb: float, manifest: dict[str, Any]) -> None:
    """Evict whole shards of other data sets (least recently used first) until `need` more bytes fit."""
    free = shutil.disk_usage(folder).free
    if max_gb <= 0:
        if need > free:
            raise DataError(f"the data set needs {need / 1e9:.2f} GB more in {folder} and the disk has "
                            f"{free / 1e9:.2f} GB free; set data.cache_dir to a larger disk, or stream the shards "
                            "(data.cache=never)", everywhere=True)
        return
    limit = int(max_gb * 1e9)
    mine = _usage(folder)
    if mine + need > limit:
        raise DataError(f"the data set needs {(mine + need) / 1e9:.2f} GB in {folder}, more than "
                        f"data.cache_max_gb={max_gb:g}; raise data.cache_max_gb or stream the shards "
                        "(data.cache=never)", everywhere=True)
    others = sorted((p for p in folder.parent.iterdir() if p != folder and (p / MARK).is_file()),
                    key=lambda p: (p / MARK).stat().st_mtime)
    over = mine + need + sum(_usage(p) for p in others) - limit
    for other in others:
        if over <= 0:
            return
        over -= _evict(other, over)


def _evict(other: Path, want: int) -> int:
    """Delete whole shards of `other` (not held by a running job) until `want` bytes are free; bytes freed."""
    fd = os.open(other / ".in-use", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return 0   # a job reads it now
    freed = 0
    try:
        (other / MANIFEST).unlink(missing_ok=True)   # incomplete from now on: the next job fills it again
        for shard in sorted(other.glob("*.tar"), key=lambda p: -p.stat().st_size):
            if freed >= want:
                break
            freed += shard.stat().st_size
            shard.unlink()
    finally:
        os.close(fd)
    return freed


def _usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def stream_index(store: Store, manifest: dict[str, Any], text: bytes, folder: Path) -> Opened:
    """data.cache=never: the index files (small) here, the shards read from the store; the local manifest gets a
    `remote` entry with the shard URLs' root and sizes (manifest.split_shards uses them)."""
    fd = _lock(folder / ".lock", fcntl.LOCK_EX)
    try:
        names = [s for split in manifest["splits"].values() for s in split.get("shards", [])]
        with ThreadPoolExecutor(PARALLEL) as pool:
            sizes = list(pool.map(lambda s: store.size(s["file"]), names))
            indexes = list(pool.map(lambda s: store.read(s["index"]), names))
        for shard, index in zip(names, indexes, strict=True):
            write_atomic(folder / shard["index"], lambda f, b=index: f.write(b))
        local = {**manifest, "remote": {"root": store.root,
                                        "sizes": {s["file"]: n for s, n in zip(names, sizes, strict=True)}}}
        write_atomic(folder / MANIFEST, lambda f: f.write(json.dumps(local).encode()))
    finally:
        os.close(fd)
    return Opened(str(folder), f"data: streaming {len(names)} shard(s) from {store.root} (data.cache=never; index "
                               f"files in {folder})")


class FolderStore(Store):
    """data.cache=always on a folder (a shared filesystem): copied to the node's disk like a URL root."""

    def size(self, name: str) -> int:
        return (Path(self.root) / name).stat().st_size

    def _get(self, name: str, start: int, end: int | None):
        path = Path(self.root) / name
        if not path.is_file():
            raise FileNotFoundError(path)
        with open(path, "rb") as f:
            f.seek(start)
            left = (end if end is not None else path.stat().st_size) - start
            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                left -= len(chunk)
                yield chunk


def _load(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, stamps: dict[str, list]) -> None:
    text = json.dumps(stamps).encode()
    write_atomic(path, lambda f: f.write(text))

"""Verify before use: every shard against manifest.json (sha256, sample count) and every sample's header, before
any rank trains (`data.verify`).

    result = verify_split(root, manifest, "train", mode="auto", num_classes=10)
    result.problems   # one line per shard that cannot be used: which shard, what differs, the fix
    result.bad        # BadSample per sample that must not be decoded (replaced by a substitute; see substitutes())

- auto (default): hash and scan each shard once per node; the result is remembered in a small cache file keyed by
  the file's identity (path, size, mtime_ns, inode) and what the manifest expects, so the next job on unchanged files
  reads nothing. A copy, a rewrite or a touch changes the identity and the shard is verified again.
- always: the same at every start, ignoring the cache (bit rot that leaves size and mtime alone).
- never: no sha256; only the checks that read no shard bytes (files present, index count = manifest count, shard
  at least as long as its index says). The scan still runs for the DALI backend, whose decoder must never see a
  sample that fails its header or checksum (samples.py), unless `scan=False`.

Hashing reads each shard once through mmap (hashlib releases the GIL: one thread per shard, all cores) and the scan
then reads the same pages from memory. The trainer runs this on one local rank per node (training/data_health.py).
The cache is `$XDG_CACHE_HOME/glow-dist/verified-shards.json` (default ~/.cache), written atomically.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from glow_dist.data.manifest import MANIFEST, DataError, read_index, split_shards
from glow_dist.data.object_store import is_url
from glow_dist.data.remote import read_url
from glow_dist.data.samples import check_sample
from glow_dist.files import write_atomic

CACHE_VERSION = 1


class BadSample(NamedTuple):
    """A sample that is replaced by a substitute: where it is and why."""
    split: str
    index: int      # position in the split (the concatenation of its shards)
    shard: str      # shard file name
    key: str
    reason: str

    def describe(self) -> str:
        return f"{self.shard}:{self.key} ({self.reason})"


@dataclass
class Verified:
    problems: list[str] = field(default_factory=list)
    bad: list[BadSample] = field(default_factory=list)
    hashed_bytes: int = 0
    cached_shards: int = 0
    seconds: float = 0.0


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glow-dist" / "verified-shards.json"


def _identity(shard: dict[str, Any], expect: dict[str, Any]) -> str:
    if is_url(shard["path"]):   # streamed: the URL and its size (objects are replaced whole, never edited)
        return json.dumps([shard["path"], shard["bytes"], expect], sort_keys=True)
    path = Path(shard["path"])
    st = path.stat()
    return json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, expect], sort_keys=True)


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache.get("shards", {}) if cache.get("version") == CACHE_VERSION else {}


def _save_cache(path: Path, shards: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "shards": shards}).encode()
        write_atomic(path, lambda f: f.write(text))
    except OSError:
        pass  # a read-only home only costs a second hash next time


def verify_split(root: str | Path, manifest: dict[str, Any], split: str, mode: str, num_classes: int | None = None,
                 scan: bool = False, cache: Path | None = None) -> Verified:
    """Check the split's shards (see the module docstring); `scan` forces the sample scan under mode=never."""
    t0 = time.perf_counter()
    result = Verified()
    try:
        shards = split_shards(manifest, root, split)
    except DataError as e:
        result.problems.append(str(e))
        return result
    if mode == "never" and not scan:
        return result
    classes = manifest.get("num_classes", 0) if num_classes is None else num_classes
    expect = {"size": manifest["image_size"], "channels": manifest["channels"], "ext": manifest["image_ext"],
              "classes": classes, "hash": mode != "never"}
    cache = cache or cache_path()
    remembered = _load_cache(cache) if mode != "always" else {}
    jobs = [(shard, _identity(shard, {**expect, "sha256": shard["sha256"]})) for shard in shards]
    todo = [(shard, ident) for shard, ident in jobs if ident not in remembered]
    with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        fresh = dict(zip([ident for _, ident in todo],
                         pool.map(lambda job: _check_shard(job[0], expect), todo), strict=True))
    start = 0
    for shard, ident in jobs:
        found = fresh.get(ident) or remembered[ident]
        if ident in fresh:
            result.hashed_bytes += found["bytes"]
        else:
            result.cached_shards += 1
        if found["problem"]:
            result.problems.append(f"{found['problem']}; {_fix(root)}")
        result.bad += [BadSample(split, start + i, shard["file"], key, why) for i, key, why in found["bad"]]
        start += shard["num_samples"]
    keep = {ident: found for ident, found in fresh.items() if not found["problem"]}
    if keep:
        _save_cache(cache, {**_load_cache(cache), **keep})
    result.seconds = time.perf_counter() - t0
    return result


def _fix(root: str | Path) -> str:
    return (f"copy the shard and its .idx again from where they were prepared, or re-run `glow-dist prepare ... "
            f"--out {root} --overwrite`")


def _check_shard(shard: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    """{"problem": line or "", "bad": [(index in shard, key, why)], "bytes": bytes hashed} of one shard."""
    path = shard["path"]
    index = read_index(shard["index_path"])
    size = shard["bytes"]
    out: dict[str, Any] = {"problem": "", "bad": [], "bytes": size if expect["hash"] else 0}
    with contextlib.nullcontext() if is_url(path) else open(path, "rb") as f:
        # streamed shards are read whole (once per node: the result is cached like a file's)
        data = read_url(path) if f is None else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            if expect["hash"]:
                digest = hashlib.sha256(data).hexdigest()
                if digest != shard["sha256"]:
                    out["problem"] = (f"shard {path} differs from {MANIFEST}: sha256 {digest[:12]}... but "
                                      f"{shard['sha256'][:12]}... when prepared ({size} bytes; damaged or changed "
                                      "since)")
                    return out
            for i, sample in enumerate(index):
                image, cls = (data[o:o + n] if (o, n) != (-1, -1) else None
                              for o, n in (sample.get(expect["ext"], (-1, -1)), sample.get("cls", (-1, -1))))
                why = check_sample(image, cls, expect["ext"], expect["size"], expect["channels"], expect["classes"])
                if why:
                    name = next(iter(_names(shard, i)), f"#{i}")
                    out["bad"].append((i, name, why))
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
    if index and len(out["bad"]) == len(index):
        out["problem"] = f"shard {path}: none of its {len(index)} samples can be decoded ({out['bad'][0][2]})"
    return out


def _names(shard: dict[str, Any], i: int) -> list[str]:
    """The key of sample i of a shard, from its index line (`ext offset size name` groups)."""
    lines = Path(shard["index_path"]).read_text().splitlines()
    fields = lines[i + 1].split() if i + 1 < len(lines) else []
    return [fields[3].split(".", 1)[0]] if len(fields) >= 4 else []


def substitutes(bad: list[BadSample], shards: list[dict[str, Any]]) -> dict[int, int]:
    """{bad sample's index in the split: its substitute's}: the nearest earlier good sample of the same shard, else
    the nearest later one. Deterministic and the same on every rank and backend; kept in the shard so that DALI can
    read it through the shard's own index."""
    bad_set = {b.index for b in bad}
    out, start = {}, 0
    for shard in shards:
        end = start + shard["num_samples"]
        for i in sorted(b for b in bad_set if start <= b < end):
            good = [j for j in (*range(i - 1, start - 1, -1), *range(i + 1, end)) if j not in bad_set]
            if good:
                out[i] = good[0]
        start = end
    return out

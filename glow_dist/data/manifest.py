"""The on-disk contract between `glow-dist prepare` and the loaders: manifest.json, shard files, DALI index files.

A prepared data set is one folder:

    manifest.json            counts, image size/channels, class and attribute names, shards with sha256
    train-000000.tar         WebDataset shards: KEY.png|KEY.jpg, KEY.cls (ASCII int, -1 if unlabeled), KEY.json
    train-000000.idx         DALI index of the shard (the format `wds2idx` writes, "v1.2")
    test-000000.tar ...

Everything here is light (no torch, no DALI) so the CLI and the error paths stay fast.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "glow-dist-shards"
VERSION = 1
SPLITS = ("train", "test")


class DataError(ValueError):
    """A data set that cannot be prepared or loaded; the message says what is wrong and how to fix it.

    `everywhere=True`: every rank of the job raises this same error at the same point (it follows from the config,
    the manifest, or a finding all ranks shared), so only rank 0 prints it (glow_dist/cli.py)."""

    def __init__(self, message: str, *, everywhere: bool = False) -> None:
        super().__init__(message)
        self.everywhere = everywhere


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Load and sanity-check `root/manifest.json`; raise DataError naming the problem and the fix."""
    root = Path(root)
    hint = f"create it with `glow-dist prepare digits --out {root}` (or `folder`/`cifar10`)"
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; {hint}")
    path = root / MANIFEST
    if not path.is_file():
        shards = sorted(p.name for p in root.glob("*.tar"))
        found = f"it has {len(shards)} .tar files but no manifest" if shards else "it holds no shards"
        raise DataError(f"{root} is not a prepared data set ({found}); {hint}")
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(text: bytes | str, path: str | Path) -> dict[str, Any]:
    """The manifest in `text` (read from `path`, named in the errors), checked for its format and version."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `glow-dist prepare ... --overwrite`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        got = manifest if isinstance(manifest, dict) else {}
        raise DataError(
            f"{path} is not a {FORMAT} v{VERSION} manifest (format={got.get('format')!r}, "
            f"version={got.get('version')!r}); re-run `glow-dist prepare ... --overwrite`"
        )
    return manifest


def check_model_shape(manifest: dict[str, Any], image_size: int, channels: int, root: str | Path) -> None:
    """The model's input shape must equal the prepared images' shape: we never resize at load time."""
    have = (manifest["image_size"], manifest["channels"])
    if have != (image_size, channels):
        raise DataError(
            f"{root} holds {have[0]}x{have[0]} images with {have[1]} channel(s), but the config asks for "
            f"model.image_size={image_size}, model.channels={channels}; either set model.image_size={have[0]} "
            f"model.channels={have[1]}, or re-prepare the data with `glow-dist prepare {manifest['source']} "
            f"--size {image_size} --out {root} --overwrite`"
        )


def split_shards(manifest: dict[str, Any], root: str | Path, split: str) -> list[dict[str, Any]]:
    """The split's shard entries with absolute `path`/`index_path`; checks that the files exist and are whole."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = Path(root)
    shards = manifest["splits"].get(split, {}).get("shards", [])
    if not shards:
        raise DataError(f"{root} has no {split} shards; re-run `glow-dist prepare` with a non-zero {split} split")
    # Streaming (data.cache=never, shard_cache.stream_index): index files here, shards at a URL of known size.
    remote = manifest.get("remote")
    out = []
    for shard in shards:
        index_path = root / shard["index"]
        path: Any = f"{remote['root']}/{shard['file']}" if remote else root / shard["file"]
        for p in (index_path,) if remote else (path, index_path):
            if not p.is_file():
                raise DataError(f"{p} is listed in {root / MANIFEST} but missing; re-run `glow-dist prepare`")
        size = remote["sizes"][shard["file"]] if remote else path.stat().st_size
        listed = read_index(index_path)
        if len(listed) != shard["num_samples"]:
            # A shard re-written with fewer (or more) samples, or a manifest edited by hand: training would
            # otherwise read a split of another length than every rank planned for, and say nothing.
            raise DataError(
                f"shard {path} holds {len(listed)} samples (its index {index_path.name}), but {root / MANIFEST} "
                f"says {shard['num_samples']}; copy the shard and its .idx again, or re-run `glow-dist prepare "
                "--overwrite`")
        end = max((off + size for sample in listed for off, size in sample.values()), default=0)
        if size < end:
            # A cut-off copy is the usual cause; the reader would otherwise fail deep inside DALI or tarfile.
            raise DataError(
                f"shard {path} is truncated: {size} bytes, but its index needs {end}; "
                "copy it again or re-run `glow-dist prepare --overwrite`"
            )
        out.append({**shard, "path": str(path), "index_path": str(index_path), "bytes": size})
    return out


def read_index(index_path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI "v1.2" index: one line per sample of `ext offset size name` groups -> [{ext: (offset, size)}]."""
    lines = Path(index_path).read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != "v1.2":
        raise DataError(f"{index_path} is not a DALI v1.2 index file; re-run `glow-dist prepare --overwrite`")
    samples = []
    for line in lines[1:]:
        fields = line.split()
        samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)})
    if len(samples) != int(header[1]):
        raise DataError(f"{index_path} announces {header[1]} samples but lists {len(samples)}; it is damaged")
    return samples


def index_end(index_path: str | Path) -> int:
    """Byte offset just past the last component the index points at (a lower bound on the tar's size)."""
    samples = read_index(index_path)
    return max((off + size for sample in samples for off, size in sample.values()), default=0)


def partition(num_samples: int, world_size: int, part: int) -> tuple[int, int]:
    """[lo, hi) of part `part` of `world_size` contiguous parts: how DALI's reader splits shard_id/num_shards."""
    return num_samples * part // world_size, num_samples * (part + 1) // world_size


def train_batches(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per training epoch: set by the smallest part so that all ranks agree."""
    return (num_samples // world_size) // batch_size


def test_batches(part_size: int, batch_size: int) -> int:
    return math.ceil(part_size / batch_size)

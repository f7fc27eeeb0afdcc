"""Write a data set as WebDataset shards with DALI index files and a manifest.json (`glow-dist prepare`, whose
command line is glow_dist/commands/prepare_cmd.py).

    manifest = prepare(digits_source(0.1, seed=0), "data/digits", size=8, channels=1)

The output is deterministic for a given --seed. Unreadable images, and files whose header declares a decompression
bomb, are reported by path, skipped and counted in the manifest. An existing non-empty --out is refused unless
--overwrite is given.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path
from typing import Any

from glow_dist.data.manifest import FORMAT, MANIFEST, VERSION, DataError
from glow_dist.data.object_store import is_url
from glow_dist.data.publish import check_target, publish, refuse_listing_only
from glow_dist.data.shards import ShardWriter
from glow_dist.data.sources import Item, Source, load_item

OUR_FILES = ("manifest.json", "train-*.tar", "train-*.idx", "test-*.tar", "test-*.idx")


def _encode(item: Item, **kwargs: Any) -> bytes | str:
    """Worker side of the pool: the encoded image, or the error text of an unreadable one."""
    from PIL import Image

    try:
        return load_item(item, **kwargs)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for damaged files
        return f"{type(e).__name__}: {e}"


def prepare(source: Source, out: str | Path, *, size: int, channels: int, fmt: str = "png", quality: int = 95,
            shard_size: int = 1000, seed: int = 0, workers: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Write `source` into `out` (a folder or s3://bucket/prefix) as shards + index files + manifest.json; returns the
    manifest."""
    if size < 1 or shard_size < 1 or not 1 <= quality <= 100:
        raise DataError("--size and --shard-size must be positive and --quality in 1..100")
    if is_url(str(out)):
        refuse_listing_only(str(out))
        store, old = check_target(str(out), overwrite, OUR_FILES)
        with tempfile.TemporaryDirectory(prefix="glow-dist-prepare-") as staging:
            manifest = prepare(source, staging, size=size, channels=channels, fmt=fmt, quality=quality,
                               shard_size=shard_size, seed=seed, workers=workers)
            publish(Path(staging), store, old)
        return manifest
    out = Path(out)
    _clear_output(out, overwrite)
    encode = functools.partial(_encode, size=size, channels=channels, resample=source.resample, fmt=fmt,
                               quality=quality)
    ext = "png" if fmt == "png" else "jpg"
    skipped: list[dict[str, str]] = []
    splits = {}
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for split, items in (("train", source.train), ("test", source.test)):
            writer = ShardWriter(out, split, shard_size)
            # imap keeps the input order, so the output does not depend on the number of workers.
            results = pool.imap(encode, items, chunksize=16) if pool else map(encode, items)
            for item, result in _progress(zip(items, results, strict=True), len(items), f"{source.name} {split}"):
                if isinstance(result, str):
                    print(f"skipping unreadable image {item.source_id}: {result}", file=sys.stderr)
                    skipped.append({"path": item.source_id, "error": result})
                    continue
                meta = {"source": item.source_id}
                if source.attribute_names:
                    meta["attrs"] = dict(zip(source.attribute_names, item.attrs, strict=True))
                writer.write({ext: result, "cls": str(item.label).encode(), "json": json.dumps(meta).encode()})
            splits[split] = writer.close()
    finally:
        if pool:
            pool.close()
    if splits["train"]["num_samples"] == 0:
        raise DataError(f"no readable training images were written to {out} ({len(skipped)} skipped)")
    manifest = {
        "format": FORMAT, "version": VERSION, "source": source.name, "seed": seed,
        "image_size": size, "channels": channels, "image_ext": ext,
        "num_classes": len(source.class_names), "class_names": source.class_names,
        "attribute_names": source.attribute_names,
        "splits": splits, "skipped": {"count": len(skipped), "items": skipped},
    }
    # Written last: its presence marks a complete data set.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _clear_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"--out {out} is not empty; pass --overwrite to replace the data set in it")
        # Only our own files go: a mistyped --out must not wipe someone's folder.
        for pattern in OUR_FILES:
            for path in out.glob(pattern):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _progress(iterable: Any, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=None, leave=False)

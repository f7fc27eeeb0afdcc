"""Write a data set as WebDataset shards with DALI index files and a manifest.json.

    glow-dist prepare digits --out data/digits                      # 8x8 grayscale, bundled with scikit-learn
    glow-dist prepare digits --out data/digits16 --size 16          # nearest-neighbour upsampling
    glow-dist prepare folder --src ~/celeba --size 64 --attributes list_attr_celeba.txt --out data/celeba64
    glow-dist prepare folder --src ~/pets --classes --size 32 --format jpeg --quality 95 --out data/pets
    glow-dist prepare cifar10 --src cifar-10-python.tar.gz --out data/cifar10

The output is deterministic for a given --seed. Unreadable images are reported by path, skipped and counted in
the manifest. An existing non-empty --out is refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

from glow_dist.data.manifest import FORMAT, MANIFEST, VERSION, DataError
from glow_dist.data.shards import ShardWriter
from glow_dist.data.sources import Item, Source, cifar10_source, digits_source, folder_source, load_item

DEFAULT_SIZE = {"digits": 8, "cifar10": 32}
OUR_FILES = ("manifest.json", "train-*.tar", "train-*.idx", "test-*.tar", "test-*.idx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=("digits", "folder", "cifar10"), help="where the images come from")
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--src", help="folder: directory of JPEG/PNG files; cifar10: cifar-10-python.tar.gz")
    parser.add_argument("--size", type=int, help="square output size (default: digits 8, cifar10 32; folder: required)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 grayscale, 3 RGB (default: the source's)")
    parser.add_argument("--classes", action="store_true", help="folder: class label from the first subfolder name")
    parser.add_argument("--attributes", help="folder: CelebA-style attribute file (list_attr_celeba.txt format)")
    parser.add_argument("--format", choices=("png", "jpeg"), default="png", help="image encoding in the shards")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (with --format jpeg)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--test-fraction", type=float, help="held-out fraction (default 0.1; cifar10 has its own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the training order")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decode/encode processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared data set in --out")


def run(args: argparse.Namespace) -> int:
    try:
        size = args.size or DEFAULT_SIZE.get(args.source)
        if size is None:
            raise DataError("folder needs --size (the square side the images are resized and center-cropped to)")
        source = build_source(args)
        manifest = prepare(source, args.out, size=size, channels=args.channels or source.channels,
                           fmt=args.format, quality=args.quality, shard_size=args.shard_size, seed=args.seed,
                           # digits are too few and too small to repay starting worker processes
                           workers=1 if args.source == "digits" else args.workers, overwrite=args.overwrite)
    except DataError as e:
        print(f"glow-dist prepare: {e}", file=sys.stderr)
        return 2
    counts = {s: manifest["splits"][s]["num_samples"] for s in ("train", "test")}
    print(f"wrote {counts['train']} train and {counts['test']} test samples ({size}x{size}x{manifest['channels']}) "
          f"to {args.out}; skipped {manifest['skipped']['count']} unreadable")
    return 0


def build_source(args: argparse.Namespace) -> Source:
    if args.source != "folder" and (args.classes or args.attributes):
        raise DataError("--classes and --attributes only apply to the folder source")
    if args.source in ("folder", "cifar10") and not args.src:
        raise DataError(f"{args.source} needs --src")
    fraction = 0.1 if args.test_fraction is None else args.test_fraction
    if args.source == "digits":
        return digits_source(fraction, args.seed)
    if args.source == "folder":
        return folder_source(args.src, args.channels or 3, args.classes, args.attributes, fraction, args.seed)
    if args.test_fraction is not None:
        raise DataError("cifar10 comes with its own train/test split; drop --test-fraction")
    return cifar10_source(args.src, args.seed)


def _encode(item: Item, **kwargs: Any) -> bytes | str:
    """Worker side of the pool: the encoded image, or the error text of an unreadable one."""
    try:
        return load_item(item, **kwargs)
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for damaged files
        return f"{type(e).__name__}: {e}"


def prepare(source: Source, out: str | Path, *, size: int, channels: int, fmt: str = "png", quality: int = 95,
            shard_size: int = 1000, seed: int = 0, workers: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Write `source` into `out` as shards + index files + manifest.json; returns the manifest."""
    out = Path(out)
    if size < 1 or shard_size < 1 or not 1 <= quality <= 100:
        raise DataError("--size and --shard-size must be positive and --quality in 1..100")
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

"""Write a data set as WebDataset shards with DALI index files and a manifest.json:

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
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glow_dist.data.sources import Source

DEFAULT_SIZE = {"digits": 8, "cifar10": 32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=("digits", "folder", "cifar10"), help="where the images come from")
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix (shards, manifest.json)")
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
    from glow_dist.data.manifest import DataError
    from glow_dist.data.prepare import prepare

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
    from glow_dist.data.manifest import DataError
    from glow_dist.data.sources import cifar10_source, digits_source, folder_source

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

"""Shard verification (data.verify) and the per-sample header check: what they cost; prints tables.

    .venv/bin/python bench/bench_verify.py                      # ~1 GB of CelebA-HQ-256-sized shards, 2 workers
    .venv/bin/python bench/bench_verify.py --images 3000 --loader-images 768

1. Verification of a CelebA-HQ 256-sized data set (30,000 JPEGs 256x256, ~1 GB): sha256 GB/s on one core, the
   whole start-up check (sha256 of every shard on all cores + the header scan) with data.verify=always, the same
   with auto on unchanged files (the next job), and its share of a first epoch: the loader's own epoch on this
   machine, and a training epoch at the GPU target in BENCHMARKS.md (75 img/s per H100, 8 GPUs: a computed bound).
   Bytes are read from the page cache (the data were just written): a cold disk adds its own read time, which the
   first epoch pays too.
2. The webdataset loader's images/s with the header check on and off (alternating runs, median), and the check's
   own time per image against PIL's decode.

The images are distinct smooth gradients plus noise, JPEG q90 (what a photo costs to decode); the 1 GB set repeats
256 encoded images so that it is written in seconds (hashing does not care). Nothing is kept: a temporary folder.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import SIZE, make_images  # noqa: E402

from glow_dist.config import DataConfig, ModelConfig  # noqa: E402
from glow_dist.data import base, make_loader  # noqa: E402
from glow_dist.data.manifest import FORMAT, VERSION  # noqa: E402
from glow_dist.data.samples import check_sample  # noqa: E402
from glow_dist.data.shards import ShardWriter  # noqa: E402
from glow_dist.data.verify import verify_split  # noqa: E402

GPU_TARGET_IMG_S = 75 * 8   # BENCHMARKS.md "GPU speed": CelebA-HQ batch 16 >= 75 img/s per H100; one 8-GPU node


def write_set(root: Path, encoded: list[bytes], n: int, shard_size: int) -> int:
    """n samples cycling through `encoded`, as `glow-dist prepare` writes them (shards, index files, manifest)."""
    root.mkdir(parents=True)
    writer = ShardWriter(root, "train", shard_size)
    for i in range(n):
        writer.write({"jpg": encoded[i % len(encoded)], "cls": b"-1", "json": b"{}"})
    train = writer.close()
    manifest = {"format": FORMAT, "version": VERSION, "source": "folder", "seed": 0, "image_size": SIZE,
                "channels": 3, "image_ext": "jpg", "num_classes": 0, "class_names": [], "attribute_names": [],
                "splits": {"train": train, "test": {"num_samples": 0, "shards": []}},
                "skipped": {"count": 0, "items": []}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return sum((root / s["file"]).stat().st_size for s in train["shards"])


def encode_images(folder: Path, n: int) -> list[bytes]:
    make_images(folder, n)
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


def sha256_one_core(path: Path) -> float:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        return len(data) / (time.perf_counter() - t0)


def epoch_images_per_sec(root: Path, workers: int, batch: int, check: bool) -> float:
    """The webdataset loader's images/s over one epoch (after a warm-up epoch), header check on or off."""
    real = base.check_sample
    base.check_sample = real if check else (lambda *args, **kwargs: None)   # workers are forked: they inherit it
    try:
        cfg = DataConfig(root=str(root), backend="webdataset", num_workers=workers, flip=True)
        loader = make_loader(cfg, ModelConfig(image_size=SIZE, channels=3), "train", 0, 1, batch,
                             torch.device("cpu"), 0)
        for _ in loader.epoch(0):
            pass
        t0, count = time.perf_counter(), 0
        for images, _ in loader.epoch(1):
            count += images.shape[0]
        return count / (time.perf_counter() - t0)
    finally:
        base.check_sample = real


def per_image_costs(encoded: list[bytes]) -> tuple[float, float]:
    """(header check, PIL decode) in microseconds per image."""
    t0 = time.perf_counter()
    for _ in range(20):
        for data in encoded:
            check_sample(data, b"-1", "jpg", SIZE, 3, -1, checksums=False)
    check = (time.perf_counter() - t0) / (20 * len(encoded))
    t0 = time.perf_counter()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as image:
            np.asarray(image.convert("RGB"))
    decode = (time.perf_counter() - t0) / len(encoded)
    return check * 1e6, decode * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=30000, help="samples of the verification set (CelebA-HQ: 30k)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--loader-images", type=int, default=768, help="distinct images of the loader comparison")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        encoded = encode_images(tmp / "src", 256)
        big = tmp / "big"
        size = write_set(big, encoded, args.images, args.shard_size)
        manifest = json.loads((big / "manifest.json").read_text())
        cache = tmp / "cache.json"
        one_core = statistics.median(sha256_one_core(big / "train-000000.tar") for _ in range(3))
        t0 = time.perf_counter()
        first = verify_split(big, manifest, "train", "always", cache=cache)
        always = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = verify_split(big, manifest, "train", "auto", cache=cache)
        auto = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify_split(big, manifest, "train", "never", scan=True, cache=tmp / "scan.json")
        scan = time.perf_counter() - t0
        assert not first.problems and not first.bad and again.hashed_bytes == 0

        small = tmp / "small"
        (tmp / "src-small").mkdir()
        small_encoded = encode_images(tmp / "src-small", args.loader_images)
        write_set(small, small_encoded, args.loader_images, 256)
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):   # alternate, so that load elsewhere hits both
            for check in (True, False):
                runs[check].append(epoch_images_per_sec(small, args.workers, args.batch, check))
        on, off = statistics.median(runs[True]), statistics.median(runs[False])
        check_us, decode_us = per_image_costs(small_encoded[:256])

    loader_epoch = args.images / on   # this machine's loader alone, all its workers
    gpu_epoch = args.images / GPU_TARGET_IMG_S
    print(f"\n{args.images} JPEG {SIZE}x{SIZE} q90 in {args.shard_size}-sample shards, {size / 1e9:.2f} GB; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; page cache warm\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| sha256, one core | {one_core / 1e9:.2f} GB/s |")
    print(f"| data.verify=always: sha256 on all cores + header scan | {always:.2f} s "
          f"({size / always / 1e9:.2f} GB/s) |")
    print(f"| of which the header scan alone (data.verify=never, DALI) | {scan:.2f} s |")
    print(f"| data.verify=auto, next job, files unchanged | {auto * 1e3:.0f} ms |")
    print(f"| first epoch, this machine's webdataset loader alone ({args.workers} workers, {on:.0f} img/s) | "
          f"{loader_epoch:.0f} s: verification adds {100 * always / loader_epoch:.1f}% |")
    print(f"| first epoch, training at the GPU target ({GPU_TARGET_IMG_S} img/s: 8 H100 x 75) | "
          f"{gpu_epoch:.0f} s: verification adds {100 * always / gpu_epoch:.1f}% |")
    print(f"\nwebdataset loader, {args.loader_images} JPEG {SIZE}x{SIZE}, batch {args.batch}, {args.workers} workers, "
          f"median of {args.repeats} alternating epochs\n")
    print("| header check | images/s | runs |")
    print("|---|---|---|")
    print(f"| on | {on:.0f} | {', '.join(f'{v:.0f}' for v in runs[True])} |")
    print(f"| off | {off:.0f} | {', '.join(f'{v:.0f}' for v in runs[False])} |")
    print(f"| on / off | {on / off:.3f} | |")
    print(f"\nper image: header check {check_us:.1f} us, PIL decode {decode_us:.0f} us "
          f"({100 * check_us / decode_us:.2f}% of the decode)")


if __name__ == "__main__":
    main()

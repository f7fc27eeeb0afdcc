"""Data loading throughput: DALI (CPU decoding) vs webdataset + PIL on 256x256 JPEG shards; prints a table.

    .venv/bin/python bench/bench_data.py                     # 768 images, batch 32, 2 threads/workers, 3 epochs
    .venv/bin/python bench/bench_data.py --images 1024 --workers 1 2

The images are smooth colour gradients plus noise (JPEG quality 90), so decoding costs what a photo costs.
They are sharded with `glow-dist prepare folder`, exactly as a user would.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glow_dist.cli import main as cli
from glow_dist.config import DataConfig, ModelConfig
from glow_dist.data import make_loader

SIZE = 256


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        freq = rng.uniform(1, 6)
        image = a * x[..., None] + b * y[..., None] + c * np.sin(freq * np.pi * (x + y))[..., None]
        image = image / 2 + rng.normal(0, 12, (SIZE, SIZE, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def throughput(root: Path, backend: str, workers: int, batch: int, epochs: int) -> float:
    """Images per second over `epochs` epochs, after one warm-up epoch (page cache, DALI/worker start-up)."""
    cfg = DataConfig(root=str(root), backend=backend, num_workers=workers, flip=True, shuffle_buffer=256)
    loader = make_loader(cfg, ModelConfig(image_size=SIZE, channels=3), split="train", rank=0, world_size=1,
                         batch_size=batch, device=torch.device("cpu"), seed=0)
    for _ in loader.epoch(0):
        pass
    start, count = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        for images, _ in loader.epoch(epoch):
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="DALI threads = DataLoader workers")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per backend; the median is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, root = Path(tmp) / "src", Path(tmp) / "shards"
        src.mkdir()
        make_images(src, args.images)
        if cli(["prepare", "folder", "--src", str(src), "--out", str(root), "--size", str(SIZE), "--format", "jpeg",
                "--quality", "90", "--test-fraction", "0", "--shard-size", "256"]) != 0:
            sys.exit("prepare failed")
        print(f"\n{args.images} JPEG {SIZE}x{SIZE} q90, batch {args.batch}, random flip, {args.epochs} timed epochs, "
              f"median of {args.repeats}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
        print("| threads / workers | DALI CPU (img/s) | webdataset + PIL (img/s) | DALI / wds |")
        print("|---|---|---|---|")
        for workers in args.workers:
            runs: dict[str, list[float]] = {"dali": [], "webdataset": []}
            for _ in range(args.repeats):  # alternate, so that a burst of load elsewhere hits both backends
                for backend, values in runs.items():
                    values.append(throughput(root, backend, workers, args.batch, args.epochs))
            dali, wds = (statistics.median(v) for v in runs.values())
            print(f"| {workers} | {dali:.0f} | {wds:.0f} | {dali / wds:.2f}x |")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

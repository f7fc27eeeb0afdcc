"""Data on an object store: the node-local cache's fill rate against `aws s3 cp --recursive` on the same server and
files, the time to the first batch of 2 ranks with a cold and a warm cache, and streaming vs cached images/s per
backend. Prints tables. The server is SeaweedFS on 127.0.0.1 (tests/object_store.py; `make test-s3` installs it).

    python3 -m venv /tmp/aws && /tmp/aws/bin/pip install awscli          # the reference, kept out of our venv
    .venv/bin/python bench/bench_object_store.py --aws /tmp/aws/bin/aws

1. Fill: a CelebA-HQ-256-sized data set (--images JPEG samples 256x256, ~1 GB in shards of 1000) uploaded with
   `glow-dist prepare`'s uploader, then downloaded into an empty cache folder by shard_cache (sha256 checked while
   downloading, 8 files at once) and by `aws s3 cp --recursive` (its defaults: 10 requests at once, 8 MiB parts),
   alternating, --repeats times each; median MB/s.
2. First batch: 2 processes (ranks 0 and 1 of 2, as on one node) started together, each opening the data set and
   reading its first batch; wall time until both have it, cold (empty cache: one of them downloads, the other waits)
   and warm (the second job). Both include starting Python and importing torch, the same in every row.
3. Images/s of one epoch of --loader-images samples, rank 0 of 1, cached (warm) vs streamed (data.cache=never),
   per backend, after a warm-up epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench_data import SIZE  # noqa: E402
from bench_verify import encode_images, write_set  # noqa: E402
from object_store import SeaweedS3  # noqa: E402

from glow_dist.config import DataConfig, ModelConfig  # noqa: E402
from glow_dist.data import make_loader  # noqa: E402
from glow_dist.data.publish import publish  # noqa: E402
from glow_dist.data.remote import open_store  # noqa: E402
from glow_dist.data.shard_cache import _open_root  # noqa: E402

FIRST_BATCH = """
import sys, time, torch
from glow_dist.config import DataConfig, ModelConfig
from glow_dist.data import make_loader
cfg = DataConfig(root=sys.argv[1], backend="webdataset", cache_dir=sys.argv[2], num_workers=1)
loader = make_loader(cfg, ModelConfig(image_size=int(sys.argv[4]), channels=3), "train", int(sys.argv[3]), 2, 16,
                     torch.device("cpu"), 0)
next(iter(loader.epoch(0)))
"""


def fill_mb_s(root: str, cache: Path, nbytes: int) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    _open_root.cache_clear()
    t0 = time.perf_counter()
    _open_root(root, "auto", str(cache), 0.0)
    return nbytes / 1e6 / (time.perf_counter() - t0)


def aws_mb_s(aws: str, root: str, folder: Path, nbytes: int, endpoint: str) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint, root,
                    str(folder)], check=True)
    return nbytes / 1e6 / (time.perf_counter() - t0)


def first_batch_s(root: str, cache: Path) -> float:
    t0 = time.perf_counter()
    ranks = [subprocess.Popen([sys.executable, "-c", FIRST_BATCH, root, str(cache), str(r), str(SIZE)])
             for r in (0, 1)]
    if any(p.wait() != 0 for p in ranks):
        raise SystemExit("a rank failed")
    return time.perf_counter() - t0


def images_per_s(root: str, backend: str, cache: str, cache_dir: Path, workers: int, batch: int) -> float:
    _open_root.cache_clear()
    cfg = DataConfig(root=root, backend=backend, cache=cache, cache_dir=str(cache_dir), num_workers=workers)
    loader = make_loader(cfg, ModelConfig(image_size=SIZE, channels=3), "train", 0, 1, batch, torch.device("cpu"), 0)
    for _ in loader.epoch(0):
        pass
    t0, count = time.perf_counter(), 0
    for images, _ in loader.epoch(1):
        count += images.shape[0]
    return count / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aws", default=shutil.which("aws") or "aws", help="the aws CLI to compare with")
    parser.add_argument("--images", type=int, default=30000, help="samples of the fill set (CelebA-HQ: 30k)")
    parser.add_argument("--loader-images", type=int, default=2048, help="samples of the images/s set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = SeaweedS3(tmp / "weed").start()
        try:
            for name, value in store.env().items():
                if name.startswith("AWS_"):
                    os.environ[name] = value
            store.make_bucket("bench")
            (tmp / "src").mkdir()
            encoded = encode_images(tmp / "src", 256)
            nbytes = write_set(tmp / "big", encoded, args.images, 1000)
            nbytes += sum(p.stat().st_size for p in (tmp / "big").glob("*.idx"))
            publish(tmp / "big", open_store("s3://bench/big"), [])
            write_set(tmp / "small", encoded, args.loader_images, 256)
            publish(tmp / "small", open_store("s3://bench/small"), [])
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(fill_mb_s("s3://bench/big", tmp / "cache", nbytes))
                theirs.append(aws_mb_s(args.aws, "s3://bench/big", tmp / "aws", nbytes, store.endpoint))
            print(f"\n1. cache fill, {nbytes / 1e6:.0f} MB in {len(list((tmp / 'big').glob('*.tar')))} shards, "
                  f"median of {args.repeats}")
            print(f"{'downloader':<34}{'MB/s':>8}{'runs':>28}")
            for name, runs in (("shard_cache (sha256 while reading)", ours), ("aws s3 cp --recursive", theirs)):
                print(f"{name:<34}{statistics.median(runs):>8.0f}{' '.join(f'{r:.0f}' for r in runs):>28}")
            print(f"ratio ours/theirs: {statistics.median(ours) / statistics.median(theirs):.2f}")

            cache = tmp / "cache-small"
            cold = first_batch_s("s3://bench/small", cache)
            warm = first_batch_s("s3://bench/small", cache)
            local = first_batch_s(str(tmp / "small"), tmp / "unused")
            print("\n2. time to the first batch, 2 ranks on one node (includes Python + torch start-up)")
            print(f"{'cache':<28}{'seconds':>8}")
            for name, s in (("cold (one rank downloads)", cold), ("warm (second job)", warm),
                            ("local folder, no cache", local)):
                print(f"{name:<28}{s:>8.1f}")

            print(f"\n3. images/s, {args.loader_images} JPEG {SIZE}x{SIZE}, {args.workers} workers, batch {args.batch}")
            print(f"{'backend':<12}{'cached':>9}{'streamed':>10}{'ratio':>7}")
            rows = {}
            for backend in ("webdataset", "dali"):
                try:
                    cached = images_per_s("s3://bench/small", backend, "auto", cache, args.workers, args.batch)
                    streamed = images_per_s("s3://bench/small", backend, "never", tmp / "idx", args.workers,
                                            args.batch)
                except ImportError:
                    continue
                rows[backend] = (cached, streamed)
                print(f"{backend:<12}{cached:>9.0f}{streamed:>10.0f}{streamed / cached:>7.2f}")
            print(json.dumps({"fill_mb_s": ours, "aws_mb_s": theirs, "first_batch_s": [cold, warm, local],
                              "images_s": rows}))
        finally:
            store.stop()


if __name__ == "__main__":
    main()

"""`make_loader`: the trainer's one entry point to the data, with the DALI or the webdataset backend behind it.

Who reads what (both backends, so that they agree):
- A split is the concatenation of its shards, N samples. Rank r reads the contiguous part
  [N*p//W, N*(p+1)//W) with p = r for the test split and p = (r + epoch) % W for training, so parts rotate
  between ranks from epoch to epoch while the ranks of one epoch stay disjoint. This is exactly how DALI's reader
  splits `shard_id`/`num_shards`. `prepare` shuffled the training set once, so the parts are alike.
- Training: every rank yields floor(floor(N/W)/B) full batches (set by the smallest part) so that every rank makes
  the same number of all-reduce calls; the order inside a part is a seeded shuffle of (seed, epoch, rank), so
  `epoch(e, start_batch=k)` on a resumed run gives exactly batches k.. of that epoch again.
- Test: in order, every sample exactly once across ranks; the last batch may be partial.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glow_dist.config import DataConfig, ModelConfig
from glow_dist.data.manifest import (
    DataError,
    check_model_shape,
    partition,
    read_manifest,
    split_shards,
    test_batches,
    train_batches,
)

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_seed(*parts: int) -> int:
    """A 31-bit seed from (seed, epoch, rank, ...): independent streams without hand-made arithmetic."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


class Loader:
    """Batches of one split for one rank. Subclasses implement `_read(epoch, part, start_batch)`."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], split: str, rank: int, world_size: int,
                 batch_size: int, device: torch.device, seed: int, flip: bool, num_workers: int,
                 shuffle_buffer: int) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.root, self.manifest, self.split = Path(root), manifest, split
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.device, self.seed = device, seed
        self.train = split == "train"
        self.flip = flip and self.train  # evaluation always sees the images as stored
        self.num_workers, self.shuffle_buffer = num_workers, max(1, shuffle_buffer)
        self.shards = split_shards(manifest, root, split)
        self.total = sum(s["num_samples"] for s in self.shards)
        self.image_size, self.channels, self.image_ext = manifest["image_size"], manifest["channels"], \
            manifest["image_ext"]
        if self.train:
            self.batches_per_epoch = train_batches(self.total, world_size, batch_size)
            self.num_samples = self.batches_per_epoch * batch_size
            if self.batches_per_epoch == 0:
                raise DataError(
                    f"{root}: the train split has {self.total} samples, fewer than world size {world_size} x "
                    f"batch size {batch_size}; lower train.batch_size or prepare more data"
                )
        else:
            lo, hi = partition(self.total, world_size, rank)
            self.num_samples = hi - lo
            self.batches_per_epoch = test_batches(hi - lo, batch_size)

    def part(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size if self.train else self.rank

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches `start_batch`.. of epoch `epoch`: (uint8 (B, C, H, W), int64 (B,)) on the loader's device."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise DataError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch}")
        if self.batches_per_epoch == start_batch:
            return
        yield from self._read(epoch, self.part(epoch), start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _read(self, epoch: int, part: int, start_batch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        """(B, H, W, C) -> (B, C, H, W) on the device; one copy, non-blocking from pinned memory."""
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        return images, labels.to(self.device, dtype=torch.int64, non_blocking=True)

    def find_bad_sample(self, part: int) -> DataError | None:
        """Decode the part with PIL to name the shard and key that a backend (DALI) could not decode."""
        from glow_dist.data.wds_loader import decode_sample, read_range

        lo, hi = partition(self.total, self.world_size, part)
        for sample in read_range(self.shards, lo, hi, [self.image_ext, "cls"]):
            try:
                decode_sample(sample, self.image_ext, self.image_size, self.channels)
            except DataError as e:
                return e
        return None


def make_loader(data_cfg: DataConfig, model_cfg: ModelConfig, split: str, rank: int, world_size: int,
                batch_size: int, device: torch.device | str, seed: int) -> Loader:
    """The loader of `split` for this rank; checks the data set against the model's image size and channels."""
    manifest = read_manifest(data_cfg.root)
    check_model_shape(manifest, model_cfg.image_size, model_cfg.channels, data_cfg.root)
    backend = resolve_backend(data_cfg.backend)
    if backend == "dali":
        from glow_dist.data.dali_loader import DaliLoader as cls
    else:
        from glow_dist.data.wds_loader import WdsLoader as cls
    return cls(data_cfg.root, manifest, split, rank, world_size, batch_size, torch.device(device), seed,
               flip=data_cfg.flip, num_workers=data_cfg.num_workers, shuffle_buffer=data_cfg.shuffle_buffer)


def resolve_backend(backend: str) -> str:
    """auto -> dali when it can be imported, else webdataset; an explicit `dali` without DALI is an error."""
    if backend == "webdataset":
        return backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        if backend == "dali":
            raise DataError("data.backend=dali but nvidia-dali is not installed; `pip install nvidia-dali-cuda120` "
                            "or set data.backend=webdataset") from None
        return "webdataset"
    return "dali"


def iter_samples(root: str | Path, split: str) -> Iterator[tuple[np.ndarray, int, dict[str, int]]]:
    """Every sample of `split` in file order: (uint8 (H, W, C) image, label or -1, {attribute: +1/-1})."""
    import json

    from glow_dist.data.wds_loader import decode_sample, read_range

    manifest = read_manifest(root)
    shards = split_shards(manifest, root, split)
    total = sum(s["num_samples"] for s in shards)
    ext = manifest["image_ext"]
    for sample in read_range(shards, 0, total, [ext, "cls", "json"]):
        image, label = decode_sample(sample, ext, manifest["image_size"], manifest["channels"])
        attrs = json.loads(sample["json"]).get("attrs", {}) if "json" in sample else {}
        yield image, label, attrs

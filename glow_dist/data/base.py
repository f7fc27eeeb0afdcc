"""What both loader backends share: the `Loader` base class, the batch type, seeding, and reading and decoding
samples straight from the shards (used by the webdataset backend, by DALI's error reports and by `iter_samples`).

Each backend (`dali_loader`, `wds_loader`) depends on this module alone; `loader.make_loader` chooses between them.

Who reads what (both backends, so that they agree):
- A split is the concatenation of its shards, N samples. Rank r reads the contiguous part
  [N*p//W, N*(p+1)//W) with p = r for the test split and p = (r + epoch) % W for training, so parts rotate
  between ranks from epoch to epoch while the ranks of one epoch stay disjoint. This is exactly how DALI's reader
  splits `shard_id`/`num_shards`. `prepare` shuffled the training set once, so the parts are alike.
- Training: every rank yields floor(floor(N/W)/B) full batches (set by the smallest part) so that every rank makes
  the same number of all-reduce calls; the order inside a part is a seeded shuffle of (seed, epoch, rank), so
  `epoch(e, start_batch=k)` on a resumed run gives exactly batches k.. of that epoch again.
- Test: in order, every sample exactly once across ranks; the last batch may be partial.
- Pixels: uint8 with the low 8 - n_bits bits cleared (the n-bit quantization, done by the loader: on the GPU when
  DALI decodes there). `model.quantize` of such an image gives the same bins as of the full 8-bit image.
"""
from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glow_dist.data.manifest import DataError, partition, read_index, split_shards, test_batches, train_batches
from glow_dist.data.remote import open_shard
from glow_dist.data.samples import check_sample
from glow_dist.data.verify import BadSample, substitutes

Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_seed(*parts: int) -> int:
    """A 31-bit seed from (seed, epoch, rank, ...): independent streams without hand-made arithmetic."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def quantize_mask(n_bits: int) -> int:
    """The uint8 mask that keeps the top n_bits of a value: x & mask == (x >> (8 - n)) << (8 - n)."""
    if not 1 <= n_bits <= 8:
        raise DataError(f"n_bits must be in 1..8, got {n_bits}")
    return (0xFF << (8 - n_bits)) & 0xFF


def read_range(shards: list[dict[str, Any]], lo: int, hi: int, exts: list[str]) -> Iterator[dict[str, Any]]:
    """Samples [lo, hi) of the concatenated shards as webdataset dicts (`__key__`, `__url__`, one entry per ext)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    start = 0
    for shard in shards:
        end = start + shard["num_samples"]
        if end > lo and start < hi:
            first, count = max(lo - start, 0), min(hi, end) - max(lo, start)
            # A member's header starts at the 512-byte boundary after the previous sample's last data block.
            offset = _header_offsets(shard["index_path"])[first]
            try:
                with open_shard(shard["path"]) as f:   # a URL when streaming (data.cache=never)
                    f.seek(offset)
                    wanted = tar_file_iterator(f, select_files=lambda name: name.split(".", 1)[-1] in exts)
                    files = ({**entry, "__url__": shard["path"]} for entry in wanted)
                    for k, sample in enumerate(islice(group_by_keys(files), count)):
                        sample["__index__"] = start + first + k  # position in the split: names substitutes
                        yield sample
            except (OSError, ValueError, EOFError, tarfile.TarError) as e:
                raise DataError(f"cannot read shard {shard['path']}: {e}; re-run `glow-dist prepare --overwrite`") \
                    from e
        start = end


@functools.lru_cache(maxsize=64)
def _header_offsets(index_path: str) -> list[int]:
    """Byte offset of each sample's first tar header: the 512-byte boundary after the previous sample's data."""
    ends = [max(off + size for off, size in sample.values()) for sample in read_index(index_path)]
    return [0] + [-(-end // 512) * 512 for end in ends[:-1]]


def decode_checked(sample: dict[str, Any], ext: str, size: int, channels: int,
                   num_classes: int) -> tuple[np.ndarray, int] | str:
    """(uint8 (H, W, C) image, label) of one sample, or a phrase saying why it cannot be used. The header is read
    and compared with the manifest before PIL decodes anything (a declared 40000x40000 image costs nothing)."""
    from PIL import Image

    why = check_sample(sample.get(ext), sample.get("cls"), ext, size, channels, num_classes, checksums=False)
    if why:
        return why
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot be decoded: {e}"
    if array.shape[:2] != (size, size):
        return f"decodes to {array.shape[1]}x{array.shape[0]}, the manifest says {size}x{size}"
    return array.reshape(size, size, channels), int(sample["cls"])


def decode_sample(sample: dict[str, Any], ext: str, size: int, channels: int,
                  num_classes: int = -1) -> tuple[np.ndarray, int]:
    """(uint8 (H, W, C) image, label) of one sample; DataError naming shard and key when it cannot be used.
    num_classes -1: the label is not checked."""
    found = decode_checked(sample, ext, size, channels, num_classes)
    if isinstance(found, str):
        where = f"sample {sample.get('__key__')!r} in shard {sample.get('__url__')}"
        raise DataError(f"{where}: {found}; copy the shard again or re-run `glow-dist prepare --overwrite`")
    return found


class Loader:
    """Batches of one split for one rank. Subclasses implement `_read(epoch, part, start_batch)`.

    `backend` and `decode` ("cpu" or "gpu") name what runs, for the trainer's log.
    """

    backend = "none"

    def __init__(self, root: str | Path, manifest: dict[str, Any], split: str, rank: int, world_size: int,
                 batch_size: int, device: torch.device, seed: int, flip: bool, num_workers: int,
                 shuffle_buffer: int, n_bits: int = 8, decode: str = "cpu", bad_samples: list[BadSample] = (),
                 batch_key: str = "train.batch_size", num_classes: int = -1) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.root, self.manifest, self.split = Path(root), manifest, split
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.device, self.seed = device, seed
        self.train = split == "train"
        self.flip = flip and self.train  # evaluation always sees the images as stored
        self.num_workers, self.shuffle_buffer = num_workers, max(1, shuffle_buffer)
        self.n_bits, self.mask, self.decode = n_bits, quantize_mask(n_bits), decode
        self.shards = split_shards(manifest, root, split)
        self.total = sum(s["num_samples"] for s in self.shards)
        self.image_size, self.channels, self.image_ext = manifest["image_size"], manifest["channels"], \
            manifest["image_ext"]
        self.num_classes = num_classes  # labels must be in 0..num_classes-1 (class-conditional models); -1: any
        # Samples the start-up scan found bad (data.verify), each read as its substitute; more found while decoding
        # (webdataset) are collected in `found_bad` until the trainer takes them (take_bad_samples).
        self.bad_samples = [b for b in bad_samples if b.split == split]
        self.substitute = substitutes(self.bad_samples, self.shards)
        self.found_bad: list[BadSample] = []
        if self.train:
            self.batches_per_epoch = train_batches(self.total, world_size, batch_size)
            self.num_samples = self.batches_per_epoch * batch_size
            if self.batches_per_epoch == 0:
                raise DataError(
                    f"{root}: the train split has {self.total} samples, fewer than world size {world_size} x "
                    f"batch size {batch_size} ({batch_key}, per rank); lower {batch_key} to at most "
                    f"{self.total // world_size} or prepare more data",
                    everywhere=True
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

    def describe(self) -> str:
        return f"data: {self.backend} backend, decoding on the {self.decode.upper()} (device {self.device})"

    def _read(self, epoch: int, part: int, start_batch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        """(B, H, W, C) -> (B, C, H, W) on the device; one copy, non-blocking from pinned memory."""
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        return images, labels.to(self.device, dtype=torch.int64, non_blocking=True)

    def take_bad_samples(self) -> list[BadSample]:
        """Bad samples found while decoding since the last call (each replaced by a substitute already)."""
        found, self.found_bad = self.found_bad, []
        return found

    def shard_bounds(self, index: int) -> tuple[int, int, dict[str, Any]]:
        """[start, end) in the split of the shard holding sample `index`, and the shard."""
        start = 0
        for shard in self.shards:
            if index < start + shard["num_samples"]:
                return start, start + shard["num_samples"], shard
            start += shard["num_samples"]
        raise IndexError(index)

    def decode_or_substitute(self, sample: dict[str, Any]) -> tuple[np.ndarray, int, BadSample | None]:
        """(image, label, None) of a good sample; for a bad one its substitute's, and the BadSample to report (None
        when the start-up scan already named it). The substitute is the nearest earlier sample of the shard that
        decodes, else the nearest later one: the same rule as `verify.substitutes`."""
        index = sample.get("__index__", -1)
        known = index in self.substitute
        if known:
            sample = next(read_range(self.shards, self.substitute[index], self.substitute[index] + 1,
                                     [self.image_ext, "cls"]))
        found = decode_checked(sample, self.image_ext, self.image_size, self.channels, self.num_classes)
        if not isinstance(found, str):
            return (*found, None)
        start, end, shard = self.shard_bounds(index)
        bad = BadSample(self.split, index, Path(shard["path"]).name, sample.get("__key__", "?"), found)
        for j in (*range(index - 1, start - 1, -1), *range(index + 1, end)):
            other = next(read_range(self.shards, j, j + 1, [self.image_ext, "cls"]))
            good = decode_checked(other, self.image_ext, self.image_size, self.channels, self.num_classes)
            if not isinstance(good, str):
                return (*good, bad)
        raise DataError(f"shard {shard['path']}: none of its samples can be decoded ({found}); copy it again or "
                        "re-run `glow-dist prepare --overwrite`")

    def find_bad_sample(self, part: int) -> DataError | None:
        """Decode the part with PIL to name the shard and key that a backend (DALI) could not decode."""
        lo, hi = partition(self.total, self.world_size, part)
        for sample in read_range(self.shards, lo, hi, [self.image_ext, "cls"]):
            if sample["__index__"] in self.substitute:
                continue  # never handed to DALI: its index points at the substitute
            try:
                decode_sample(sample, self.image_ext, self.image_size, self.channels, self.num_classes)
            except DataError as e:
                return e
        return None

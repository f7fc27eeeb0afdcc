"""The `dali` backend: DALI's webdataset reader on the index files, decoding on the rank's GPU (decoders.image with
device="mixed", device_id = the local rank's GPU) when `decode` is "gpu", on the CPU otherwise; batches reach the
trainer through DALI's PyTorch iterator.

GPU decode: the flip, the n-bit quantization (a bitwise AND) and the HWC -> CHW transpose run on the GPU too, and
the iterator copies each batch device-to-device into a torch CUDA tensor, so images never pass through host memory;
only the labels (a few bytes per sample) are read on the host. CPU decode: the same graph on the CPU, then one copy
to the device.

One pipeline per epoch, seeded from (seed, epoch, rank): DALI's reader shuffle has no notion of epochs we can
address, so a fresh pipeline is what makes `epoch(e, start_batch=k)` reproduce the same batches on a resumed run.
Its shuffle draws from a buffer of `data.shuffle_buffer` samples and stays within one pass over the part.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glow_dist.data.base import Batch, Loader, epoch_seed
from glow_dist.data.manifest import DataError, partition

LABEL_WIDTH = 12  # .cls holds the class id as ASCII text; padded with spaces to a fixed width to batch it


class DaliLoader(Loader):
    backend = "dali"
    _patched: Path | None = None   # folder of the patched index files, made on first use

    def device_id(self) -> int | None:
        """The GPU DALI decodes on: this rank's device (`dist.pin_device` makes it cuda:local_rank); None on CPU."""
        if self.decode != "gpu":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def index_paths(self) -> list[str]:
        """The index file DALI reads per shard: the shard's own, or, for a shard with bad samples (the start-up
        scan's), a copy in which each bad sample's line points at its substitute's bytes in the same tar. DALI then
        never receives a sample that failed the header, checksum or label check (its PNG decoder can crash on
        damaged bytes, which no exception reports), and the part keeps its length: same batches, same steps."""
        if not self.substitute:
            return [s["index_path"] for s in self.shards]
        if self._patched is None:
            self._patched = Path(tempfile.mkdtemp(prefix="glow-dist-idx-"))
            weakref.finalize(self, shutil.rmtree, self._patched, True)
        paths, start = [], 0
        for n, shard in enumerate(self.shards):
            end = start + shard["num_samples"]
            mine = {i - start: j - start for i, j in self.substitute.items() if start <= i < end}
            if not mine:
                paths.append(shard["index_path"])
            else:
                lines = Path(shard["index_path"]).read_text().splitlines()
                for i, j in mine.items():
                    lines[i + 1] = lines[j + 1]
                patched = self._patched / f"{n:06d}-{Path(shard['index_path']).name}"
                patched.write_text("\n".join(lines) + "\n")
                paths.append(str(patched))
            start = end
        return paths

    def _pipeline(self, epoch: int, part: int) -> Any:
        from nvidia.dali import pipeline_def

        @pipeline_def
        def pipeline() -> tuple:
            return self.graph(part)

        return pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_workers), device_id=self.device_id(),
                        seed=epoch_seed(self.seed, epoch, self.rank), prefetch_queue_depth=2)

    def graph(self, part: int) -> tuple:
        """The pipeline's operators (called inside a pipeline definition): (CHW images, padded .cls labels)."""
        from nvidia.dali import fn, types

        encoded, cls = fn.readers.webdataset(
            paths=[s["path"] for s in self.shards], index_paths=self.index_paths(),
            ext=[self.image_ext, "cls"], shard_id=part, num_shards=self.world_size,
            # stick_to_shard: a batch that runs past the end of the part wraps around inside the part, never
            # into another rank's samples (we drop or trim those wrapped samples anyway).
            stick_to_shard=True, random_shuffle=self.train, initial_fill=self.shuffle_buffer, name="reader",
        )
        images = decode_images(encoded, "mixed" if self.decode == "gpu" else "cpu", self.channels)
        if self.flip:
            images = fn.flip(images, horizontal=fn.random.coin_flip())  # the coin is drawn on the CPU
        if self.mask != 0xFF:
            images = images & types.Constant(self.mask, dtype=types.UINT8)
        images = fn.transpose(images, perm=[2, 0, 1])  # HWC -> CHW where the images are (GPU or CPU)
        labels = fn.pad(cls, fill_value=ord(" "), shape=[LABEL_WIDTH])
        return images, labels

    def _read(self, epoch: int, part: int, start_batch: int) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        lo, hi = partition(self.total, self.world_size, part)
        if hi == lo:
            return
        try:
            pipe = self._pipeline(epoch, part)
            pipe.build()
            # size=-1 without reader_name: the iterator never ends by itself; we count batches ourselves because
            # the batch count is set by the smallest rank's part, not by this rank's.
            batches = DALIGenericIterator([pipe], ["images", "labels"], size=-1, auto_reset=False)
        except RuntimeError as e:
            # The iterator prefetches while it is built, so a bad sample (undecodable, wrong size) can fail here.
            raise self.find_bad_sample(part) or DataError(
                f"DALI could not open the {self.split} shards in {self.root}: {e}") from e
        shape = (self.channels, self.image_size, self.image_size)
        try:
            for j in range(self.batches_per_epoch):
                try:
                    out = next(batches)[0]
                except RuntimeError as e:
                    raise self.find_bad_sample(part) or DataError(
                        f"DALI failed reading the {self.split} split of {self.root}: {e}") from e
                if j < start_batch:
                    continue  # resuming: the pipeline must still draw these to keep its random state in step
                images, labels = out["images"], out["labels"]
                if tuple(images.shape[1:]) != shape:
                    raise self.find_bad_sample(part) or DataError(
                        f"{self.root}: decoded images are {tuple(images.shape[1:])} (CHW), the manifest says "
                        f"{self.image_size}x{self.image_size}x{self.channels}")
                keep = min(self.batch_size, (hi - lo) - j * self.batch_size)  # the test split's last batch
                labels = torch.tensor([int(bytes(row)) for row in labels[:keep].cpu().numpy()], dtype=torch.int64)
                # GPU decode: already on this device (a no-op); CPU decode: the one host -> device copy.
                yield images[:keep].to(self.device, non_blocking=True), \
                    labels.to(self.device, non_blocking=True)
        finally:
            del batches, pipe  # free the pipeline's threads and buffers before the next epoch builds its own


def decode_images(encoded: Any, device: str, channels: int) -> Any:
    """DALI's image decoder: device "mixed" (nvJPEG on the GPU, other formats on the host then uploaded) or "cpu"."""
    from nvidia.dali import fn, types

    return fn.decoders.image(encoded, device=device, output_type=types.GRAY if channels == 1 else types.RGB)

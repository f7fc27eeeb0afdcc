"""The `dali` backend: DALI's webdataset reader on the index files, decoding on the GPU ("mixed") for CUDA devices
and on the CPU otherwise, through DALI's PyTorch iterator.

One pipeline per epoch, seeded from (seed, epoch, rank): DALI's reader shuffle has no notion of epochs we can
address, so a fresh pipeline is what makes `epoch(e, start_batch=k)` reproduce the same batches on a resumed run.
Its shuffle draws from a buffer of `data.shuffle_buffer` samples and stays within one pass over the part.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from glow_dist.data.loader import Batch, Loader, epoch_seed
from glow_dist.data.manifest import DataError, partition

LABEL_WIDTH = 12  # .cls holds the class id as ASCII text; padded with spaces to a fixed width to batch it


class DaliLoader(Loader):
    def _pipeline(self, epoch: int, part: int) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        cuda = self.device.type == "cuda"

        @pipeline_def
        def pipeline() -> tuple:
            encoded, cls = fn.readers.webdataset(
                paths=[s["path"] for s in self.shards], index_paths=[s["index_path"] for s in self.shards],
                ext=[self.image_ext, "cls"], shard_id=part, num_shards=self.world_size,
                # stick_to_shard: a batch that runs past the end of the part wraps around inside the part, never
                # into another rank's samples (we drop or trim those wrapped samples anyway).
                stick_to_shard=True, random_shuffle=self.train, initial_fill=self.shuffle_buffer, name="reader",
            )
            images = fn.decoders.image(encoded, device="mixed" if cuda else "cpu",
                                       output_type=types.GRAY if self.channels == 1 else types.RGB)
            if self.flip:
                images = fn.flip(images, horizontal=fn.random.coin_flip())
            labels = fn.pad(cls, fill_value=ord(" "), shape=[LABEL_WIDTH])
            return images, labels

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if cuda else None
        return pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_workers), device_id=device_id,
                        seed=epoch_seed(self.seed, epoch, self.rank), prefetch_queue_depth=2)

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
                if tuple(images.shape[1:]) != (self.image_size, self.image_size, self.channels):
                    raise self.find_bad_sample(part) or DataError(
                        f"{self.root}: decoded images are {tuple(images.shape[1:])}, the manifest says "
                        f"{self.image_size}x{self.image_size}x{self.channels}")
                keep = min(self.batch_size, (hi - lo) - j * self.batch_size)  # the test split's last batch
                labels = torch.tensor([int(bytes(row)) for row in labels[:keep].cpu().numpy()], dtype=torch.int64)
                yield self._to_device(images[:keep], labels)
        finally:
            del batches, pipe  # free the pipeline's threads and buffers before the next epoch builds its own

"""The `webdataset` backend: webdataset's tar iteration + PIL decoding in a PyTorch DataLoader (no DALI needed).

Workers seek straight to the first sample they need (the DALI index gives the byte offsets), then stream the tar
with webdataset. Training: worker k owns a contiguous slice of the rank's part, shuffles it with a seeded buffer
and yields its batches; the DataLoader interleaves workers round-robin, so the batch order is a function of
(seed, epoch, rank, num_workers). Test: batch j is samples [jB, (j+1)B) of the part, read by worker j % workers.

Stopping: a scheduler signals every process of a job (Slurm, `timeout`, a process group), workers included. PyTorch's
worker dies of a SIGTERM that its parent did not send, and the parent then raises "DataLoader worker ... is killed by
signal: Terminated" in the middle of the stop. Workers therefore ignore the stop signals (the trainer decides when to
stop and shuts them down itself) and are killed when their parent dies; the signals stay blocked while they start, so
none arrives before they ignore it.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import multiprocessing
import multiprocessing.util  # its exit hook must be registered before ours (atexit runs last-in, first-out)
import random
import signal
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch

from glow_dist.data.base import Batch, Loader, decode_sample, epoch_seed, read_range
from glow_dist.data.manifest import DataError, partition
from glow_dist.data.verify import BadSample

__all__ = ["WdsLoader", "decode_sample", "read_range"]


class _EpochStream(torch.utils.data.IterableDataset):
    """One rank's epoch, split between DataLoader workers; yields (batch index, images or None, labels)."""

    def __init__(self, loader: WdsLoader, epoch: int, part: int, start_batch: int, workers: int) -> None:
        super().__init__()
        self.loader, self.epoch, self.part, self.start_batch, self.workers = loader, epoch, part, start_batch, workers

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor | None, list[BadSample]]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        ld, B = self.loader, self.loader.batch_size
        lo, hi = partition(ld.total, ld.world_size, self.part)
        n = ld.batches_per_epoch
        exts = [ld.image_ext, "cls"]
        if not ld.train:
            for j in range(worker, n, self.workers):
                if j >= self.start_batch:
                    samples = list(read_range(ld.shards, lo + j * B, min(hi, lo + (j + 1) * B), exts))
                    yield self._collate(j, samples, None)
            return
        # Worker k takes q_k batches (every workers-th), from a slice holding q_k*B samples plus its share of the
        # remainder that the epoch drops; the buffer shuffle decides which samples are dropped.
        quota = [len(range(k, n, self.workers)) for k in range(self.workers)]
        spare = (hi - lo) - n * B
        sizes = [q * B + spare * (k + 1) // self.workers - spare * k // self.workers for k, q in enumerate(quota)]
        start = lo + sum(sizes[:worker])
        stream = read_range(ld.shards, start, start + sizes[worker], exts)
        rng = random.Random(epoch_seed(ld.seed, self.epoch, ld.rank, worker))
        flips = np.random.default_rng(epoch_seed(ld.seed, self.epoch, ld.rank, worker, 1))
        shuffled = _buffer_shuffle(stream, ld.shuffle_buffer, rng)
        for t in range(quota[worker]):
            j = worker + t * self.workers
            samples = list(islice(shuffled, B))
            flip = flips.random(B) < 0.5  # drawn even for skipped batches: the resumed stream stays identical
            yield self._collate(j, samples, flip if ld.flip else None) if j >= self.start_batch else (j, None, None, [])

    def _collate(self, j: int, samples: list[dict[str, Any]], flip: np.ndarray | None) -> tuple:
        ld = self.loader
        images = torch.empty((len(samples), ld.image_size, ld.image_size, ld.channels), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            images.share_memory_()  # decode straight into shared memory: no extra copy when sent to the trainer
        pixels, labels, bad = images.numpy(), [], []
        for i, sample in enumerate(samples):
            # A bad sample (header, decode, label) becomes its substitute here, in the worker: the batch keeps its
            # shape, and the trainer hears of it through the batch (the worker cannot tell it otherwise).
            image, label, found = ld.decode_or_substitute(sample)
            if found is not None:
                bad.append(found)
            pixels[i] = image[:, ::-1] if flip is not None and flip[i] else image
            labels.append(label)
        if ld.mask != 0xFF:
            np.bitwise_and(pixels, ld.mask, out=pixels)  # the n-bit quantization, in place
        return j, images, torch.tensor(labels, dtype=torch.int64), bad


def _buffer_shuffle(stream: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's buffer shuffle, filled completely before the first draw so that it does not favour the start."""
    from webdataset.filters import _shuffle

    return _shuffle(stream, bufsize=size, initial=size, rng=rng)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
_PR_SET_PDEATHSIG = 1


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore the stop signals (the parent stops the workers), die with the parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # replaces PyTorch's SIGTERM handler, which re-raises it
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere PyTorch's parent watchdog remains
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent around the fork


def _kill_leftover_workers() -> None:
    """At interpreter exit, multiprocessing ends daemonic children (DataLoader workers) with SIGTERM and waits for
    them. Our workers ignore SIGTERM, so a loader left open by an exception (its iterator kept alive by the
    traceback) would hang the exit for ever; this hook runs first and ends them with SIGKILL instead."""
    # PyTorch's SIGCHLD handler raises when a worker dies of a signal; at exit that is expected.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=5)


@functools.cache
def _register_exit_hook() -> None:
    atexit.register(_kill_leftover_workers)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while workers are forked: they inherit the mask and unblock only
    after ignoring them. One that arrives meanwhile is delivered to the parent when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WdsLoader(Loader):
    backend = "webdataset"

    def _read(self, epoch: int, part: int, start_batch: int) -> Iterator[Batch]:
        workers = max(1, min(self.num_workers, self.batches_per_epoch))
        data = torch.utils.data.DataLoader(
            _EpochStream(self, epoch, part, start_batch, workers), batch_size=None,
            num_workers=workers if self.num_workers > 0 else 0, pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None,
        )
        pending: dict[int, tuple] = {}
        expected = start_batch
        if self.num_workers > 0:
            _register_exit_hook()
        with _stop_signals_blocked():
            batches = iter(data)  # forks the workers
        try:
            for j, images, labels, bad in batches:
                self.found_bad += bad
                if images is None:
                    continue
                pending[j] = (images, labels)
                # Round-robin already delivers in order; the buffer only guards that assumption.
                while expected in pending:
                    yield self._to_device(*pending.pop(expected))
                    expected += 1
        except DataError as e:
            # A worker's error arrives wrapped in its traceback text; its last line is the message for the user.
            raise DataError(str(e).strip().splitlines()[-1].removeprefix("glow_dist.data.manifest.DataError: ")) \
                from None
        finally:
            del batches  # a stop closes this generator: the workers are shut down now, not at garbage collection

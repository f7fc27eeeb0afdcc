"""Checkpoints written off the training path: a snapshot in host memory, then one background write at a time.

    snapshot = HostSnapshot()
    copy = snapshot.take(state)                  # every tensor copied into buffers kept from the last checkpoint
    writer = BackgroundWrite(step, lambda cancel: save_checkpoint(copy, ...))   # serialize, hash, write: a thread
    writer.join()                                # the path, or the write's error raised on this thread

The snapshot costs one copy of the checkpointed state in host memory (weights, EMA, optimizer moments: 2.75 GiB for
configs/celeba_hq_256.yaml; `glow-dist plan` says it). On a GPU its buffers are pinned and each tensor crosses to
the host once, all copies queued before one synchronize. The buffers are reused by the next checkpoint, which is
why a write must be finished before the next snapshot is taken (CheckpointManager waits for it).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch


class HostSnapshot:
    """Host buffers for one copy of a nested state (dicts, lists, tensors, plain values), reused between copies
    while the shapes and dtypes stay the same."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, state: dict) -> dict:
        """A copy of `state` whose tensors live in this snapshot's host buffers, complete when this returns."""
        self._device_copies = False
        copied = self._copy(state, ())
        if self._device_copies:
            torch.cuda.synchronize()   # the device-to-host copies were queued without waiting for each
        return copied

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _copy(self, value: object, key: tuple) -> object:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, key)
        if isinstance(value, dict):
            return {k: self._copy(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, (*key, i)) for i, v in enumerate(value))
        return value   # numbers, strings, None: immutable

    def _copy_tensor(self, tensor: torch.Tensor, key: tuple) -> torch.Tensor:
        tensor = tensor.detach()
        on_device = tensor.device.type != "cpu"
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype or \
                buffer.stride() != tensor.stride():
            # the same strides as the tensor's (empty_like keeps a dense layout), so a resume restores it exactly
            buffer = torch.empty_like(tensor, device="cpu", pin_memory=on_device and torch.cuda.is_available())
            self._buffers[key] = buffer
        buffer.copy_(tensor, non_blocking=on_device)
        self._device_copies |= on_device
        return buffer


class BackgroundWrite:
    """`write(cancel)` on a thread of its own; `join()` hands back its result, or raises its error, on the caller's
    thread; `supersede()` sets `cancel`, so that the write gives up (files.Superseded) at its next block. Daemonic: a
    second Ctrl-C or a crash does not wait for it (its temporary file is never read)."""

    def __init__(self, step: int, write: Callable[[threading.Event], Path]) -> None:
        self.step = step
        self._cancel = threading.Event()
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"glow-dist-checkpoint-{step}",
                                        daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[threading.Event], Path]) -> None:
        try:
            self._result = write(self._cancel)
        except BaseException as e:   # noqa: BLE001  (handed to the training thread by join)
            self._error = e

    def supersede(self) -> None:
        self._cancel.set()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> Path:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

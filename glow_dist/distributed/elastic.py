"""Horovod elastic (`dist.elastic=true`): workers may die or join while the job runs.

Under `horovodrun --host-discovery-script ... --min-np ... --max-np ...` every worker runs the training function inside
`elastic_run`; a lost peer (HorovodInternalError) or a host change noticed at a commit (HostsUpdatedInterrupt)
restarts Horovod with the new world, rolls the state back to its last commit, runs the reset callbacks and broadcasts
rank 0's state to everyone (including new workers) before calling it again.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from glow_dist.distributed.gateway import broadcast_training_state, horovod_module


def elastic_launched() -> bool:
    """True in a worker started by an elastic horovodrun (one given a host discovery script)."""
    return horovod_module() is not None and os.environ.get("HOROVOD_ELASTIC") == "1"


def elastic_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: torch.nn.Module,
                  **fields: Any) -> Any:
    """Horovod's TorchState over the model, the (distributed) optimizer, the EMA copy and plain picklable `fields`
    (readable and assignable as attributes). `commit()` copies them to host memory (and raises if hosts changed);
    `restore()` returns to the last commit; `sync()` broadcasts rank 0's copy, as the other broadcasts here do:
    bool buffers (ActNorm's `initialized`) as uint8, and no zero-gradient optimizer step on a fresh start."""
    if horovod_module() is None:
        raise RuntimeError("elastic_state needs Horovod: run under horovodrun with --host-discovery-script")
    import horovod.torch.elastic as hvd_elastic
    from horovod.common.elastic import ObjectState

    class GlowState(hvd_elastic.TorchState):
        def sync(self) -> None:
            broadcast_training_state(self.model, self.optimizer, self.ema)
            ObjectState.sync(self)  # the plain fields; skips TorchState.sync, whose broadcasts reject bool tensors

    return GlowState(model=model, optimizer=optimizer, ema=ema, **fields)


def elastic_run(fn: Any) -> Any:
    """`fn(state, ...)` under Horovod elastic: re-run from the last commit, on the new world, after every change."""
    if horovod_module() is None:
        raise RuntimeError("elastic_run needs Horovod: run under horovodrun with --host-discovery-script")
    import horovod.torch.elastic as hvd_elastic

    return hvd_elastic.run(fn)

"""Exercise glow_dist.distributed.gateway on every rank and save what each rank saw to OUTDIR/rank{r}.pt.

    horovodrun -np 2 -H localhost:2 --gloo python tests/scripts/dist_check.py OUTDIR   # two ranks
    python tests/scripts/dist_check.py OUTDIR                                          # one plain process

tests/test_dist.py launches it and compares the ranks' files with a single-process reference.
It must not import pytest: it runs outside the test process.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

from glow_dist.distributed import gateway as dist

MAX_NORM = 0.5   # small enough that the first steps are clipped
LR, MOMENTUM = 0.1, 0.9


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def momentum(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["momentum_buffer"].clone() for s in optimizer.state.values() if "momentum_buffer" in s]


def train_step(model, optimizer, x, y, reported_loss=None) -> dist.StepResult:
    loss = ((model(x) - y) ** 2).mean()
    optimizer.zero_grad()  # Horovod 0.28's wrapper takes no set_to_none; torch 2.x sets None anyway
    loss.backward()
    return dist.clip_and_step(optimizer, model.parameters(), MAX_NORM, loss if reported_loss is None else reported_loss)


def thread_nice() -> dict:
    """Nice value of this (main) thread and of every other thread of the process."""
    main_tid = threading.get_native_id()
    others = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task") if int(t) != main_tid]
    return {"main": os.getpriority(os.PRIO_PROCESS, main_tid), "others": sorted(others)}


def main(outdir: Path) -> None:
    dist.init()  # background_priority "auto": Horovod's threads at nice 19 on a CPU-only machine
    r, n = dist.rank(), dist.size()
    out: dict = {"rank": r, "size": n, "local_rank": dist.local_rank(), "local_size": dist.local_size(),
                 "is_main": dist.is_main(),
                 "host_count": dist.host_count(), "device": str(dist.pin_device()),
                 "max_norm": MAX_NORM, "lr": LR, "momentum": MOMENTUM, "nice": thread_nice()}
    out["sum"] = dist.allreduce_sum(torch.tensor([r + 1.0])).item()
    out["mean"] = dist.allreduce_mean(torch.tensor([float(r), 10.0 * r])).tolist()
    out["scalars"] = dist.allreduce_scalars({"b": float(r), "a": 2.0 * r})
    out["object"] = dist.broadcast_object({"from": r})

    torch.manual_seed(100 + r)  # each rank starts from different weights: the broadcast must fix that
    model = torch.nn.Linear(4, 2)
    dist.broadcast_parameters(model)
    out["init"] = state(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    optimizer = dist.distributed_optimizer(optimizer, model, fp16_allreduce=False)
    dist.broadcast_optimizer_state(optimizer)  # fresh state: must be a no-op, not a zero-gradient step
    out["init_after_opt_broadcast"] = state(model)

    gen = torch.Generator().manual_seed(r)  # rank-different data
    out["data"], out["norms"], out["skipped"] = [], [], []
    for _ in range(3):
        x, y = torch.randn(8, 4, generator=gen) * (r + 1), torch.randn(8, 2, generator=gen)
        result = train_step(model, optimizer, x, y)
        out["data"].append((x, y))
        out["norms"].append(result.grad_norm.item())
        out["skipped"].append(result.skipped)
    out["after_steps"] = state(model)

    # Rank 1 gets a NaN loss: its gradient is NaN too, so every rank must skip together.
    before, before_momentum = state(model), momentum(optimizer)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    if r == 1:
        x[0, 0] = float("nan")
    out["nan_grad_skipped"] = train_step(model, optimizer, x, y).skipped
    # Rank 1 reports a NaN loss with finite gradients: only the explicit vote can make rank 0 skip.
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    nan_loss = torch.tensor(float("nan")) if r == 1 else None
    out["nan_loss_skipped"] = train_step(model, optimizer, x, y, reported_loss=nan_loss).skipped
    out["params_unchanged"] = all(torch.equal(before[k], v) for k, v in state(model).items())
    after_momentum = momentum(optimizer)
    out["momentum_unchanged"] = all(torch.equal(a, b) for a, b in zip(before_momentum, after_momentum, strict=True))
    # Training goes on after the skips (no pending Horovod handles, no hang).
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    out["after_skip_skipped"] = train_step(model, optimizer, x, y).skipped
    out["after_skip"] = state(model)

    # Resume path: rank 0's optimizer state reaches every rank.
    for s in optimizer.state.values():
        s["momentum_buffer"].add_(float(r))  # make the ranks differ
    dist.broadcast_optimizer_state(optimizer)
    out["momentum_after_broadcast"] = momentum(optimizer)
    dist.barrier()
    torch.save(out, outdir / f"rank{r}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

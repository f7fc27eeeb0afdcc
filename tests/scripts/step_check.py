"""Run on every rank under horovodrun by tests/test_step.py: the step component's distributed mechanics on CPU.

    horovodrun -np 2 -H localhost:2 --gloo python tests/scripts/step_check.py OUTDIR

1. What a CUDA-graph replay leaves behind, reproduced without a GPU: gradients computed while Horovod's hooks are
   suspended (no all-reduce started by backward); `clip_and_step` must then all-reduce every one of them.
2. The compiled step on rank-dependent batches: every rank must end with the same weights and EMA.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from glow_dist.config import load_config
from glow_dist.distributed import gateway as dist
from glow_dist.model import build_model, preprocess
from glow_dist.training.ema import EMA
from glow_dist.training.optimizer import make_optimizer
from glow_dist.training.step import build_train_step

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init()
    torch.set_num_threads(1)
    rank = dist.rank()
    cfg = load_config(REPO / "configs/debug.yaml", ["optim.grad_clip=0", "runtime.step_mode=compiled"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.runtime)
    g = torch.Generator().manual_seed(100 + rank)  # rank-dependent data
    m = cfg.model

    def images(n: int = 8) -> torch.Tensor:
        return torch.randint(0, 256, (n, m.channels, m.image_size, m.image_size), generator=g, dtype=torch.uint8)

    model.initialize(preprocess(images(16), m.n_bits), reduce_fn=dist.allreduce_sum)
    optimizer = dist.distributed_optimizer(make_optimizer(cfg.optim, model), model)
    ema = EMA(model, cfg.optim.ema_decay)
    dist.broadcast_training_state(model, optimizer, ema.model)

    # 1. Backward with the hooks suspended (as during a capture, and as a replay runs none), then clip_and_step.
    with dist.gradient_hooks_suspended(optimizer):
        model.log_prob(preprocess(images(), m.n_bits)).mean().neg().backward()
    local = [p.grad.clone() for p in model.parameters()]
    result = dist.clip_and_step(optimizer, model.parameters(), 0.0)
    reduced = [p.grad.clone() for p in model.parameters()]
    optimizer.zero_grad()

    # 2. The compiled step, 3 steps on this rank's data.
    step = build_train_step(cfg, model, optimizer, ema, device=torch.device("cpu"), rank=rank)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    bpds = [float(step(images(), None, step=i)[0]) for i in range(3)]
    torch.save({"local": local, "reduced": reduced, "skipped": result.skipped, "mode": step.mode, "bpds": bpds,
                "model": model.state_dict(), "ema": ema.state_dict()}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()

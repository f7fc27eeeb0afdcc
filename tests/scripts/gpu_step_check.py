"""Run on every rank under horovodrun (one GPU per rank) by tests/test_gpu_stack.py: the graphed step with real NCCL.

    horovodrun -np 2 -H localhost:2 python tests/scripts/gpu_step_check.py OUTDIR

For dist.fp16_allreduce false and true: the eager and the graphed step, 4 steps each from the same weights on this
rank's data (rank-dependent), with fp32 deterministic cuDNN. Dumps each run's mode, recorded tags, log lines and
weights; the test asserts that both ranks captured, that graphed equals eager, and that the ranks agree bitwise.
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
from glow_dist.training.step import build_train_step, noise_generator

REPO = Path(__file__).resolve().parents[2]


def run(mode: str, fp16: bool, rank: int, device: torch.device) -> dict:
    """4 steps of `mode` from the same weights on this rank's data (the same for both modes)."""
    cfg = load_config(REPO / "configs/debug.yaml", [f"runtime.step_mode={mode}", "optim.warmup_steps=0",
                                                    f"dist.fp16_allreduce={str(fp16).lower()}"])
    m = cfg.model
    g = torch.Generator().manual_seed(100 + rank)

    def images(n: int = 8) -> torch.Tensor:
        return torch.randint(0, 256, (n, m.channels, m.image_size, m.image_size), generator=g,
                             dtype=torch.uint8).to(device)

    torch.manual_seed(0)
    model = build_model(m, cfg.runtime).to(device)
    model.initialize(preprocess(images(16), m.n_bits, generator=noise_generator(device, 0, -1, rank)),
                     reduce_fn=dist.allreduce_sum)
    optimizer = dist.distributed_optimizer(make_optimizer(cfg.optim, model), model, cfg.dist.fp16_allreduce)
    ema = EMA(model, cfg.optim.ema_decay)
    dist.broadcast_training_state(model, optimizer, ema.model)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    logs: list[str] = []
    step = build_train_step(cfg, model, optimizer, ema, device=device, rank=rank, log=logs.append)
    bpds = [float(step(images(), None, step=i)[0]) for i in range(4)]
    return {"mode": step.mode, "tags": step.run_tags(), "logs": logs, "bpds": bpds,
            "model": {k: v.cpu() for k, v in model.state_dict().items()}}


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init()
    device = dist.pin_device()
    assert device.type == "cuda", "this check needs one GPU per rank"
    b = torch.backends
    b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, False, False, False
    dump = {f"{mode}-fp16={fp16}": run(mode, fp16, dist.rank(), device)
            for fp16 in (False, True) for mode in ("eager", "graphed")}
    torch.save(dump, out_dir / f"rank{dist.rank()}.pt")


if __name__ == "__main__":
    main()

"""Run on every rank under horovodrun by tests/test_step.py: the step component's distributed mechanics on CPU.

    horovodrun -np 2 -H localhost:2 --gloo python tests/scripts/step_check.py OUTDIR

1. What a CUDA-graph replay leaves behind, reproduced without a GPU: gradients computed while Horovod's hooks are
   suspended (no all-reduce started by backward); `allreduce_gradients_async` then starts them as one group in
   parameter order and `clip_and_step` must average every one of them.
2. The compiled step on rank-dependent batches: every rank must end with the same weights and EMA.
3. The graphed step through the torch.cuda stand-ins (tests/cuda_standins.py: a stand-in graph whose replay writes
   this step's gradients into the capture's memory) with Horovod's fp16 compression (`dist.fp16_allreduce`, whose
   synchronize moves p.grad onto the decompressed tensor): the same weights as the eager step with the same
   compression, and on every rank.
4. Rank 1's capture fails: both ranks run eager (the same all-reduces everywhere) and record why, naming rank 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the stand-ins
from cuda_standins import FakeCuda, pin  # noqa: E402

from glow_dist.config import load_config  # noqa: E402
from glow_dist.distributed import gateway as dist  # noqa: E402
from glow_dist.model import build_model, preprocess  # noqa: E402
from glow_dist.training.ema import EMA  # noqa: E402
from glow_dist.training.optimizer import make_optimizer  # noqa: E402
from glow_dist.training.step import EagerStep, GraphedStep, build_train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def graphed_with_standins(fake: FakeCuda, step: GraphedStep) -> None:
    """The stand-in graph's replay: this step's forward + backward on the static buffers, written into the memory
    the capture's backward allocated (what a real CUDA graph does), without touching p.grad."""
    params = [p for p in step.model.parameters() if p.requires_grad]
    buffers: list[torch.Tensor] = []

    def capture_end(graph) -> None:
        buffers[:] = [pin(p.grad) for p in params]

    def replay(graph) -> None:
        loss, bpd = step._loss(step.static_x, step.static_y)
        grads = torch.autograd.grad(loss * step.static_factor, params)
        with torch.no_grad():
            for buffer, g in zip(buffers, grads, strict=True):
                buffer.copy_(g)
            if hasattr(step, "static_loss"):
                step.static_loss.detach().copy_(loss * step.static_factor)
                step.static_bpd.detach().copy_(bpd)

    fake.on_capture_end, fake.on_replay = capture_end, replay


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init()
    torch.set_num_threads(1)
    rank = dist.rank()
    cfg = load_config(REPO / "configs/debug.yaml", ["optim.grad_clip=0", "runtime.step_mode=compiled"])
    m = cfg.model
    g = torch.Generator().manual_seed(100 + rank)  # rank-dependent data

    def images(n: int = 8) -> torch.Tensor:
        return torch.randint(0, 256, (n, m.channels, m.image_size, m.image_size), generator=g, dtype=torch.uint8)

    init_batch = images(16)

    def fresh(fp16: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
        """The same weights every time (and on every rank), wrapped for Horovod."""
        torch.manual_seed(0)
        model = build_model(m, cfg.runtime)
        model.initialize(preprocess(init_batch, m.n_bits, generator=torch.Generator().manual_seed(rank)),
                         reduce_fn=dist.allreduce_sum)
        optimizer = dist.distributed_optimizer(make_optimizer(cfg.optim, model), model, fp16_allreduce=fp16)
        ema = EMA(model, cfg.optim.ema_decay)
        dist.broadcast_training_state(model, optimizer, ema.model)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        return model, optimizer, ema

    model, optimizer, ema = fresh()
    # 1. Backward with the hooks suspended (as during a capture, and as a replay runs none), then the grouped
    #    all-reduce in parameter order and clip_and_step.
    with dist.gradient_hooks_suspended(optimizer):
        model.log_prob(preprocess(images(), m.n_bits)).mean().neg().backward()
    local = [p.grad.clone() for p in model.parameters()]
    dist.allreduce_gradients_async(optimizer, model.parameters())
    result = dist.clip_and_step(optimizer, model.parameters(), 0.0)
    reduced = [p.grad.clone() for p in model.parameters()]
    optimizer.zero_grad()

    # 2. The compiled step, 3 steps on this rank's data.
    step = build_train_step(cfg, model, optimizer, ema, device=CPU, rank=rank)
    bpds = [float(step(images(), None, step=i)[0]) for i in range(3)]
    dump = {"local": local, "reduced": reduced, "skipped": result.skipped, "mode": step.mode, "bpds": bpds,
            "model": model.state_dict(), "ema": ema.state_dict()}

    # 3. Graphed (stand-in graph) vs eager, both with Horovod's fp16 compression, 4 steps on this rank's data.
    batches = [images() for _ in range(4)]
    for kind in ("eager", "graphed"):
        with pytest.MonkeyPatch.context() as mp:
            fake = FakeCuda(mp)
            model, optimizer, ema = fresh(fp16=True)
            cls = GraphedStep if kind == "graphed" else EagerStep
            step = cls(cfg, model, optimizer, ema, device=CPU, rank=rank)
            if kind == "graphed":
                graphed_with_standins(fake, step)
            for i, x in enumerate(batches):
                step(x, None, step=i)
            dump[f"fp16_{kind}"] = {"mode": step.mode, "model": model.state_dict(),
                                    "replays": sum(e[0] == "replay" for e in fake.events)}

    # 4. Rank 1 cannot capture: every rank runs eager, and knows why.
    with pytest.MonkeyPatch.context() as mp:
        fake = FakeCuda(mp)
        if rank == 1:
            fake.fail_capture = RuntimeError("operation not permitted when stream is capturing")
        model, optimizer, ema = fresh()
        logs: list[str] = []
        step = GraphedStep(cfg, model, optimizer, ema, device=CPU, rank=rank, log=logs.append, warn=logs.append)
        graphed_with_standins(fake, step)
        for i in range(2):
            step(images(), None, step=i)
        dump["agreement"] = {"mode": step.mode, "tags": step.run_tags(), "logs": logs, "model": model.state_dict()}
    torch.save(dump, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()

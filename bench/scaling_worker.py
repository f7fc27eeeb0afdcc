"""One rank of the scaling benchmark: the trainer's step on synthetic data, one thread per rank, under horovodrun.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python bench/scaling_worker.py --batch 16 --steps 4

Uses the real distribution helpers (dist.init, distributed_optimizer, broadcast_parameters, clip_and_step) exactly as
`glow_dist.training.trainer` does; rank 0 prints one JSON line: the job's images/s and the median step time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from glow_dist.config import ModelConfig, choices
from glow_dist.distributed import gateway as dist
from glow_dist.model import Glow, bits_per_dim_from_log_prob


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8, help="K")
    parser.add_argument("--fp16-allreduce", action="store_true", help="gradients cross as fp16 (dist.fp16_allreduce)")
    parser.add_argument("--background-priority", choices=choices("dist.background_priority"), default="auto")
    parser.add_argument("--spin-waits", action="store_true",
                        help="wait the way Horovod's synchronize() does (spinning), as the gateway did before")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init(args.background_priority)
    if args.spin_waits:
        dist._restore_spinning_waits()  # Horovod's own synchronize(), which spins while it waits
    cfg = ModelConfig(image_size=32, channels=3, levels=3, steps=args.depth, width=args.width, coupling="additive",
                      invconv="lu", n_bits=8)
    torch.manual_seed(0)
    model = Glow(cfg)
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(dist.rank())) - 0.5
    model.initialize(x, reduce_fn=dist.allreduce_sum)  # Distributed: ActNorm statistics summed over ranks
    optimizer = dist.distributed_optimizer(torch.optim.Adamax(model.parameters(), lr=1e-4), model,
                                           fp16_allreduce=args.fp16_allreduce)
    dist.broadcast_parameters(model)  # Distributed: every rank starts from rank 0's weights

    times = []
    for i in range(args.steps + 1):
        dist.barrier()  # Distributed: every rank starts the step together, so the timing is the job's
        start = time.perf_counter()
        loss = bits_per_dim_from_log_prob(model.log_prob(x), model.num_dims, cfg.n_bits).mean()
        optimizer.zero_grad()
        loss.backward()
        dist.clip_and_step(optimizer, model.parameters(), 50.0, loss=loss)
        if i > 0:
            times.append(time.perf_counter() - start)
    step = dist.allreduce_scalars({"step": statistics.median(times)})["step"]  # mean over ranks of the medians
    if dist.is_main():
        print(json.dumps({"ranks": dist.size(), "batch": args.batch, "step_s": step,
                          "images_per_s": dist.size() * args.batch / step}), flush=True)


if __name__ == "__main__":
    main()

"""Training throughput of the reference architecture, as a fraction of this process's fp32 matmul rate; prints a table.

    .venv/bin/python bench/bench_train.py                                  # every variant, 5 rounds
    .venv/bin/python bench/bench_train.py --variants default nchw --rounds 3

Reference architecture: 32x32x3, L=3, K=8, width 512, additive coupling, LU 1x1 convs, batch 16 (one process).
A training step is what the trainer does: forward, bits/dim, backward, `dist.clip_and_step` (clip at 50, Adamax).

FLOPs per step are counted once with `torch.utils.flop_counter.FlopCounterMode` on one forward + backward of the
plain fp32 model (convolutions and matmuls; elementwise ops are not counted). Every variant is credited with that
same useful work, so recomputation (checkpoint, invertible) shows up as a lower fraction, not as more FLOPs.

Robust to a shared machine: all variants are built first, then timed in interleaved rounds (one step of each
variant per round, with the 2048x2048 fp32 matmul rate measured at the start of every round), and each cell is
the best over rounds of (step time, step FLOP/s / that round's matmul FLOP/s): on a machine shared with bursty
jobs the fastest round is the one least disturbed (as in `timeit`); the median is shown too, with the load average.
On CUDA, timings synchronize the device and the matmul reference is the same fp32 matmul on the GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from glow_dist.config import ModelConfig, RuntimeConfig
from glow_dist.distributed import gateway as dist
from glow_dist.model import Glow, bits_per_dim_from_log_prob

REFERENCE = ModelConfig(image_size=32, channels=3, levels=3, steps=8, width=512, coupling="additive", invconv="lu",
                        n_bits=8)

# name -> RuntimeConfig overrides of the defaults (fp32, NHWC activations on CPU, plain backprop). Each optimization
# is a runtime option, so the trainer gets it from the config.
VARIANTS: dict[str, dict] = {
    "default": {},
    "nchw": {"channels_last": "false"},   # the default before channels_last was
    "bf16": {"autocast": "bf16"},
    "nchw+bf16": {"channels_last": "false", "autocast": "bf16"},
    "compile": {"compile": True},
    "checkpoint": {"memory": "checkpoint"},
    "invertible": {"memory": "invertible"},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(device: torch.device, n: int = 2048, reps: int = 3, warmup: int = 1,
                       tf32: bool | None = None) -> float:
    """fp32 FLOP/s of an n x n matmul (best of `reps` after `warmup` untimed ones): the machine's attainable rate now;
    `tf32` True/False allows/forbids TF32 matmuls while it runs (CUDA), None leaves torch's setting."""
    before = torch.backends.cuda.matmul.allow_tf32
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        for _ in range(warmup):
            a @ b
        best = float("inf")
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def make_step(cfg: ModelConfig, batch: int, device: torch.device, seed: int = 0,
              runtime: RuntimeConfig | None = None) -> Callable[[], None]:
    """A closure running one training step of a fresh, ActNorm-initialized model on a fixed batch."""
    torch.manual_seed(seed)
    model = Glow(cfg, runtime).to(device)
    x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device) - 0.5
    model.initialize(x)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(x)
        loss = bits_per_dim_from_log_prob(out.log_prob, model.num_dims, cfg.n_bits).mean()
        optimizer.zero_grad()
        loss.backward()
        dist.clip_and_step(optimizer, model.parameters(), 50.0, loss=loss)

    return step


def count_step_flops(cfg: ModelConfig, batch: int, device: torch.device) -> int:
    """Convolution and matmul FLOPs of one forward + backward of the plain fp32 model."""
    torch.manual_seed(0)
    model = Glow(cfg, RuntimeConfig(channels_last="false")).to(device)
    x = torch.rand(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device) - 0.5
    model.initialize(x)
    counter = FlopCounterMode(display=False)
    with counter:
        model.log_prob(x).mean().backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (best and median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compile, oneDNN plans)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = REFERENCE
    flops = count_step_flops(cfg, args.batch, device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads on {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"model {cfg.image_size}x{cfg.image_size}x{cfg.channels} L={cfg.levels} K={cfg.steps} width {cfg.width} "
          f"{cfg.coupling} {cfg.invconv}, batch {args.batch}: {flops / 1e9:.1f} GFLOP per step (FlopCounterMode)")

    steps, warm_s = {}, {}
    for name in args.variants:
        step = make_step(cfg, args.batch, device, runtime=RuntimeConfig(**VARIANTS[name]))
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        steps[name], warm_s[name] = step, time.perf_counter() - start
        print(f"  built and warmed up {name} in {warm_s[name]:.1f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in steps}
    fractions: dict[str, list[float]] = {name: [] for name in steps}
    matmul_rates = []
    for r in range(args.rounds):
        matmul = matmul_flops_per_s(device)
        matmul_rates.append(matmul)
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            fractions[name].append(flops / elapsed / matmul)
        print(f"  round {r + 1}/{args.rounds}: matmul {matmul / 1e9:.1f} GFLOP/s, load {os.getloadavg()[0]:.1f}, "
              + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)

    base = min(times[args.variants[0]])
    best_mm, median_mm = max(matmul_rates) / 1e9, statistics.median(matmul_rates) / 1e9
    print(f"\nmatmul 2048x2048 fp32: best {best_mm:.1f}, median {median_mm:.1f} GFLOP/s over {args.rounds} rounds; "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print(f"| variant | step best (s) | step median (s) | images/s | GFLOP/s | fraction of matmul | "
          f"vs {args.variants[0]} | warm-up (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in steps:
        t = min(times[name])
        print(f"| {name} | {t:.2f} | {statistics.median(times[name]):.2f} | {args.batch / t:.1f} | "
              f"{flops / t / 1e9:.1f} | {max(fractions[name]):.2f} | {base / t:.2f}x | {warm_s[name]:.0f} |")


if __name__ == "__main__":
    main()

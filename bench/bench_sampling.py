"""Sampling time per image of the paper's 256x256 CelebA-HQ architecture; prints a table (CPU, and GPU if present).

    .venv/bin/python bench/bench_sampling.py                  # batch 1 and 4, one timed run each (3-4 min on 2 cores)
    .venv/bin/python bench/bench_sampling.py --batch-sizes 1 4 16 --repeats 3

The model is L=6, K=32, width 512, additive coupling, 5 bits, learned top prior (175M parameters) with fresh
weights (random 1x1 rotations, zero-initialized coupling outputs, as at the start of training): the cost of a pass
does not depend on the weights' values. After one warm-up run per device, each cell is the median of --repeats runs of
`glow_dist.inference.decoding.sample_images` (the code behind `glow-dist sample` and the trainer's grids) at
T=0.7, in eval mode under no_grad. The paper reports about 130 ms per 256x256 image on one 1080 Ti.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from glow_dist.config import ModelConfig
from glow_dist.inference.decoding import sample_images
from glow_dist.model import build_model

CELEBA_HQ = ModelConfig(image_size=256, channels=3, levels=6, steps=32, width=512, coupling="additive", n_bits=5,
                        learn_top=True)


def run_once(model: torch.nn.Module, device: torch.device, batch: int) -> float:
    """Seconds to sample `batch` images."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sample_images(model, batch, 0.7, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously; wait before stopping the clock
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per cell (median reported)")
    parser.add_argument("--no-cpu", action="store_true", help="GPU column only")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(CELEBA_HQ).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    devices = [] if args.no_cpu else [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        parser.error("--no-cpu leaves nothing to time: CUDA is not available")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads on {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}; "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"model: 256x256x3, L=6, K=32, width 512, additive, {params / 1e6:.0f}M parameters\n")
    results: dict[tuple[str, int], float] = {}
    for device in devices:
        model.to(device)
        # One warm-up per device (allocator, cuDNN/oneDNN plans, lazy init); on 2 cores a run per cell costs minutes.
        run_once(model, device, args.batch_sizes[0])
        for batch in args.batch_sizes:
            times = [run_once(model, device, batch) for _ in range(args.repeats)]
            results[device.type, batch] = statistics.median(times) / batch
            print(f"  {device.type} batch {batch}: {results[device.type, batch] * 1000:.0f} ms/image", flush=True)
    header = "| batch | " + " | ".join(f"{d.type.upper()} ms/image" for d in devices) + " |"
    print("\n" + header + "\n|---|" + "---|" * len(devices))
    for batch in args.batch_sizes:
        cells = " | ".join(f"{results[d.type, batch] * 1000:.0f}" for d in devices)
        print(f"| {batch} | {cells} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

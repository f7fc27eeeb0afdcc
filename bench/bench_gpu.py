"""GPU speed of the training step (issues 13, 25): one command on any CUDA machine; on a CPU, the launch proxy.

    .venv/bin/python bench/bench_gpu.py                          # CUDA: every table + bench_gpu.json
    .venv/bin/python bench/bench_gpu.py --quick                  # CUDA: the paper configs as shipped, and a few rows
    .venv/bin/python bench/bench_gpu.py --variants eager graphed --archs cifar10 --batches 64 --configs
    .venv/bin/python bench/bench_gpu.py --cpu                    # ATen operators per training step, every variant

First the shipped paper configs (configs/cifar10, imagenet32, imagenet64, lsun, lsun_128, celeba_hq_256.yaml)
exactly as shipped: their architecture, per-rank batch and runtime (runtime.memory=checkpoint, step mode auto, i.e.
graphed on CUDA), each also with runtime.step_mode=eager (what the graph buys) and, without --quick, with
runtime.memory=auto (plain where the plan's estimate fits the GPU): ms/step, img/s, the step and memory modes that
ran, peak memory. --quick adds the architecture table below at one batch size for eager and graphed only, and
sampling at batch 1 and 8, so that it fits in a few minutes of a first GPU session.

Then, for the paper's CIFAR-10 (32x32, L=3, K=32, width 512, affine, 8-bit) and CelebA-HQ (256x256, L=6, K=32,
width 512, additive, 5-bit) architectures at several batch sizes and for each variant, it runs the trainer's own step
(`glow_dist.training.step.build_train_step`: dequantize, forward, bits/dim, backward, clip_and_step with Adamax, EMA)
and prints ms/step (median of the timed steps), img/s, achieved TFLOP/s (FLOPs of one forward + backward counted by
`torch.utils.flop_counter.FlopCounterMode`, convolutions and matmuls), its fraction of an 8192^2 fp32 matmul with
TF32 measured in the same run, and peak memory over the timed steps (the peak is reset after warm-up, so cuDNN's
autotuning trials do not count). Then sampling ms/image of the CelebA-HQ architecture at batch 1, 8 and 32 for each
decoding mode (`glow_dist.inference.decoding.Decoder`: eager, compiled, graphed), with the first call's time
(compile/capture). Everything goes to a JSON file too (--json). A variant that does not fit in memory prints OOM and
the run goes on.

On a CPU (or with --cpu) it prints, per variant, the ATen operators dispatched by one training step
(`opcount.OpCounter`): on a GPU nearly each is a kernel launch, the cost that made the step launch-bound
on an H100. The count depends on the architecture (levels, steps, coupling), not on width, batch or image size, so the
CPU run uses the CIFAR reference architecture of bench_train.py (L=3, K=8) at width 16, batch 4. Then the same count
for each paper config as shipped (its levels, steps, coupling and runtime, so checkpointing's recompute counts) at
width 16 and batch 1, and the operators of one sampling call, eager vs compiled, for the CelebA-HQ architecture
(L=6, K=32) at width 16 and 64x64.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
from bench_train import matmul_flops_per_s, sync
from opcount import OpCounter
from torch.utils.flop_counter import FlopCounterMode

from glow_dist.config import Config, ModelConfig, load_config
from glow_dist.inference.decoding import Decoder
from glow_dist.model import build_model, preprocess, resolved_runtime
from glow_dist.runtime import apply_tf32, device_memory_bytes
from glow_dist.training.ema import EMA
from glow_dist.training.optimizer import LearningRate, make_optimizer
from glow_dist.training.step import build_train_step, noise_generator

ARCHS: dict[str, tuple[ModelConfig, list[int]]] = {
    "cifar10": (ModelConfig(image_size=32, channels=3, levels=3, steps=32, width=512, coupling="affine",
                            n_bits=8), [64, 256]),
    "celeba_hq_256": (ModelConfig(image_size=256, channels=3, levels=6, steps=32, width=512, coupling="additive",
                                  n_bits=5), [4, 16]),
}
# The CPU launch proxy: bench_train.py's reference architecture (the 4,736-operator model), narrow.
CPU_ARCH = ModelConfig(image_size=32, channels=3, levels=3, steps=8, width=16, coupling="additive", n_bits=8)
# Sampling's launch proxy: the CelebA-HQ architecture (L=6, K=32, additive), narrow and at 64x64 (the smallest size
# six squeezes allow); the operators of a decode depend on levels and steps, not on width or size.
CPU_SAMPLE_ARCH = dataclasses.replace(ARCHS["celeba_hq_256"][0], image_size=64, width=16)

# The shipped paper configs, measured exactly as shipped (configs/NAME.yaml) and with the overrides of each variant.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = ("cifar10", "imagenet32", "imagenet64", "lsun", "lsun_128", "celeba_hq_256")
SHIPPED_VARIANTS: dict[str, list[str]] = {
    "as shipped": [],
    "eager": ["runtime.step_mode=eager"],
    "memory=auto": ["runtime.memory=auto"],
}

# name -> config overrides (on top of the device defaults: NCHW and fp32 on CUDA).
VARIANTS: dict[str, list[str]] = {
    "eager": ["runtime.step_mode=eager"],
    "compiled": ["runtime.step_mode=compiled"],
    "graphed": ["runtime.step_mode=graphed"],
    "graphed+bf16": ["runtime.step_mode=graphed", "runtime.autocast=bf16"],
    "bf16": ["runtime.step_mode=eager", "runtime.autocast=bf16"],
    "nhwc": ["runtime.step_mode=eager", "runtime.channels_last=true"],
    "checkpoint": ["runtime.step_mode=eager", "runtime.memory=checkpoint"],
    "invertible": ["runtime.step_mode=eager", "runtime.memory=invertible"],
}


def make_cfg(model: ModelConfig, overrides: list[str], batch: int) -> Config:
    """The architecture `model`, run as the variant's `runtime.*` overrides say."""
    cfg = load_config(None, [f"train.batch_size={batch}", "optim.warmup_steps=0", "optim.lr=1e-4", *overrides])
    cfg.model = model
    return cfg


class Setup:
    """A fresh model (ActNorm initialized), Adamax, EMA and the trainer's step for one configuration."""

    def __init__(self, cfg: Config, device: torch.device, log: list[str]):
        torch.manual_seed(0)
        m = cfg.model
        self.cfg, self.device = cfg, device
        # runtime.memory=auto resolved as the trainer does (one rank per GPU; on a CPU, the whole host)
        self.runtime, why = resolved_runtime(cfg.runtime, m, cfg.train.batch_size, device_memory_bytes(device))
        if why:
            log.append(f"[memory] {why}")
        self.model = build_model(m, self.runtime).to(device)
        shape = (cfg.train.batch_size, m.channels, m.image_size, m.image_size)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        self.labels = torch.zeros(shape[0], dtype=torch.long, device=device)
        self.model.initialize(preprocess(self.images, m.n_bits, generator=noise_generator(device, 0, -1, 0)),
                              self.labels if m.y_condition else None)
        self.optimizer = make_optimizer(cfg.optim, self.model)
        LearningRate(cfg.optim, world_size=1).apply(self.optimizer, step=0)
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        self.step = build_train_step(cfg, self.model, self.optimizer, self.ema, device=device, log=log.append)
        self.calls = 0

    def __call__(self) -> None:
        self.step(self.images, self.labels, step=self.calls)
        self.calls += 1


def tf32_matmul_flops(device: torch.device) -> float:
    """FLOP/s of an 8192^2 fp32 matmul with TF32 allowed (best of 10 after 3): the attainable dense rate now."""
    return matmul_flops_per_s(device, n=8192, reps=10, warmup=3, tf32=True)


def step_flops(model_cfg: ModelConfig, batch: int, device: torch.device) -> int:
    """Convolution and matmul FLOPs of one forward + backward of the plain fp32 model (what every variant does)."""
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)  # the default runtime: plain memory, fp32
    x = torch.rand(batch, model_cfg.channels, model_cfg.image_size, model_cfg.image_size, device=device) - 0.5
    counter = FlopCounterMode(display=False)
    with counter:
        model.log_prob(x).mean().backward()
    del model
    return counter.get_total_flops()


def time_variant(cfg: Config, device: torch.device, warmup: int, steps: int) -> dict:
    log: list[str] = []
    setup = Setup(cfg, device, log)
    start = time.perf_counter()
    for _ in range(warmup):  # compile, capture, cuDNN autotuning
        setup()
    sync(device)
    warm_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        setup()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device)
    return {"ms": 1e3 * statistics.median(times), "ms_best": 1e3 * min(times), "warmup_s": warm_s,
            "peak_gib": peak / 2**30, "mode": setup.step.mode, "memory": setup.runtime.memory,
            "tags": setup.step.run_tags(), "log": log}


def shipped_cfg(name: str, variant: str) -> Config:
    """configs/NAME.yaml exactly as shipped, plus the variant's overrides (none for "as shipped")."""
    return load_config(CONFIGS / f"{name}.yaml", SHIPPED_VARIANTS[variant])


def paper_configs(args: argparse.Namespace, device: torch.device, matmul: float) -> list[dict]:
    """The shipped paper configs, each as shipped and per variant: ms/step, img/s, modes that ran, peak memory."""
    rows = []
    variants = [v for v in args.shipped_variants if not (args.quick and v == "memory=auto")]
    for name in args.configs:
        shipped = load_config(CONFIGS / f"{name}.yaml")
        m, batch = shipped.model, shipped.train.batch_size
        flops = step_flops(m, batch, device)
        for variant in variants:
            row = {"config": name, "batch": batch, "variant": variant, "gflop_per_step": flops / 1e9}
            try:
                row.update(time_variant(shipped_cfg(name, variant), device, args.warmup, args.steps))
                row["img_s"] = batch / (row["ms"] / 1e3)
                row["fraction_of_tf32_matmul"] = flops / (row["ms"] / 1e3) / matmul
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"  {name} (batch {batch}) {variant}: " + (row.get("error") or
                  f"{row['ms']:.1f} ms, step {row['mode']}, memory {row['memory']}, {row['img_s']:.1f} img/s, "
                  f"peak {row['peak_gib']:.2f} GiB"), flush=True)
    print("\n| paper config (as shipped) | batch/rank | variant | step ran as | memory ran as | ms/step | img/s | "
          "fraction of TF32 matmul | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['batch']} | {r['variant']} | | | {r['error']} | | | |")
            continue
        print(f"| {r['config']} | {r['batch']} | {r['variant']} | {r['mode']} | {r['memory']} | {r['ms']:.1f} | "
              f"{r['img_s']:.1f} | {r['fraction_of_tf32_matmul']:.3f} | {r['peak_gib']:.2f} |")
    return rows


def sampling(device: torch.device, batches: list[int], repeats: int, modes: list[str]) -> list[dict]:
    """ms/image of `Decoder.sample` (the code of `glow-dist sample` and the trainer's grids) at T=0.7 for each mode,
    CelebA-HQ architecture at 256x256 (fresh weights: a pass costs the same whatever their values)."""
    cfg = ARCHS["celeba_hq_256"][0]
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval().requires_grad_(False)
    rows = []
    for batch in batches:
        for mode in modes:
            log: list[str] = []
            decoder = Decoder(model, mode, log=log.append)
            row = {"batch": batch, "mode": mode, "ms_per_image": None}
            try:
                start = time.perf_counter()
                decoder.sample(batch, 0.7, seed=0)  # warm-up: compile / capture, cuDNN autotuning
                sync(device)
                row["warmup_s"] = time.perf_counter() - start
                times = []
                for i in range(repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    decoder.sample(batch, 0.7, seed=i + 1)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                row["ms_per_image"] = 1e3 * statistics.median(times) / batch
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            row.update(ran_as=decoder.mode, log=log)   # the mode that ran: a fallback shows here
            del decoder
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"  sampling batch {batch} {mode}: {row}", flush=True)
    return rows


def sample_ops(arch: ModelConfig, batch: int, modes: list[str]) -> list[dict]:
    """ATen operators dispatched by one `Decoder.sample` call per mode, after a warm-up call (compilation)."""
    torch.manual_seed(0)
    model = build_model(arch).eval().requires_grad_(False)
    rows = []
    for mode in modes:
        log: list[str] = []
        decoder = Decoder(model, mode, log=log.append)
        start = time.perf_counter()
        decoder.sample(batch, 0.7, seed=0)
        warm = time.perf_counter() - start
        with OpCounter() as ops:
            decoder.sample(batch, 0.7, seed=1)
        rows.append({"mode": mode, "ran_as": decoder.mode, "ops": ops.total, "views": ops.views,
                     "top": ops.most_common(5), "warmup_s": warm, "log": log})
        print(f"  sampling {mode}: {ops.total} operators + {ops.views} views ({decoder.mode}; first call "
              f"{warm:.1f} s)", flush=True)
    return rows


def run_cuda(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    apply_tf32("auto", device)
    matmul = tf32_matmul_flops(device)
    name = torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {name}, TF32 matmul {matmul / 1e12:.0f} TFLOP/s (8192^2, same run)",
          flush=True)
    results = {"device": name, "torch": torch.__version__, "tf32_matmul_tflops": matmul / 1e12,
               "paper_configs": paper_configs(args, device, matmul), "train": [], "sampling": []}
    variants = [v for v in args.variants if v in ("eager", "graphed")] if args.quick else args.variants
    for arch in args.archs:
        model_cfg, batches = ARCHS[arch]
        for batch in (args.batches or (batches[:1] if args.quick else batches)):
            flops = step_flops(model_cfg, batch, device)
            for variant in variants:
                row = {"arch": arch, "batch": batch, "variant": variant, "gflop_per_step": flops / 1e9}
                try:
                    row.update(time_variant(make_cfg(model_cfg, VARIANTS[variant], batch), device,
                                            args.warmup, args.steps))
                    row["img_s"] = batch / (row["ms"] / 1e3)
                    row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
                    row["fraction_of_tf32_matmul"] = row["tflops"] * 1e12 / matmul
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                torch.cuda.empty_cache()
                results["train"].append(row)
                print(f"  {arch} batch {batch} {variant}: " + (row.get("error") or
                      f"{row['ms']:.1f} ms ({row['mode']}), {row['img_s']:.1f} img/s, {row['tflops']:.1f} TFLOP/s, "
                      f"peak {row['peak_gib']:.2f} GiB"), flush=True)
    print(f"\n{name}, torch {torch.__version__}, TF32 matmul {matmul / 1e12:.0f} TFLOP/s\n")
    print("| architecture | batch | variant | ran as | ms/step | img/s | TFLOP/s | fraction of TF32 matmul | "
          "peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["train"]:
        if "error" in r:
            print(f"| {r['arch']} | {r['batch']} | {r['variant']} | | {r['error']} | | | | |")
            continue
        print(f"| {r['arch']} | {r['batch']} | {r['variant']} | {r['mode']} | {r['ms']:.1f} | {r['img_s']:.1f} | "
              f"{r['tflops']:.1f} | {r['fraction_of_tf32_matmul']:.3f} | {r['peak_gib']:.2f} |")
    if not args.no_sampling:
        batches = args.sample_batches or ([1, 8] if args.quick else [1, 8, 32])
        results["sampling"] = sampling(device, batches, args.sample_repeats, args.sample_modes)
        print("\n| sampling CelebA-HQ 256x256 | batch | ran as | ms/image | first call s |")
        print("|---|---|---|---|---|")
        for r in results["sampling"]:
            ms = f"{r['ms_per_image']:.1f}" if r["ms_per_image"] is not None else r.get("error", "")
            warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else ""
            print(f"| {r['mode']} | {r['batch']} | {r['ran_as']} | {ms} | {warm} |")
    return results


def paper_config_ops(args: argparse.Namespace) -> list[dict]:
    """ATen operators of one training step of each paper config as shipped (levels, steps, coupling, runtime:
    checkpointing's recompute included) at width 16 and batch 1, on the CPU: the launches a GPU step would make."""
    if not args.configs:
        return []
    print(f"\npaper configs as shipped, width {args.cpu_width}, batch 1 (ATen operators per training step):",
          flush=True)
    rows = []
    for name in args.configs:
        cfg = load_config(CONFIGS / f"{name}.yaml", [f"model.width={args.cpu_width}", "train.batch_size=1"])
        log: list[str] = []
        setup = Setup(cfg, torch.device("cpu"), log)
        for _ in range(2):
            setup()
        with OpCounter() as ops:
            setup()
        m = cfg.model
        rows.append({"config": name, "arch": f"{m.image_size}x{m.image_size} L={m.levels} K={m.steps} {m.coupling}",
                     "memory": setup.runtime.memory, "mode": setup.step.mode, "ops": ops.total, "views": ops.views})
        print(f"  {name}: {ops.total} operators + {ops.views} views ({setup.step.mode}, memory "
              f"{setup.runtime.memory})", flush=True)
    print("\n| paper config (as shipped, width 16, batch 1) | architecture | memory | ran as (CPU) | "
          "ATen operators per step | + views |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['arch']} | {r['memory']} | {r['mode']} | {r['ops']} | {r['views']} |")
    return rows


def run_cpu(args: argparse.Namespace) -> dict:
    device = torch.device("cpu")
    m = dataclasses.replace(CPU_ARCH, width=args.cpu_width)
    print(f"torch {torch.__version__}, CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}); "
          f"architecture 32x32x3 L={m.levels} K={m.steps} {m.coupling} (width {m.width}, batch {args.cpu_batch}: "
          "operator counts do not depend on them)", flush=True)
    rows = []
    for variant in args.variants:
        log: list[str] = []
        setup = Setup(make_cfg(m, VARIANTS[variant], args.cpu_batch), device, log)
        for _ in range(2):  # compile, lazy optimizer state
            setup()
        with OpCounter() as ops:
            setup()
        rows.append({"variant": variant, "mode": setup.step.mode, "ops": ops.total, "views": ops.views,
                     "top": ops.most_common(5), "log": log})
        print(f"  {variant}: {ops.total} operators + {ops.views} views ({setup.step.mode})", flush=True)
    print("\n| variant | ran as (CPU) | ATen operators per step | + views | most frequent |")
    print("|---|---|---|---|---|")
    for r in rows:
        top = ", ".join(f"{n} {c}" for n, c in r["top"])
        print(f"| {r['variant']} | {r['mode']} | {r['ops']} | {r['views']} | {top} |")
    results = {"device": "cpu", "torch": torch.__version__, "ops": rows, "paper_config_ops": paper_config_ops(args),
               "sampling_ops": []}
    if not args.no_sampling:
        a = CPU_SAMPLE_ARCH
        print(f"\nsampling (Decoder.sample, T=0.7): CelebA-HQ architecture L={a.levels} K={a.steps} {a.coupling} at "
              f"{a.image_size}x{a.image_size}, width {a.width}, batch {args.cpu_batch}", flush=True)
        results["sampling_ops"] = sample_ops(a, args.cpu_batch, [m for m in args.sample_modes if m != "graphed"])
        print("\n| sampling mode | ran as (CPU) | ATen operators per call | + views | most frequent |")
        print("|---|---|---|---|---|")
        for r in results["sampling_ops"]:
            top = ", ".join(f"{n} {c}" for n, c in r["top"])
            print(f"| {r['mode']} | {r['ran_as']} | {r['ops']} | {r['views']} | {top} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batches", nargs="+", type=int, help="instead of each architecture's batch sizes")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compile, capture, cuDNN autotuning)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--configs", nargs="*", default=list(PAPER_CONFIGS), choices=list(PAPER_CONFIGS),
                        help="shipped paper configs to measure as shipped (none: skip that table)")
    parser.add_argument("--shipped-variants", nargs="+", default=list(SHIPPED_VARIANTS),
                        choices=list(SHIPPED_VARIANTS), help="variants of the shipped configs (CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="paper configs as shipped and eager; architectures at one batch size, eager and "
                             "graphed; sampling at batch 1 and 8")
    parser.add_argument("--no-sampling", action="store_true")
    parser.add_argument("--sample-batches", nargs="+", type=int, help="default 1 8 32 (--quick: 1 8)")
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--sample-modes", nargs="+", default=["eager", "compiled", "graphed"],
                        choices=["eager", "compiled", "graphed"], help="decoding modes of the sampling table")
    parser.add_argument("--cpu", action="store_true", help="operator counts on the CPU even where CUDA is present")
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--cpu-width", type=int, default=CPU_ARCH.width,
                        help="coupling width of the CPU training-step count (512: bench_train's reference model)")
    parser.add_argument("--json", default="bench_gpu.json", help="where to write the results")
    args = parser.parse_args()
    results = run_cpu(args) if args.cpu or not torch.cuda.is_available() else run_cuda(args)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""How long a stop takes for the paper's CelebA-HQ 256 config, and the grace periods that follow; prints tables.

    .venv/bin/python bench/bench_stop.py                       # 3 saves of the real 2.6 GiB state (about 1-2 min)
    .venv/bin/python bench/bench_stop.py --dir /shared/runs --repeats 5 --step-seconds 3

A stop (SIGTERM, SIGINT, SIGUSR1) costs: the step in flight (the vote comes with it), the checkpoint written by
glow_dist.checkpoint.save_checkpoint (torch.save to a temporary file, fsync, rename, sha256 read back, sidecar,
directory fsync), reading it back against its sha256 (Trainer._stop verifies before it reports the stop), closing the
MLflow run, and the process exit. This script builds the real state of configs/celeba_hq_256.yaml: the model's
weights, the EMA copy and Adamax's two moments (random values, so no filesystem compression can flatter the write),
plus the trainer's small entries; checks its size against `glow-dist plan`; then times save and verify on --dir.

The last table turns the measured worst case into the launch files' numbers: budget = step + save + verify +
MLflow + exit; the grace periods are about twice that, rounded up to 30 s, because a loaded shared filesystem can be
several times slower than one quiet run here.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from glow_dist.checkpoint import save_checkpoint, verify_checkpoint
from glow_dist.config import load_config
from glow_dist.model import build_model
from glow_dist.preflight.plan import make_plan
from glow_dist.training.ema import EMA
from glow_dist.training.optimizer import make_optimizer
from glow_dist.training.state import Position, TrainingState

REPO = Path(__file__).resolve().parents[1]


def celeba_state(config: Path) -> dict:
    """The trainer's checkpoint dict (TrainingState.checkpoint) for the config, at the full size."""
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = make_optimizer(cfg.optim, model)
    for p in model.parameters():  # the optimizer's state as after a step: both moments at full size
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                              "exp_inf": torch.rand_like(p)}
    state = TrainingState(cfg, model, optimizer, EMA(model, cfg.optim.ema_decay))
    state.position = Position(step=1000, epoch=1, batch_in_epoch=325)
    return state.checkpoint(run_id="0" * 32, world_size=40)


def disk_of(path: Path) -> str:
    out = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True).stdout.splitlines()
    if len(out) < 2:
        return "unknown"
    device, fstype, size, *_ = out[1].split()
    return f"{device} ({fstype}, {size})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "celeba_hq_256.yaml")
    parser.add_argument("--dir", type=Path, default=REPO / "runs", help="where to write (the run dir's disk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=5.0,
                        help="the step in flight when the signal comes (GPU step plus a data stall; assumed)")
    parser.add_argument("--mlflow-seconds", type=float, default=5.0,
                        help="closing the MLflow run: final metrics flush and status (one retry budget)")
    parser.add_argument("--exit-seconds", type=float, default=5.0,
                        help="loader workers, Horovod shutdown and interpreter exit")
    args = parser.parse_args()

    state = celeba_state(args.config)
    tensors = [t for part in ("model", "ema") for t in state[part].values()] + \
        [t for s in state["optimizer"]["state"].values() for t in s.values()]
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    plan = make_plan(load_config(args.config), 40, 27000)
    # plan.state_bytes counts weights, gradients, 2 moments, EMA (5 copies) and buffers; a checkpoint has no gradients.
    planned = plan.state_bytes - 4 * plan.parameters
    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_stop-", dir=args.dir))
    print(f"config {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}: "
          f"{plan.parameters / 1e6:.1f}M parameters; checkpoint tensors {state_bytes / 2**30:.2f} GiB "
          f"(glow-dist plan: {planned / 2**30:.2f} GiB)")
    print(f"disk: {disk_of(workdir)} at {workdir}; load average {os.getloadavg()[0]:.2f} "
          f"(1 min) on {os.cpu_count()} cores")
    rows = []
    try:
        for i in range(args.repeats):
            t0 = time.perf_counter()
            path = save_checkpoint(state, workdir, 1000 + i, keep=1)
            t1 = time.perf_counter()
            verify_checkpoint(path)
            t2 = time.perf_counter()
            rows.append((path.stat().st_size, t1 - t0, t2 - t1, os.getloadavg()[0]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print("\n| run | file | save (write, fsync, sha256, rename) | verify (sha256 read back) | MB/s written | load |")
    print("|---|---|---|---|---|---|")
    for i, (size, save, verify, load) in enumerate(rows, 1):
        print(f"| {i} | {size / 2**30:.2f} GiB | {save:.1f} s | {verify:.1f} s | {size / save / 1e6:.0f} | "
              f"{load:.1f} |")
    worst_save, worst_verify = max(r[1] for r in rows), max(r[2] for r in rows)
    budget = args.step_seconds + worst_save + worst_verify + args.mlflow_seconds + args.exit_seconds
    grace = 30 * math.ceil(2 * budget / 30)
    print(f"\n| part of a stop | seconds |\n|---|---|\n| step in flight (assumed, --step-seconds) | "
          f"{args.step_seconds:.0f} |\n| save, worst of {len(rows)} | {worst_save:.1f} |\n| verify, worst | "
          f"{worst_verify:.1f} |\n| MLflow run closed (assumed) | {args.mlflow_seconds:.0f} |\n"
          f"| exit (assumed) | {args.exit_seconds:.0f} |\n| **budget** | **{budget:.0f}** |")
    print(f"\n| setting | value | why |\n|---|---|---|\n"
          f"| Kubernetes terminationGracePeriodSeconds | {grace} | 2 x budget, rounded up to 30 s |\n"
          f"| Slurm --signal=B:USR1@LEAD | {max(grace, 300)} | the grace, at least 300 s (slow shared disks) |\n"
          f"| docker run --stop-timeout | {grace} | same as Kubernetes (docker's default is 10 s) |\n"
          f"| Slurm KillWait (scancel, preemption; cluster-wide, default 30 s) | "
          f"{'enough' if budget <= 30 else 'too short'} | the budget is {budget:.0f} s; if cut, the previous "
          "checkpoint is resumed |")


if __name__ == "__main__":
    main()

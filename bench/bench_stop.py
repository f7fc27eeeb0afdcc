"""Checkpoint speed for the paper's CelebA-HQ 256 state against the disk's own rate, the training stall of a
periodic checkpoint (sync vs async), the stop time, and the grace periods that follow; prints tables.

    .venv/bin/python bench/bench_stop.py                       # 3 repetitions on runs/ (a few minutes)
    .venv/bin/python bench/bench_stop.py --dir /shared/runs --repeats 5 --step-seconds 3
    .venv/bin/python bench/bench_stop.py --repeats 0 --read-back-pairs 8  # only the stop's read-back, disk vs cache

Everything is measured in one run on one directory, so the rows compare:
- disk: the same byte count written as `dd bs=16M conv=fsync` does (16 MiB writes of random bytes, then fsync);
- save: glow_dist.checkpoint.save_checkpoint (serialize, hash while writing, fsync, rename, sidecar, directory fsync);
- stall: the extra time of the training step that checkpoints (the CheckpointManager.save call after it), with
  train.async_checkpoint=false (the whole save) and true (a snapshot into host memory; the write goes on in the
  background), plus the time the following steps lost while that write ran;
- stop: signal to verified checkpoint (CheckpointManager.save_verified: write the stop step, read back from the disk
  against its sha256 as it is written: each block written back and dropped from the page cache before it is read),
  with no write in flight and with a periodic write just started (it is superseded: given up at its next block);
  and, side by side, the same stop whose read-back reads the page cache instead (glow-dist before issue 30, which
  compared memory with memory). `save` is the same write with no read-back at all.
The state is the real one of configs/celeba_hq_256.yaml: weights, EMA and Adamax's two moments with random values (no
filesystem compression can flatter the write), plus the trainer's small entries. The "step" is a fixed CPU job on one
thread (matrix products, about --step-seconds), standing for a GPU step that leaves the host's cores to the writer.

The last table turns the worst measured stop into the launch files' numbers: budget = step in flight + stop +
MLflow + exit; the grace periods are about twice that, rounded up to 30 s, because a loaded shared filesystem can be
several times slower than one quiet run here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from glow_dist import files
from glow_dist.checkpoint import save_checkpoint, state_nbytes, verify_checkpoint
from glow_dist.config import load_config
from glow_dist.model import build_model
from glow_dist.preflight.plan import make_plan
from glow_dist.tracking.reporter import NullReporter
from glow_dist.training.checkpoints import CheckpointManager
from glow_dist.training.ema import EMA
from glow_dist.training.optimizer import make_optimizer
from glow_dist.training.state import Position, TrainingState

REPO = Path(__file__).resolve().parents[1]


def celeba_state(config: Path, run_dir: Path, async_checkpoint: bool) -> TrainingState:
    """The trainer's state for the config at full size, optimizer moments as after a step, run_dir set."""
    cfg = load_config(config, [f"train.run_dir={run_dir}", "train.keep_checkpoints=1",
                               f"train.async_checkpoint={str(async_checkpoint).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = make_optimizer(cfg.optim, model)
    for p in model.parameters():  # the optimizer's state as after a step: both moments at full size
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                              "exp_inf": torch.rand_like(p)}
    state = TrainingState(cfg, model, optimizer, EMA(model, cfg.optim.ema_decay))
    state.position = Position(step=1000, epoch=1, batch_in_epoch=325)
    return state


def disk_of(path: Path) -> str:
    out = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True).stdout.splitlines()
    if len(out) < 2:
        return "unknown"
    device, fstype, size, *_ = out[1].split()
    return f"{device} ({fstype}, {size})"


def disk_write(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` as dd bs=16M conv=fsync does, from a block of random bytes."""
    block = os.urandom(16 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


class Step:
    """A fixed CPU job of about `seconds` on the calling thread (one core)."""

    def __init__(self, seconds: float) -> None:
        self.a, self.n = torch.randn(512, 512), 50
        self.n = max(1, round(seconds * 50 / self()))

    def __call__(self) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # the step's one core; the snapshot copy and the writer use the others
        t0 = time.perf_counter()
        for _ in range(self.n):
            self.a @ self.a
        seconds = time.perf_counter() - t0
        torch.set_num_threads(threads)
        return seconds


def stall(manager: CheckpointManager, step: Step, plain: float, at: int) -> tuple[float, float]:
    """(extra seconds of the step that checkpoints, extra seconds of the steps after it until its write is done).
    The extra time of the checkpointing step is the save call after its compute (timing the step as a whole would
    add the step's own noise on a shared machine)."""
    report = NullReporter()
    step()
    t0 = time.perf_counter()
    manager.save(at, report, 40)
    extra = time.perf_counter() - t0
    lost = 0.0
    while manager._in_flight is not None and not manager._in_flight[0].done():
        lost += step() - plain
    manager.wait(report)
    return extra, lost


def storage_reads() -> int:
    """Bytes this process has had fetched from the storage layer, not the page cache (0 where Linux does not say)."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("read_bytes:")), 0)


def stop(manager: CheckpointManager, at: int, in_flight: bool, from_disk: bool = True) -> float:
    """Seconds of the stop checkpoint; `from_disk` false: its read-back reads the page cache (before issue 30)."""
    report = NullReporter()
    if in_flight:
        manager.save(at - 1, report, 40)
    files.READ_BACK_FROM_DISK = from_disk
    try:
        t0 = time.perf_counter()
        manager.save_verified(at, report, 40)
        return time.perf_counter() - t0
    finally:
        files.READ_BACK_FROM_DISK = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "celeba_hq_256.yaml")
    parser.add_argument("--dir", type=Path, default=REPO / "runs", help="where to write (the run dir's disk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=2.0, help="the simulated training step")
    parser.add_argument("--stop-step-seconds", type=float, default=5.0,
                        help="the step in flight when the signal comes (GPU step plus a data stall; assumed)")
    parser.add_argument("--mlflow-seconds", type=float, default=5.0,
                        help="closing the MLflow run: final metrics flush and status (one retry budget)")
    parser.add_argument("--exit-seconds", type=float, default=5.0,
                        help="loader workers, Horovod shutdown and interpreter exit")
    parser.add_argument("--read-back-pairs", type=int, default=0,
                        help="then this many pairs of stops, read-back from the disk and from the cache, in turns "
                             "first; the differences within a pair are what a loaded machine leaves comparable")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_stop-", dir=args.dir))
    state = celeba_state(args.config, workdir, async_checkpoint=True)
    sync_cfg = dataclasses.replace(state.cfg, train=dataclasses.replace(state.cfg.train, async_checkpoint=False))
    sync, background = CheckpointManager(sync_cfg, state, main=True), CheckpointManager(state.cfg, state, main=True)
    checkpoint = state.checkpoint(run_id="0" * 32, world_size=40)
    nbytes = state_nbytes(checkpoint)
    plan = make_plan(load_config(args.config), 40, 27000)
    print(f"config {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}: "
          f"{plan.parameters / 1e6:.1f}M parameters; checkpoint tensors {nbytes / 2**30:.2f} GiB "
          f"(glow-dist plan: {plan.checkpoint_bytes / 2**30:.2f} GiB)")
    print(f"disk: {disk_of(workdir)} at {workdir}; load average {os.getloadavg()[0]:.2f} "
          f"(1 min) on {os.cpu_count()} cores")
    step = Step(args.step_seconds)
    rows: list[tuple] = []
    pairs: list[tuple[float, int, float, int, float]] = []
    try:
        background.save(1, NullReporter(), 40)   # the first snapshot allocates its host buffers: not measured
        background.wait(NullReporter())
        for i in range(args.repeats):
            load = os.getloadavg()[0]
            plain = statistics.median(step() for _ in range(3))
            disk = disk_write(workdir / "dd.bin", nbytes)
            t0 = time.perf_counter()
            path = save_checkpoint(checkpoint, workdir, 10 * i + 2, keep=1)
            save = time.perf_counter() - t0
            t0 = time.perf_counter()
            verify_checkpoint(path)
            verify = time.perf_counter() - t0
            size = path.stat().st_size
            sync_extra, _ = stall(sync, step, plain, 10 * i + 4)
            async_extra, async_lost = stall(background, step, plain, 10 * i + 5)
            # the two read-backs one after the other, in turns first, so neither always meets a warmer machine
            if i % 2:
                stop_cache = stop(background, 10 * i + 6, in_flight=False, from_disk=False)
            stop_idle = stop(background, 10 * i + 7, in_flight=False)
            if not i % 2:
                stop_cache = stop(background, 10 * i + 8, in_flight=False, from_disk=False)
            stop_busy = stop(background, 10 * i + 9, in_flight=True)
            rows.append((size, disk, save, verify, plain, sync_extra, async_extra, async_lost,
                         stop_idle, stop_busy, load, stop_cache))
            print(f"repeat {i + 1}: disk {disk:.1f} s, save {save:.1f} s, stop {stop_idle:.1f} s (read-back from the "
                  f"cache {stop_cache:.1f} s)", flush=True)
        for i in range(args.read_back_pairs):
            load = os.getloadavg()[0]
            timed = {}
            for k, from_disk in enumerate((not i % 2, bool(i % 2))):   # in turns first
                before = storage_reads()
                seconds = stop(background, 1000 + 2 * i + k, in_flight=False, from_disk=from_disk)
                timed[from_disk] = seconds, storage_reads() - before
            pairs.append((*timed[True], *timed[False], load))
            print(f"pair {i + 1}: read-back from the disk {timed[True][0]:.1f} s, from the cache "
                  f"{timed[False][0]:.1f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if rows:
        report(rows, args)
    if pairs:
        report_pairs(pairs)


def report_pairs(pairs: list[tuple[float, int, float, int, float]]) -> None:
    """Stops side by side: (seconds, bytes fetched from the storage layer) with the read-back from the disk, the same
    from the cache, and the load."""
    print("\n| pair | stop, read-back from the disk | read from the disk | stop, read-back from the cache | read from "
          "the disk | difference | load |\n|---|---|---|---|---|---|---|")
    for i, (disk, disk_read, cache, cache_read, load) in enumerate(pairs, 1):
        print(f"| {i} | {disk:.2f} s | {disk_read / 1e9:.2f} GB | {cache:.2f} s | {cache_read / 1e9:.2f} GB | "
              f"{disk - cache:+.2f} s | {load:.1f} |")
    med = [statistics.median(p[k] for p in pairs) for k in range(5)]
    print(f"| median | {med[0]:.2f} s | {med[1] / 1e9:.2f} GB | {med[2]:.2f} s | {med[3] / 1e9:.2f} GB | "
          f"{statistics.median(p[0] - p[2] for p in pairs):+.2f} s | {med[4]:.1f} |")


def report(rows: list[tuple], args: argparse.Namespace) -> None:
    print("\n| run | file | disk (dd-like, fsync) | save | save / disk | MB/s | verify (read back) | step | "
          "stall sync | stall async | async: later steps lost | stop | stop / disk | stop, write in flight | "
          "stop, read-back from the cache | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (size, disk, save, verify, plain, sync_x, async_x, lost, stop_i, stop_b, load, stop_c) in \
            enumerate(rows, 1):
        print(f"| {i} | {size / 2**30:.2f} GiB | {disk:.2f} s | {save:.2f} s | {save / disk:.2f}x | "
              f"{size / save / 1e6:.0f} | {verify:.2f} s | {plain:.2f} s | {sync_x:.2f} s | {async_x:.2f} s | "
              f"{lost:.2f} s | {stop_i:.2f} s | {stop_i / disk:.2f}x | {stop_b:.2f} s | {stop_c:.2f} s | {load:.1f} |")
    med = [statistics.median(r[k] for r in rows) for k in range(len(rows[0]))]
    print(f"| median | | {med[1]:.2f} s | {med[2]:.2f} s | {med[2] / med[1]:.2f}x | {med[0] / med[2] / 1e6:.0f} | "
          f"{med[3]:.2f} s | {med[4]:.2f} s | {med[5]:.2f} s | {med[6]:.2f} s | {med[7]:.2f} s | {med[8]:.2f} s | "
          f"{med[8] / med[1]:.2f}x | {med[9]:.2f} s | {med[11]:.2f} s | {med[10]:.1f} |")
    worst_stop = max(max(r[8], r[9]) for r in rows)
    budget = args.stop_step_seconds + worst_stop + args.mlflow_seconds + args.exit_seconds
    grace = 30 * math.ceil(2 * budget / 30)
    print(f"\n| part of a stop | seconds |\n|---|---|\n| step in flight (assumed, --stop-step-seconds) | "
          f"{args.stop_step_seconds:.0f} |\n| stop checkpoint (written and verified), worst of {len(rows)} runs "
          f"with and without a periodic write in flight | {worst_stop:.1f} |\n| MLflow run closed (assumed) | "
          f"{args.mlflow_seconds:.0f} |\n| exit (assumed) | {args.exit_seconds:.0f} |\n"
          f"| **budget** | **{budget:.0f}** |")
    print(f"\n| setting | value | why |\n|---|---|---|\n"
          f"| Kubernetes terminationGracePeriodSeconds | {grace} | 2 x budget, rounded up to 30 s |\n"
          f"| Slurm --signal=B:USR1@LEAD | {max(grace, 300)} | the grace, at least 300 s (slow shared disks) |\n"
          f"| docker run --stop-timeout | {grace} | same as Kubernetes (docker's default is 10 s) |\n"
          f"| Slurm KillWait (scancel, preemption; cluster-wide, default 30 s) | "
          f"{'enough' if budget <= 30 else 'too short'} | the budget is {budget:.0f} s; if cut, the previous "
          "checkpoint is resumed |")


if __name__ == "__main__":
    main()

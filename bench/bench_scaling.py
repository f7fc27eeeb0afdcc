"""Horovod scaling on this machine: `horovodrun -np 1` vs `-np 2`, one thread per rank, same per-rank batch.

    .venv/bin/python bench/bench_scaling.py                       # reference model, batch 16/rank, 4 timed steps
    .venv/bin/python bench/bench_scaling.py --nps 1 2 --repeats 3 --batch 8

Each run launches bench/scaling_worker.py under `horovodrun --gloo` (the trainer's step with the real
glow_dist.distributed.gateway helpers on synthetic data). Runs alternate between the world sizes (`--repeats`
times each) so that load from elsewhere hits all of them; the median images/s is reported. Speedup is images/s
over np=1's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from glow_dist.config import choices

WORKER = Path(__file__).with_name("scaling_worker.py")


def run(np: int, args: argparse.Namespace) -> dict:
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).with_name("horovodrun"))
    cmd = [horovodrun, "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, str(WORKER),
           "--batch", str(args.batch), "--steps", str(args.steps), "--width", str(args.width),
           "--depth", str(args.depth), "--background-priority", args.background_priority] + (
               ["--fp16-allreduce"] if args.fp16_allreduce else []) + (["--spin-waits"] if args.spin_waits else [])
    # One thread per rank, also for any OpenMP/MKL pool started before torch.set_num_threads.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    if args.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{args.cycle_time_ms:g}"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if '"images_per_s"' in line]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][lines[-1].index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--fp16-allreduce", action="store_true", help="gradients cross the wire as fp16")
    parser.add_argument("--cycle-time-ms", type=float, default=None,
                        help="HOROVOD_CYCLE_TIME for the runs (default: Horovod's, 1 ms)")
    parser.add_argument("--spin-waits", action="store_true",
                        help="wait for collectives by spinning, as Horovod's synchronize() does (the old behaviour)")
    parser.add_argument("--background-priority", choices=choices("dist.background_priority"), default="auto",
                        help="dist.init's priority for Horovod's threads (auto: low on CPU ranks)")
    args = parser.parse_args()
    cycle = "Horovod's default" if args.cycle_time_ms is None else f"{args.cycle_time_ms:g} ms"
    print(f"HOROVOD_CYCLE_TIME {cycle}, background priority {args.background_priority}, "
          f"{'spinning' if args.spin_waits else 'sleeping'} waits; "
          f"32x32x3 L=3 K={args.depth} width {args.width} additive LU, batch {args.batch} per rank, 1 thread per "
          f"rank, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[int, list[dict]] = {np: [] for np in args.nps}
    for r in range(args.repeats):
        for np in args.nps:
            results[np].append(run(np, args))
            res = results[np][-1]
            print(f"  repeat {r + 1}: np={np} {res['images_per_s']:.2f} img/s (step {res['step_s']:.2f} s), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    base = statistics.median(res["images_per_s"] for res in results[args.nps[0]])
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
    print(f"| ranks | images/s | step (s) | speedup vs np={args.nps[0]} | efficiency |")
    print("|---|---|---|---|---|")
    for np in args.nps:
        ips = statistics.median(res["images_per_s"] for res in results[np])
        step = statistics.median(res["step_s"] for res in results[np])
        print(f"| {np} | {ips:.2f} | {step:.2f} | {ips / base:.2f}x | {ips / base / (np / args.nps[0]):.0%} |")


if __name__ == "__main__":
    main()

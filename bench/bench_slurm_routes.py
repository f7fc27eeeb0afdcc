"""Time to the first step for each launch route of the sbatch script (LAUNCHER=srun, srun-mpi, ssh) on the local
two-node Slurm cluster (launch/slurm/local-cluster.sh, started with sshd so that all three routes can run); prints a
table for BENCHMARKS.md ("Slurm launch routes").

    flock /tmp/glow-dist-engines.lock .venv/bin/python bench/bench_slurm_routes.py    # root; about 4 minutes

Each round submits the same job once per route, one after the other (2 nodes x 1 rank of the debug config,
train.log_every=1): from the job's start (Slurm's StartTime, 1 s resolution) to the first step in metrics.jsonl,
and to the job's end. srun-mpi needs a Horovod built with MPI in --mpi-venv (make horovod-mpi); it is left out
without one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "launch" / "slurm" / "local-cluster.sh"


def sh(cmd: list[str], env: dict | None = None, **kw) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=REPO, **kw).stdout


def job_info(env: dict, job_id: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", sh(["scontrol", "show", "job", "-o", job_id], env)))


def epoch(slurm_time: str) -> float:
    return datetime.fromisoformat(slurm_time).timestamp()   # local time, as Slurm prints it


def run_job(env: dict, root: Path, route: str, bin_dir: Path, shards: Path, uri: str, steps: int) -> dict:
    job_dir = Path(tempfile.mkdtemp(prefix=f"{route}-", dir=root))
    exports = {"GPUS_PER_NODE": "1", "NIC": "gd0", "SSH_PORT": "2222", "CONFIG": "configs/debug.yaml",
               "DATA": str(shards), "RUN_DIR": str(job_dir / "run"), "HOSTFILE": str(job_dir / "hostfile"),
               "MLFLOW_TRACKING_URI": uri, "LAUNCHER": route, "BIN": str(bin_dir)}
    out = sh(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe",
              "--partition=high", f"--output={job_dir / 'job.out'}", "launch/slurm/celeba_hq_256.sbatch",
              f"train.steps={steps}", "train.log_every=1", "train.eval_every=0", "train.sample_every=0",
              "train.checkpoint_every=0", "train.progress=false", "train.threads=1", "train.max_eval_batches=1",
              "tracking.log_checkpoints=false", f"tracking.experiment=routes-{route}"], {**env, **exports})
    job_id = out.strip().split(";")[0]
    deadline = time.time() + 600
    while (info := job_info(env, job_id))["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        if time.time() > deadline:
            sh(["scancel", job_id], env)
            raise SystemExit(f"{route}: job {job_id} still {info['JobState']} after 600 s")
        time.sleep(1)
    metrics = job_dir / "run" / "metrics.jsonl"
    stamps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    first = min((m["time_ms"] for m in stamps if "bits_per_dim/train" in m["metrics"]), default=None)
    start, end = epoch(info["StartTime"]), epoch(info["EndTime"])
    return {"route": route, "job": job_id, "state": info["JobState"],
            "first_step_s": None if first is None else first / 1000 - start, "job_s": end - start,
            "log": (job_dir / "job.out").read_text()[-2000:]}


def span(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})" if xs else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--routes", default="srun,srun-mpi,ssh")
    parser.add_argument("--mpi-venv", type=Path, default=REPO / ".venv-mpi")
    args = parser.parse_args()
    bins = {"srun": Path(sys.executable).parent, "ssh": Path(sys.executable).parent, "srun-mpi": args.mpi_venv / "bin"}
    routes = args.routes.split(",")
    if "srun-mpi" in routes and not (args.mpi_venv / "bin" / "python").exists():
        print(f"srun-mpi left out: no venv at {args.mpi_venv} (make horovod-mpi)")
        routes.remove("srun-mpi")
    root = Path(tempfile.mkdtemp(prefix="bench-slurm-routes-"))
    cluster_dir = root / "cluster"
    shards = root / "digits"
    sh([sys.executable, "-m", "glow_dist", "prepare", "digits", "--out", str(shards), "--shard-size", "500"])
    load = os.getloadavg()[0]
    sh(["bash", str(CLUSTER), "start", str(cluster_dir)], timeout=900)
    env = {**os.environ, "SLURM_CONF": str(cluster_dir / "slurm.conf"),
           "PATH": f"{cluster_dir / 'hosts' / 'bin'}:{bins['srun']}:{os.environ['PATH']}"}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    rows = []
    try:
        for _ in range(args.rounds):
            for route in routes:
                row = run_job(env, root, route, bins[route], shards, uri, args.steps)
                if row["state"] != "COMPLETED":
                    print(f"{route}: job {row['job']} {row['state']}\n{row['log']}", file=sys.stderr)
                rows.append(row)
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(cluster_dir)], capture_output=True, timeout=300)
    print(f"\nlocal Slurm cluster, 2 nodes x 1 rank, configs/debug.yaml, {args.steps} steps; load average at start "
          f"{load:.1f} (1 min), {os.cpu_count()} CPUs\n")
    print("| LAUNCHER | job start -> first step (s) | job start -> end (s) | runs | final states |")
    print("|---|---|---|---|---|")
    for route in routes:
        mine = [r for r in rows if r["route"] == route]
        firsts = [r["first_step_s"] for r in mine if r["first_step_s"] is not None]
        print(f"| {route} | {span(firsts)} | {span([r['job_s'] for r in mine])} | {len(mine)} | "
              f"{', '.join(sorted({r['state'] for r in mine}))} |")


if __name__ == "__main__":
    main()

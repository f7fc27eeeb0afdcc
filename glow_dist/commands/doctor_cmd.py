"""Check a machine (or every rank of a job) before training on it: one PASS/FAIL/SKIP line per check.

  glow-dist doctor                                   # this node, default config
  glow-dist doctor --config configs/celeba_hq_256.yaml --data /data/celeba_hq_256
  horovodrun -np 8 -H node1:4,node2:4 glow-dist doctor --config configs/celeba_hq_256.yaml

Checks torch/CUDA, GPUs and memory, cuDNN/TF32, Horovod's build (Gloo/MPI/NCCL), DALI with a real decode of a tiny
JPEG batch (on the GPU when there is one), webdataset, the MLflow tracking URI the config uses, and with --data the
manifest and one sample of every split. Under horovodrun every rank checks itself and an all-reduce runs across all.
Exit status 1 when any check on any rank FAILs (something this config needs is missing or broken), else 0.
"""
from __future__ import annotations

import argparse
import sys

from glow_dist.commands import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", help="data folder or URL to check (manifest, one sample per split; "
                                       "a URL fills this node's cache); "
                                       "default: none (data.root is not checked unless given here)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the tracking server")


def run(args: argparse.Namespace) -> int:
    from glow_dist.config import Config, load_config
    from glow_dist.preflight import doctor

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else Config()
    prefix = doctor.rank_prefix()

    def report(check: doctor.Check) -> None:
        print(check.line(prefix), flush=True)

    checks = doctor.run_checks(cfg, args.data, check_shape=bool(args.config), timeout=args.timeout, report=report)
    failed = sum(c.status == doctor.FAIL for c in checks)
    allreduce = next(c for c in checks if c.name == "allreduce")
    if allreduce.status == doctor.PASS:  # Horovod works: every rank learns how many failed anywhere
        import torch

        from glow_dist.distributed import gateway as dist

        counts = dist.allreduce_sum(torch.tensor([float(failed), 1.0]), name="doctor.failures")
        total, ranks = int(counts[0].item()), int(counts[1].item())
        if dist.is_main():
            print(f"doctor: {ranks} ranks checked, {total} failure(s)", flush=True)
        return 1 if total else 0
    print(f"{prefix}doctor: {failed} failure(s)", file=sys.stderr if failed else sys.stdout, flush=True)
    return 1 if failed else 0

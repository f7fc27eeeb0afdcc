"""Train Glow on WebDataset shards. Run it as one process, or under horovodrun for many:

  glow-dist train --config configs/debug.yaml data.root=data/digits
  horovodrun -np 2 -H localhost:2 --gloo glow-dist train --config configs/digits.yaml
  horovodrun -np 40 --hostfile launch/hostfile.example glow-dist train --config configs/celeba_hq_256.yaml

train.resume=auto (the default) continues from the newest checkpoint in train.run_dir and the same MLflow run.
SIGTERM, SIGINT or SIGUSR1 stops every rank after the same step with a checkpoint; the exit status is then
train.stop_exit_code on rank 0 (0 by default; the Slurm and Kubernetes launch files use 75, "stopped, run me
again") and 0 on the other ranks. A lost or hung peer (a rank or host gone silent, or no step for
dist.hang_timeout seconds) ends every rank with one line and exit status 69: the same command resumes.
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=True)


def run(args: argparse.Namespace) -> int:
    from glow_dist.config import load_config
    from glow_dist.distributed import gateway as dist
    from glow_dist.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    # Rank 0, which wrote the checkpoint, speaks for the job. The others exit 0: horovodrun kills every rank 5 s
    # after one exits non-zero, which would cut rank 0's checkpoint short.
    return cfg.train.stop_exit_code if result.get("stopped") and dist.is_main() else 0

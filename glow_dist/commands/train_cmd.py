"""Train Glow on WebDataset shards. Run it as one process, or under horovodrun for many:

  glow-dist train --config configs/debug.yaml data.root=data/digits
  horovodrun -np 2 -H localhost:2 --gloo glow-dist train --config configs/digits.yaml
  horovodrun -np 40 --hostfile launch/hostfile.example glow-dist train --config configs/celeba_hq_256.yaml

train.resume=auto (the default) continues from the newest checkpoint in train.run_dir and the same MLflow run.
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=True)


def run(args: argparse.Namespace) -> int:
    from glow_dist.config import load_config
    from glow_dist.train import train

    train(load_config(args.config, args.overrides))
    return 0

"""Plan a run before it starts: parameters, FLOPs per image, activation memory per rank, global batch, steps per
epoch. The model is built on the meta device, so this runs anywhere in seconds, without a GPU.

    glow-dist plan --config configs/celeba_hq_256.yaml --np 40
    glow-dist plan --config configs/cifar10.yaml --np 8 --dataset-size 50000
    glow-dist plan --config configs/digits.yaml --np 2 train.batch_size=64 --json
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=True)
    parser.add_argument("--np", type=int, default=1, help="number of ranks (GPUs) the run will use (default 1)")
    parser.add_argument("--dataset-size", type=int,
                        help="training images, for steps per epoch (default: data.root's manifest.json)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from glow_dist.config import ConfigError, load_config

    if args.np < 1:
        raise ConfigError(f"--np must be at least 1, got {args.np}")
    if args.dataset_size is not None and args.dataset_size < 1:
        raise ConfigError(f"--dataset-size must be at least 1, got {args.dataset_size}")
    from glow_dist.preflight.plan import format_plan, make_plan, plan_json  # torch: only once the arguments are good
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.np, args.dataset_size)
    print(plan_json(plan) if args.json else format_plan(plan, cfg, f"glow-dist plan: {args.config} on {args.np} ranks"))
    return 0

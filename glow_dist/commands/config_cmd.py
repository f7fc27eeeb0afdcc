"""Print the resolved config: dataclass defaults, then the YAML file, then `section.key=value` overrides."""
from __future__ import annotations

import argparse

from glow_dist.commands import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", help="also write the resolved YAML to this file")


def run(args: argparse.Namespace) -> int:
    from glow_dist.config import dump_yaml, load_config, save_config

    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg), end="")
    if args.out:
        save_config(cfg, args.out)
    return 0

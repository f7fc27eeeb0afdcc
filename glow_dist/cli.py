"""`glow-dist` command line: one subcommand per module, each exposing `add_arguments(parser)` and `run(args)`.

Command modules keep heavy imports (torch, DALI, MLflow) inside `run`, so `glow-dist --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("glow_dist.commands.config_cmd", "print the resolved config (defaults + YAML + overrides)"),
    "prepare": ("glow_dist.data.prepare", "write a data set (digits, image folder, CIFAR-10) as WebDataset shards"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glow-dist",
        description="Distributed training of Glow flows on WebDataset shards (Horovod, DALI, MLflow).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from glow_dist.config import ConfigError

    try:
        return int(args._module.run(args) or 0)
    except ConfigError as e:
        print(f"glow-dist {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

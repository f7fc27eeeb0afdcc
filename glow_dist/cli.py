"""`glow-dist` command line: one subcommand per module, each exposing `add_arguments(parser)` and `run(args)`.

Command modules keep heavy imports (torch, DALI, MLflow) inside `run`, so `glow-dist --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from glow_dist.failures import JobFailure, announce

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("glow_dist.commands.config_cmd", "print the resolved config (defaults + YAML + overrides)"),
    "train": ("glow_dist.commands.train_cmd", "train on shards (one process, or many under horovodrun)"),
    "evaluate": ("glow_dist.commands.evaluate_cmd", "test-set bits/dim of a checkpoint (and baselines)"),
    "prepare": ("glow_dist.commands.prepare_cmd", "write a data set (digits, image folder, CIFAR-10) as WebDataset "
                                                  "shards"),
    "doctor": ("glow_dist.commands.doctor_cmd", "check this node (or every rank) before training: GPUs, Horovod, "
                                                "DALI, MLflow, data"),
    "plan": ("glow_dist.commands.plan_cmd", "parameters, FLOPs, memory and steps per epoch of a config, on no GPU"),
    "sample": ("glow_dist.commands.sample_cmd", "grid of samples from a checkpoint, one row per temperature"),
    "encode": ("glow_dist.commands.encode_cmd", "images -> latents (.npz), exactly invertible"),
    "decode": ("glow_dist.commands.decode_cmd", "latents (.npz) -> images"),
    "interpolate": ("glow_dist.commands.interpolate_cmd", "strip of decoded points between two images' latents"),
    "manipulate": ("glow_dist.commands.manipulate_cmd", "move images along an attribute direction in latent space"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glow-dist",
        description="Distributed training of Glow flows on WebDataset shards (Horovod, DALI, MLflow).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # keep the docstring's examples
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from glow_dist.distributed.credentials import CredentialsError, receive

    try:
        receive()   # under glow-dist-horovodrun: the secrets it kept off the command line, before anything reads them
    except CredentialsError as e:
        print(f"glow-dist: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except JobFailure as e:
        # A fault that ended the job (a lost peer): its one line, on the one rank that speaks for the job.
        announce(e, args.command)
        if e.exit_now:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.status)
        return e.status
    except Exception as e:
        found = _user_error_kind(e)
        if found is None:
            raise
        # A problem the user can fix: one clear line naming it, no traceback; once per job when every rank met it.
        kind, status = found
        if not (getattr(e, "everywhere", False) and _launched_rank() > 0):
            print(f"glow-dist {args.command}: {kind} error: {e}", file=sys.stderr)
        return status


def _launched_rank() -> int:
    """This process's rank as its launcher set it (horovodrun/Gloo, mpirun); 0 when not launched as a rank. Read from
    the environment: an error may come before (or instead of) Horovod's start."""
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


EX_IOERR = 74   # sysexits.h: a checkpoint could not be written (disk full, I/O error); distinct from a stop (75)
# and from a lost peer (EX_PEER_LOST, 69: glow_dist/failures.py)


def _user_error_kind(error: Exception) -> tuple[str, int] | None:
    """(kind, exit status) of an error the user can fix: 2 for wrong input, EX_IOERR when the disk refused a
    write; None for a bug (the traceback is shown)."""
    from glow_dist.checkpoint import CheckpointError, CheckpointWriteError
    from glow_dist.config import ConfigError
    from glow_dist.data import DataError
    from glow_dist.inference.latents import LatentError
    from glow_dist.mlflow_auth import TrackingAuthError

    kinds = {CheckpointWriteError: ("disk", EX_IOERR), ConfigError: ("config", 2), CheckpointError: ("checkpoint", 2),
             DataError: ("data", 2), LatentError: ("input", 2), TrackingAuthError: ("tracking", 2)}
    return next((found for cls, found in kinds.items() if isinstance(error, cls)), None)


if __name__ == "__main__":
    sys.exit(main())

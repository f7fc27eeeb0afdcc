"""Sample a grid of images from a checkpoint's EMA weights, one row per temperature:

  glow-dist sample --checkpoint runs/celeba --n 64 --temperature 0.7 --out grid.png        # an 8x8 grid
  glow-dist sample --checkpoint runs/digits --n 16 --temperature 0,0.5,0.7,1 --out rows.png
  glow-dist sample --checkpoint runs/cifar --n 16 --label 3 --out cats.png                 # class-conditional

It runs the code of the trainer's MLflow sample grids (glow_dist.inference.decoding), with the same fixed seed.
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_checkpoint_argument, add_decode_mode_argument, tracking_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--n", type=int, default=64, help="images per temperature")
    parser.add_argument("--temperature", default="0.7", help="one temperature, or several comma-separated: a row each")
    parser.add_argument("--label", type=int, help="class to sample (class-conditional models only)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the prior draws")
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded at once")
    add_decode_mode_argument(parser)
    parser.add_argument("--scale", type=int, help="enlarge tiles by this factor (default: up to 64 pixels)")
    parser.add_argument("--out", required=True, help="PNG file to write")


def parse_floats(text: str, what: str) -> list[float]:
    from glow_dist.inference.latents import LatentError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LatentError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise LatentError(f"{what} needs at least one value")
    return values


def run(args: argparse.Namespace) -> int:
    import torch

    from glow_dist.inference.decoding import Decoder, display_scale, grid_columns, save_png, temperature_grid
    from glow_dist.inference.latents import LatentError, check_label
    from glow_dist.inference.loading import load_model

    temperatures = parse_floats(args.temperature, "--temperature")
    if min(temperatures) < 0:
        raise LatentError(f"temperatures must be >= 0 (they scale the priors' std), got {args.temperature}")
    if args.n < 1:
        raise LatentError(f"--n must be at least 1, got {args.n}")
    loaded = load_model(args.checkpoint, tracking=tracking_of(args))
    check_label(loaded.model, args.label)
    labels = None
    if args.label is not None:
        labels = torch.full((args.n,), args.label, dtype=torch.long, device=next(loaded.model.parameters()).device)
    # One temperature: a square grid; several: one row of --n per temperature, like the trainer's grids.
    ncols = grid_columns(args.n) if len(temperatures) == 1 else args.n
    grid = temperature_grid(Decoder(loaded.model, args.decode_mode), temperatures, args.n, seed=args.seed,
                            labels=labels, ncols=ncols, batch_size=args.batch_size)
    path = save_png(grid, args.out, scale=args.scale or display_scale(loaded.model.cfg.image_size))
    print(f"wrote {args.n * len(temperatures)} samples (T={args.temperature}) of {loaded.path} "
          f"(step {loaded.step}) to {path}")
    return 0

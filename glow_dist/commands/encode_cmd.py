"""Encode images into the latents of a checkpoint's EMA weights, exactly (decode gives them back, quantized):

  glow-dist encode --checkpoint runs/celeba --images faces/*.png --out latents.npz

The .npz holds z0, z1, ... (one array per level, finest first, shape (N, C, H, W)) and the metadata `decode` checks:
checkpoint, checkpoint_sha256, step, n_bits, model_config (JSON) and names (the image file names).
Images of another size are resized and center-cropped as `glow-dist prepare` does.
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_checkpoint_argument, tracking_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--images", required=True, nargs="+", help="image files (PNG/JPEG)")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    parser.add_argument("--out", required=True, help=".npz file to write")


def run(args: argparse.Namespace) -> int:
    from glow_dist.inference.latents import encode_images, load_images, save_latents
    from glow_dist.inference.loading import load_model

    loaded = load_model(args.checkpoint, tracking=tracking_of(args))
    images, names = load_images(args.images, loaded.model.cfg)
    zs = encode_images(loaded.model, images, args.batch_size)
    path = save_latents(args.out, zs, loaded, names)
    print(f"wrote latents of {len(names)} images ({len(zs)} levels) from {loaded.path} (step {loaded.step}) to {path}")
    return 0

"""Decode latents written by `glow-dist encode` back into images, one PNG per latent:

  glow-dist decode --checkpoint runs/celeba --latents latents.npz --out decoded/

With the checkpoint that encoded them the PNGs equal the inputs quantized to the model's n_bits. Latents from a
model of another configuration are refused.
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_checkpoint_argument, add_decode_mode_argument, tracking_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--latents", required=True, help=".npz file from `glow-dist encode`")
    parser.add_argument("--batch-size", type=int, default=64, help="images decoded at once")
    add_decode_mode_argument(parser)
    parser.add_argument("--out", required=True, help="directory for the PNG files")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from glow_dist.inference.decoding import Decoder, save_png
    from glow_dist.inference.latents import decode_latents, load_latents
    from glow_dist.inference.loading import load_model

    loaded = load_model(args.checkpoint, tracking=tracking_of(args))
    zs, names = load_latents(args.latents, loaded)
    images = decode_latents(Decoder(loaded.model, args.decode_mode), zs, args.batch_size)
    stems = [Path(n).stem for n in names]
    if len(set(stems)) < len(stems):  # same file name from different folders: keep every image
        stems = [f"{i:04d}-{s}" for i, s in enumerate(stems)]
    out = Path(args.out)
    for image, stem in zip(images, stems, strict=True):
        save_png(image.permute(1, 2, 0).numpy(), out / f"{stem}.png")
    print(f"wrote {len(stems)} images decoded with {loaded.path} (step {loaded.step}) to {out}")
    return 0

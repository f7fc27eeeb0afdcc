"""Decode points between the encodings of two images, as one strip (the ends are the inputs, quantized):

  glow-dist interpolate --checkpoint runs/celeba --a alice.png --b bob.png --steps 8 --out strip.png
  glow-dist interpolate --checkpoint runs/celeba --a alice.png --b bob.png --mode slerp --out strip.png

linear: z = (1 - t) za + t zb. slerp: along the great circle between them, which keeps the latent's norm.
"""
from __future__ import annotations

import argparse

from glow_dist.commands import add_checkpoint_argument, add_decode_mode_argument, tracking_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--a", required=True, help="first image")
    parser.add_argument("--b", required=True, help="second image")
    parser.add_argument("--steps", type=int, default=8, help="images in the strip, both ends included")
    parser.add_argument("--mode", choices=("linear", "slerp"), default="linear", help="path between the latents")
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded at once")
    add_decode_mode_argument(parser)
    parser.add_argument("--scale", type=int, help="enlarge tiles by this factor (default: up to 64 pixels)")
    parser.add_argument("--out", required=True, help="PNG file to write")


def run(args: argparse.Namespace) -> int:
    from glow_dist.inference.decoding import Decoder, display_scale, image_grid, save_png
    from glow_dist.inference.latents import decode_latents, encode_images, interpolate, load_images
    from glow_dist.inference.loading import load_model

    loaded = load_model(args.checkpoint, tracking=tracking_of(args))
    images, _ = load_images([args.a, args.b], loaded.model.cfg)
    zs = encode_images(loaded.model, images)
    points = interpolate([z[:1] for z in zs], [z[1:] for z in zs], args.steps, args.mode)
    strip = decode_latents(Decoder(loaded.model, args.decode_mode), points, args.batch_size)
    path = save_png(image_grid(strip, ncols=args.steps), args.out,
                    scale=args.scale or display_scale(loaded.model.cfg.image_size))
    print(f"wrote a {args.mode} interpolation of {args.steps} images to {path}")
    return 0

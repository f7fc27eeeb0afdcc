"""Move images along an attribute direction in latent space (the model never saw the labels), one row per image:

  glow-dist manipulate --checkpoint runs/celeba --data data/celeba64 --attribute Smiling \\
      --image me.png --alphas -1,-0.5,0,0.5,1 --out smile.png

The direction is mean(z | attribute) - mean(z | not attribute) over the labelled split of --data (attributes
written by `glow-dist prepare folder --attributes`); each image becomes decode(z + alpha * direction).
It is computed once and cached in <checkpoint>.directions/<attribute>.pt, keyed by the checkpoint's sha256 and step
and the data manifest, so a new checkpoint or re-prepared data recomputes it. alpha 0 gives the input back.
"""
from __future__ import annotations

import argparse
import re

from glow_dist.commands import add_checkpoint_argument, add_decode_mode_argument, tracking_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse takes "-1,-0.5,0" for an option (only a lone "-1" counts as a number); accept number lists too.
    parser._negative_number_matcher = re.compile(r"^-\d*\.?\d+(,-?\d*\.?\d+)*$")
    add_checkpoint_argument(parser)
    parser.add_argument("--data", required=True, help="prepared shard folder or URL, with attributes")
    parser.add_argument("--attribute", required=True, help="attribute name, as in the attribute file")
    parser.add_argument("--image", required=True, nargs="+", help="image(s) to manipulate, one row each")
    parser.add_argument("--alphas", default="-1,-0.5,0,0.5,1", help="comma-separated multiples of the direction")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="split the direction is taken on")
    parser.add_argument("--no-cache", action="store_true", help="recompute the direction and do not store it")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded/decoded at once")
    add_decode_mode_argument(parser)
    parser.add_argument("--scale", type=int, help="enlarge tiles by this factor (default: up to 64 pixels)")
    parser.add_argument("--out", required=True, help="PNG file to write")


def run(args: argparse.Namespace) -> int:
    from glow_dist.commands.sample_cmd import parse_floats
    from glow_dist.inference.decoding import Decoder, display_scale, image_grid, save_png
    from glow_dist.inference.latents import attribute_direction, decode_latents, encode_images, load_images, shift
    from glow_dist.inference.loading import load_model

    alphas = parse_floats(args.alphas, "--alphas")
    loaded = load_model(args.checkpoint, tracking=tracking_of(args))
    images, _ = load_images(args.image, loaded.model.cfg)  # before the direction: a typo fails fast
    direction = attribute_direction(loaded, args.data, args.attribute, args.split, args.batch_size,
                                    cache=not args.no_cache)
    zs = encode_images(loaded.model, images, args.batch_size)
    out = decode_latents(Decoder(loaded.model, args.decode_mode), shift(zs, direction, alphas), args.batch_size)
    path = save_png(image_grid(out, ncols=len(alphas)), args.out,
                    scale=args.scale or display_scale(loaded.model.cfg.image_size))
    print(f"wrote {len(images)} image(s) x alphas {args.alphas} along {args.attribute!r} to {path}")
    return 0

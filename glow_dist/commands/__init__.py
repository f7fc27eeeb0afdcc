"""Subcommands of the `glow-dist` CLI; each module has `add_arguments(parser)` and `run(args)`."""
import argparse


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The `--config FILE` and trailing `section.key=value` overrides shared by every config-driven command."""
    parser.add_argument("--config", "-c", required=required, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_decode_mode_argument(parser: argparse.ArgumentParser) -> None:
    """`--decode-mode`, shared by every command that decodes latents into images (glow_dist.decoder)."""
    from glow_dist.config import DECODE_MODES

    parser.add_argument("--decode-mode", choices=DECODE_MODES, default="auto",
                        help="eager | compiled | graphed (CUDA graphs) decoding; auto: graphed on CUDA, eager on CPU")

"""Subcommands of the `glow-dist` CLI; each module has `add_arguments(parser)` and `run(args)`, and keeps its heavy
imports (torch, DALI, MLflow) inside `run`. The arguments several commands share are defined here, once."""
import argparse


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The `--config FILE` and trailing `section.key=value` overrides shared by every config-driven command."""
    parser.add_argument("--config", "-c", required=required, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """`--checkpoint` (alias `--model`), shared by every command that reads a trained model, and `--tracking-uri`
    for the model URIs it takes (glow_dist.inference.loading)."""
    parser.add_argument("--checkpoint", "--model", required=True,
                        help="checkpoint file, a run dir (its newest valid checkpoint), or an MLflow model URI "
                             "(models:/NAME/VERSION, runs:/RUN_ID/model)")
    parser.add_argument("--tracking-uri", default="",
                        help="where a model URI resolves (default: $MLFLOW_TRACKING_URI, else the local store "
                             "mlflow/ that training writes by default)")


def tracking_of(args: argparse.Namespace) -> object:
    """The TrackingConfig that a command's `--tracking-uri` asks for."""
    from glow_dist.config import TrackingConfig

    return TrackingConfig(uri=args.tracking_uri)


def add_decode_mode_argument(parser: argparse.ArgumentParser) -> None:
    """`--decode-mode`, shared by every command that decodes latents into images (glow_dist.inference.decoding)."""
    from glow_dist.config import choices

    parser.add_argument("--decode-mode", choices=choices("runtime.sample_mode"), default="auto",
                        help="eager | compiled | graphed (CUDA graphs) decoding; auto: graphed on CUDA, eager on CPU")

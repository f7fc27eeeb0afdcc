"""A trained Glow from wherever it is: a checkpoint file, a run directory (its newest valid checkpoint), or a model
logged to MLflow (`models:/NAME/VERSION`, `runs:/RUN_ID/model`, whose `weights.pt` is downloaded first).

    loaded = load_model("runs/celeba")                  # EMA weights, eval mode, on the GPU when there is one
    loaded = load_model("models:/glow-celeba/3", weights="model")

A logged model's `weights.pt` is a slim checkpoint (EMA weights, config, step) with its sha256 sidecar, so every
source ends in the same verified checkpoint read, which runs none of the file's code (glow_dist/checkpoint.py). Only
`weights.pt` of a logged model is read: its pickled pyfunc wrapper and shipped code are never loaded here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch

from glow_dist.checkpoint import (
    CheckpointError,
    check_weights,
    model_weights,
    open_checkpoint,
    recorded_sha256,
    require_entries,
)
from glow_dist.config import Config, TrackingConfig, from_dict, tracking_store
from glow_dist.mlflow_auth import TrackingAuthError, refusal, refused_status
from glow_dist.model import Glow, build_model

MODEL_URI = re.compile(r"^(models|runs):/")   # the MLflow model URIs every command's --checkpoint/--model takes
WEIGHTS = "weights.pt"                         # a logged model's checkpoint file (glow_dist/tracking/mlflow_model.py)


class LoadedModel(NamedTuple):
    model: Glow           # EMA weights (or raw, if asked), eval mode, on the GPU when there is one
    config: Config        # the checkpoint's saved config
    path: Path            # the checkpoint file (resolved from a run directory or downloaded)
    step: int
    sha256: str           # of the checkpoint file: identifies the weights in caches and latent files


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_source(source: str | Path, tracking: TrackingConfig | None = None) -> tuple[Path, dict]:
    """(checkpoint path, verified state) of a checkpoint file, a run directory or an MLflow model URI."""
    if MODEL_URI.match(str(source)):
        source = download_weights(str(source), tracking)
    return open_checkpoint(source)


def load_model(source: str | Path, device: torch.device | None = None, weights: str = "ema",
               tracking: TrackingConfig | None = None) -> LoadedModel:
    """The EMA weights (or `weights="model"`: the raw ones) of a checkpoint, run directory or model URI, in eval
    mode. `tracking` says where a model URI resolves (default: $MLFLOW_TRACKING_URI, else the local store that
    training writes by default)."""
    path, state = open_source(source, tracking)
    return model_from_state(path, state, device, weights)


def model_from_state(path: Path, state: dict, device: torch.device | None = None, weights: str = "ema") -> LoadedModel:
    """`load_model` on a checkpoint already opened (and so verified against its sidecar); CheckpointError naming
    what is missing or which weights differ from the model its config describes."""
    require_entries(state, path, "config", "position", weights)
    step = state["position"].get("step")
    if not isinstance(step, int):
        raise CheckpointError(f"checkpoint {path}: its position has no step number; it was not written by glow-dist")
    cfg = from_dict(state["config"], source=f"{path} (saved config)")
    model = build_model(cfg.model)  # the default runtime: plain memory, every `auto` resolved on this device
    check_weights(model, model_weights(state, weights), f"{path} ({weights} weights)")
    model.load_state_dict(model_weights(state, weights))
    model.eval().requires_grad_(False).to(device or default_device())
    return LoadedModel(model, cfg, path, step, recorded_sha256(path))


def download_weights(uri: str, tracking: TrackingConfig | None = None, dst: str | Path | None = None) -> Path:
    """The `weights.pt` (with its sha256 sidecar) of a logged Glow model, downloaded; a path open_checkpoint takes."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking_uri, local = tracking_store(tracking or TrackingConfig())
    if local is not None and not (local / "mlflow.db").is_file():
        raise CheckpointError(f"{uri} needs a tracking server: set MLFLOW_TRACKING_URI, or run from the folder whose "
                              f"{local.name}/mlflow.db training wrote (tracking.local_dir)")
    mlflow.set_tracking_uri(tracking_uri)   # models:/ resolves through the registry, which defaults to it
    try:
        found = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None,
                                                         tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:
        if refused_status(e):
            raise TrackingAuthError(refusal(tracking_uri, refused_status(e), f"download {uri}")) from None
        raise CheckpointError(f"{uri} could not be downloaded from {tracking_uri}: {str(e).splitlines()[0]}") \
            from None
    files = sorted(found.rglob(WEIGHTS))
    if not files:
        raise CheckpointError(f"{uri} has no {WEIGHTS}: it is not a Glow model logged by glow-dist")
    return files[0]

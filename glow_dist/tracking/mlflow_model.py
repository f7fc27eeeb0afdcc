"""The trained Glow as an MLflow model: the final EMA weights, loadable by glow_dist and by `mlflow.pyfunc`.

    glow-dist sample --model runs:/<run_id>/model --n 16 --temperature 0.7 --out grid.png
    glow-dist evaluate --model models:/glow-digits/1 --baseline
    mlflow.pyfunc.load_model("models:/glow-digits/1").predict(pd.DataFrame({"temperature": [0.7], "n": [16]}))

Why pyfunc with the weights as an artifact, not `mlflow.pytorch`: mlflow.pytorch pickles the module object, so
loading needs the exact classes of the training code, and the weights are not a file any other tool of this project
reads. Here the model's artifact `weights.pt` is a slim checkpoint (EMA weights, the resolved config, step, source
run; a sha256 sidecar beside it) that every glow-dist command opens like any `ckpt-*.pt`, and the pyfunc wrapper
(GlowSampler: predict = samples at given temperatures) ships the glow_dist package as the model's code, so
`mlflow.pyfunc.load_model` works where glow-dist is not installed (torch, numpy, pyyaml and pillow suffice).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from glow_dist.checkpoint import save_verified, sidecar
from glow_dist.inference.decoding import sample_images
from glow_dist.inference.loading import WEIGHTS, load_model

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; this keeps the error at use, not import
    PythonModel = object  # type: ignore[assignment,misc]

MODEL_NAME = "model"                  # runs:/<run_id>/model


# MLflow warns at class creation that predict has no type hints (the signature logged with the model replaces them).
# Its check runs under its own warnings.catch_warnings() with a "once" filter in front, so no filter of ours reaches
# it: the warning function of that check is muted while the class is created, and only then.
def _quiet_class_creation() -> contextlib.AbstractContextManager:
    try:
        from mlflow.pyfunc.utils import data_validation
    except ImportError:   # mlflow missing or reorganised: the warning, if any, is harmless
        return contextlib.nullcontext()
    return mock.patch.object(data_validation, "color_warning", lambda *args, **kwargs: None, create=True)


with _quiet_class_creation():
    class GlowSampler(PythonModel):
        """pyfunc wrapper: `predict` takes rows of (temperature, n, seed) and returns the samples as uint8 arrays
        (N, H, W, C), all rows concatenated in order."""

        def load_context(self, context: Any) -> None:
            self.loaded = load_model(context.artifacts["weights"], torch.device("cpu"))

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 (MLflow reads type hints)
            import numpy as np

            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            out = [sample_images(self.loaded.model, int(r.get("n", 1)), float(r.get("temperature", 0.7)),
                                 seed=int(r.get("seed", 0))) for r in rows]
            return np.concatenate([o.permute(0, 2, 3, 1).numpy() for o in out]) if out else np.zeros((0,))


def _signature(model_cfg: dict) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    size, channels = model_cfg["image_size"], model_cfg["channels"]
    inputs = Schema([ColSpec("double", "temperature"), ColSpec("long", "n", required=False),
                     ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, channels))]))


def log_glow_model(tracker: Any, state: dict, staging: Path, register_as: str = "") -> str:
    """Log `state` (EMA weights, config, position, run id) as the run's MLflow model `model`; register it when
    `register_as` is set. Runs through the tracker's queue (so an unreachable server delays it, never fails
    training). Returns the model's runs:/ URI."""
    import mlflow
    from mlflow.models import Model

    import glow_dist

    staging.mkdir(parents=True, exist_ok=True)
    weights = save_verified(state, staging / WEIGHTS)
    step = int(state["position"]["step"])
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pyyaml", "pillow"]
    uri = f"runs:/{tracker.run_id}/{MODEL_NAME}"

    logged: dict[str, str] = {}

    def log() -> None:
        # Model.log resolves the store and the logged model's experiment globally (else: experiment 0).
        mlflow.set_tracking_uri(tracker.uri)
        mlflow.set_experiment(experiment_id=tracker.experiment_id)
        # Created here, not by Model.log, which would copy every run param onto the model; the run has them.
        model = tracker.client.create_logged_model(tracker.experiment_id, name=MODEL_NAME,
                                                    source_run_id=tracker.run_id, model_type="glow",
                                                    tags={"glow_dist.training.step": str(step)})
        with warnings.catch_warnings():   # no input example: the signature below says what predict takes
            warnings.simplefilter("ignore", UserWarning)
            info = Model.log(None, flavor=mlflow.pyfunc, name=MODEL_NAME, run_id=tracker.run_id, step=step,
                             model_id=model.model_id,
                             python_model=GlowSampler(),
                             artifacts={"weights": str(weights), "weights_sha256": str(sidecar(weights))},
                             code_paths=[str(Path(glow_dist.__file__).parent)],
                             signature=_signature(state["config"]["model"]), pip_requirements=requirements)
        logged["model_id"] = info.model_id

    def register() -> None:
        version = mlflow.register_model(f"models:/{logged['model_id']}" if logged else uri, register_as)
        tracker.client.set_tag(tracker.run_id, "registered_model", f"{register_as}/{version.version}")

    # "Passing a Python object as python_model ... CloudPickle": GlowSampler is pickled by reference to this module,
    # which ships as the model's code.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    tracker.call("model", log)
    if register_as:
        tracker.call(f"model registration {register_as}", register)
    return uri

"""What a reviewer sees on the MLflow run page, read back through a real `mlflow server` on 127.0.0.1.

One short training run (debug model, real digits shards), then `glow-dist evaluate` and `glow-dist sample --model`
as a user would run them; the tests read the run through MlflowClient (the server's REST API).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BASE, REPO, env_with_venv
from mlflow.tracking import MlflowClient
from PIL import Image

from glow_dist.config import load_config
from glow_dist.model import build_model

pytestmark = pytest.mark.slow

TEMPERATURES = (0.0, 0.7, 1.0)
SAMPLE_COUNT = 4


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "glow_dist", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=600, env=env_with_venv(env))
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path, mlflow_server: str) -> dict:
    tmp = tmp_path_factory.mktemp("run_page")
    run_dir = tmp / "run"
    env = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}   # a short run still gets system metrics
    temps = ",".join(f"{t:g}" for t in TEMPERATURES)
    train = _run(["train", "--config", "configs/debug.yaml", *BASE, f"data.root={digits_shards}",
                  f"train.run_dir={run_dir}", f"tracking.uri={mlflow_server}", "tracking.experiment=test-run-page",
                  f"tracking.sample_temperatures={temps}", f"tracking.sample_count={SAMPLE_COUNT}",
                  "tracking.register_as=glow-run-page"], env)
    run_id = torch.load(run_dir / "checkpoints" / "ckpt-00000006.pt", weights_only=True)["mlflow_run_id"]
    evaluate = _run(["evaluate", "--checkpoint", str(run_dir), "--baseline"], env)
    return {"run_id": run_id, "run_dir": run_dir, "train": train, "evaluate": evaluate, "tmp": tmp,
            "client": MlflowClient(mlflow_server), "uri": mlflow_server, "shards": digits_shards}


def test_standard_tags_name_and_description(trained: dict) -> None:
    run = trained["client"].get_run(trained["run_id"])
    tags = run.data.tags
    assert re.fullmatch(r"debug-1ranks-\d{8}-\d{6}", run.info.run_name), run.info.run_name
    assert tags["mlflow.source.name"] == "glow-dist train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["git_dirty"] in ("true", "false")
    note = tags["mlflow.note.content"]
    assert "**Resume**" in note and "glow-dist train --config configs/debug.yaml" in note
    assert f"--model runs:/{trained['run_id']}/model" in note
    assert "at step 6" in note, "the final test bits/dim is missing from the description"
    assert "`glow-dist evaluate` (ema weights, step 6" in note
    experiment = trained["client"].get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The links training prints open the run in the model-training view.
    url = f"{trained['uri']}/#/experiments/{run.info.experiment_id}/runs/{trained['run_id']}"
    assert f"{url}?workflowType=machine_learning" in trained["train"].stderr


def test_params_are_the_ones_that_matter(trained: dict) -> None:
    params = trained["client"].get_run(trained["run_id"]).data.params
    assert not {"train.progress", "tracking.uri", "tracking.local_dir", "tracking.run_name"} & params.keys()
    assert all(v != "" for v in params.values())
    cfg = load_config(REPO / "configs" / "debug.yaml")
    assert params["model.parameters"] == str(sum(p.numel() for p in build_model(cfg.model).parameters()))
    assert params["data.train_images"] == "1617" and params["data.test_images"] == "180"
    assert params["env.torch"] == torch.__version__ and params["env.python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"env.cuda", "env.cudnn", "env.horovod", "env.dali", "env.mlflow", "hw.gpu", "hw.gpu_count"} <= params.keys()
    assert params["hw.gpu_count"] == (str(1) if torch.cuda.is_available() else "0")
    assert params["world_size"] == "1" and params["model.levels"] == "2"


def test_dataset_inputs_from_the_manifest(trained: dict) -> None:
    inputs = trained["client"].get_run(trained["run_id"]).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert set(by_context) == {"training", "evaluation"}
    assert by_context["training"].name == f"{trained['shards'].name}-train"
    assert '"num_images": 1617' in by_context["training"].profile
    assert '"num_images": 180' in by_context["evaluation"].profile
    assert by_context["training"].digest != by_context["evaluation"].digest


def test_metrics_with_steps_and_system_metrics(trained: dict) -> None:
    client, run_id = trained["client"], trained["run_id"]
    metrics = client.get_run(run_id).data.metrics
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm")] == [2, 4, 6]
    evaluated = client.get_metric_history(run_id, "bits_per_dim/evaluate")
    assert [m.step for m in evaluated] == [6] and 0 < evaluated[0].value < 8
    assert f"test bits/dim: {evaluated[0].value:.4f}" in trained["evaluate"].stdout
    assert metrics["bits_per_dim/baseline_uniform"] == 5.0   # the debug model's 5 bits
    per_pixel = re.search(r"per-pixel independent baseline: ([0-9.]+)", trained["evaluate"].stdout).group(1)
    assert f"{metrics['bits_per_dim/baseline_per_pixel']:.4f}" == per_pixel
    tags = client.get_run(run_id).data.tags
    assert tags["evaluate.weights"] == "ema" and client.get_run(run_id).info.status == "FINISHED"
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


def _images(client: MlflowClient, run_id: str) -> dict[str, dict[int, str]]:
    """key -> step -> artifact path of the full-size PNG, parsed from the names `log_image(key=, step=)` writes."""
    found: dict[str, dict[int, str]] = {}
    for a in client.list_artifacts(run_id, "images"):
        m = re.fullmatch(r"images/(.+)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", a.path)
        if m:
            found.setdefault(m.group(1).replace("~", "/"), {})[int(m.group(2))] = a.path
    return found


def test_sample_images_one_key_per_temperature_with_steps(trained: dict) -> None:
    client, run_id = trained["client"], trained["run_id"]
    images = _images(client, run_id)
    assert set(images) == {f"samples/T{t:g}" for t in TEMPERATURES}
    assert all(sorted(steps) == [0, 3, 6] for steps in images.values())  # from the initial weights on
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"

    def shape(key: str) -> tuple[int, ...]:
        path = client.download_artifacts(run_id, images[key][6], str(trained["tmp"] / "img"))
        return np.asarray(Image.open(path)).shape

    tile = (8 + 1) * 8   # 8x8 digits enlarged 8x, with a 1-pixel border
    assert shape("samples/T0")[:2] == (tile + 8, tile + 8), "T=0 (the mode) should be one image, not 4 copies"
    assert shape("samples/T0.7")[:2] == (2 * tile + 8, 2 * tile + 8)


def test_checkpoints_rotated_in_mlflow(trained: dict) -> None:
    uploaded = [a.path for a in trained["client"].list_artifacts(trained["run_id"], "checkpoints")]
    assert uploaded == ["checkpoints/ckpt-00000006.pt", "checkpoints/ckpt-00000006.pt.sha256"]   # policy "last"


def test_model_loads_back_into_glow_dist_and_pyfunc(trained: dict) -> None:
    client, run_id, tmp = trained["client"], trained["run_id"], trained["tmp"]
    version = client.get_run(run_id).data.tags["registered_model"]
    assert version == "glow-run-page/1"
    env = {"MLFLOW_TRACKING_URI": trained["uri"]}
    for uri in (f"runs:/{run_id}/model", "models:/glow-run-page/1"):
        out = tmp / f"grid-{uri.split(':')[0]}.png"
        _run(["sample", "--model", uri, "--n", "4", "--temperature", "0.7", "--out", str(out)], env)
        assert Image.open(out).size == (2 * 9 * 8 + 8, 2 * 9 * 8 + 8)
    # The model's weights are the final checkpoint's EMA weights.
    from glow_dist.inference.loading import download_weights

    os.environ["MLFLOW_TRACKING_URI"] = trained["uri"]
    try:
        weights = torch.load(download_weights(f"runs:/{run_id}/model", dst=tmp / "dl"), weights_only=True)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    final = torch.load(trained["run_dir"] / "checkpoints" / "ckpt-00000006.pt", weights_only=True)
    assert weights["ema"].keys() == final["ema"].keys()
    assert all(torch.equal(weights["ema"][k], final["ema"][k]) for k in final["ema"])
    # mlflow.pyfunc loads it on its own: predict gives samples of the model's shape.
    script = ("import mlflow, pandas as pd; m = mlflow.pyfunc.load_model('models:/glow-run-page/1'); "
              "out = m.predict(pd.DataFrame({'temperature': [0.0, 0.7], 'n': [1, 3]})); print(out.shape, out.dtype)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp, timeout=300,
                            env=env_with_venv(env))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4, 8, 8, 1) uint8" in result.stdout


def test_loading_the_model_code_prints_no_mlflow_type_hint_warning() -> None:
    """The trainer imports glow_dist.tracking.mlflow_model when it logs the model (and pyfunc when it loads it):
    MLflow's "Add type hints to the `predict` method" warning must not land in the user's training output."""
    out = subprocess.run([sys.executable, "-W", "default", "-c", "import glow_dist.tracking.mlflow_model"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "type hints" not in out.stderr, out.stderr

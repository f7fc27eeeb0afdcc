"""A checkpoint or registered model from someone else cannot run code, whatever reads it.

Every entry point that reads a checkpoint (train resume, evaluate, sample, decode, a `models:/` URI on a real MLflow
server, the MLflow pyfunc model) is given one whose pickle would create a marker file, with a correct sha256 sidecar
(anyone who can write the file can write its sidecar): each refuses it in one line that names the file and says it
may be malicious, and the marker never appears. Then the clear errors for checkpoints that are not malicious but not
glow-dist's either: a missing entry, weights that do not fit their config.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, RunsCode, env_with_venv, save_with_sidecar
from mlflow.tracking import MlflowClient

from glow_dist.cli import main as cli
from glow_dist.config import load_config, to_dict
from glow_dist.model import build_model

REFUSED = "may be malicious; none of it was executed"


def genuine_state(step: int = 3) -> dict:
    """A checkpoint's state as a model logged to MLflow holds it (EMA weights, config, position), plus raw weights."""
    cfg = load_config(REPO / "configs" / "debug.yaml")
    weights = build_model(cfg.model).state_dict()
    return {"model": weights, "ema": weights, "config": to_dict(cfg), "position": {"step": step}}


def planted(path: Path, marker: Path) -> Path:
    """A checkpoint that looks genuine and whose pickle runs `touch marker` when loaded unsafely."""
    return save_with_sidecar({**genuine_state(), "notes": RunsCode(marker)}, path)


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    planted(tmp_path / "run" / "checkpoints" / "ckpt-00000001.pt", tmp_path / "MARKER")
    return tmp_path / "run"


def refused(err: str, name: str = "ckpt-00000001.pt") -> bool:
    line = err.strip().splitlines()[-1]
    return name in line and REFUSED in line and "posix.system" in line and "Traceback" not in err


def test_evaluate_refuses_a_planted_checkpoint(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli(["evaluate", "--checkpoint", str(run_dir), "--no-tracking"])
    assert not (tmp_path / "MARKER").exists(), "the checkpoint's code ran"
    assert code == 2 and refused(capsys.readouterr().err)


def test_sample_refuses_a_planted_checkpoint(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = run_dir / "checkpoints" / "ckpt-00000001.pt"
    code = cli(["sample", "--checkpoint", str(ckpt), "--n", "2", "--out", str(tmp_path / "s.png")])
    assert not (tmp_path / "MARKER").exists(), "the checkpoint's code ran"
    assert code == 2 and refused(capsys.readouterr().err) and not (tmp_path / "s.png").exists()


def test_decode_refuses_a_planted_checkpoint(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli(["decode", "--checkpoint", str(run_dir), "--latents", str(tmp_path / "z.npz"),
                "--out", str(tmp_path / "out")])
    assert not (tmp_path / "MARKER").exists(), "the checkpoint's code ran"
    assert code == 2 and refused(capsys.readouterr().err)


@pytest.mark.slow
def test_train_resume_refuses_a_planted_checkpoint(run_dir: Path, tmp_path: Path, digits_shards: Path) -> None:
    """train.resume=auto reads the newest checkpoint of the run directory: the planted one stops the run at start
    (it is not stepped over to an older checkpoint or a fresh start, which would hide it)."""
    out = subprocess.run([sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml",
                          f"data.root={digits_shards}", f"train.run_dir={run_dir}", "train.steps=2",
                          "train.progress=false", f"tracking.local_dir={tmp_path / 'mlflow'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, env=env_with_venv())
    assert not (tmp_path / "MARKER").exists(), "the checkpoint's code ran"
    assert out.returncode == 2 and refused(out.stderr), out.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt-00000001.pt",
                                                                             "ckpt-00000001.pt.sha256"]


@pytest.mark.slow
def test_a_registered_model_cannot_run_code(mlflow_server: str, tmp_path: Path) -> None:
    """`models:/NAME/VERSION` on a real server whose weights.pt is planted: `glow-dist sample --model` refuses it,
    and so does the pyfunc model's load_context (both read it through inference.loading.load_model)."""
    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("untrusted-models"))
    model_dir = tmp_path / "model"
    planted(model_dir / "weights.pt", tmp_path / "MARKER")
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.create_registered_model("untrusted-glow")
    client.create_model_version("untrusted-glow", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)

    out = subprocess.run([sys.executable, "-m", "glow_dist", "sample", "--model", "models:/untrusted-glow/1",
                          "--n", "2", "--out", str(tmp_path / "s.png")], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env=env_with_venv({"MLFLOW_TRACKING_URI": mlflow_server}))
    assert not (tmp_path / "MARKER").exists(), "the model's code ran"
    assert out.returncode == 2 and refused(out.stderr, "weights.pt"), out.stderr[-3000:]

    from glow_dist.tracking.mlflow_model import GlowSampler

    try:
        GlowSampler().load_context(SimpleNamespace(artifacts={"weights": str(model_dir / "weights.pt")}))
        error = "loaded"
    except Exception as e:
        error = str(e)
    assert not (tmp_path / "MARKER").exists(), "the pyfunc model's load_context ran the model's code"
    assert REFUSED in error, error


def test_a_checkpoint_without_an_entry_names_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = genuine_state()
    del state["config"]
    save_with_sidecar(state, tmp_path / "ckpt-00000003.pt")
    assert cli(["sample", "--checkpoint", str(tmp_path / "ckpt-00000003.pt"), "--n", "2",
                "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "has no 'config' entry (it has ema, model, position)" in err and "Traceback" not in err
    # A logged model's weights.pt holds only the EMA weights: asking for the raw ones names the entry too.
    state = genuine_state()
    del state["model"]
    save_with_sidecar(state, tmp_path / "weights.pt")
    assert cli(["evaluate", "--checkpoint", str(tmp_path / "weights.pt"), "--raw-weights", "--no-tracking"]) == 2
    assert "has no 'model' entry" in capsys.readouterr().err


def test_weights_that_do_not_fit_their_config_name_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = genuine_state()
    ema = dict(state["ema"])
    name = next(k for k, v in ema.items() if v.dim() == 4)   # a convolution's weight
    ema[name] = torch.zeros(1, 1, 1, 1)
    ema.pop(next(reversed(ema)))
    save_with_sidecar({**state, "ema": ema}, tmp_path / "ckpt-00000003.pt")
    assert cli(["decode", "--checkpoint", str(tmp_path / "ckpt-00000003.pt"), "--latents", str(tmp_path / "z.npz"),
                "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the weights do not fit the model (missing: " in err, err
    assert f"shape (checkpoint vs model): {name} (1, 1, 1, 1) vs" in err and "Traceback" not in err

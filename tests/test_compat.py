"""A checkpoint of an earlier layout (tests/data/checkpoint-v0.1: speed-only keys inside `model`, an `rng` entry of
numpy arrays) still loads without running code, evaluates to the same number, samples, and resumes to exactly the
weights the old code reached."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import train_cli

from glow_dist import checkpoint
from glow_dist.cli import main as cli
from glow_dist.inference.loading import load_model

OLD = Path(__file__).parent / "data" / "checkpoint-v0.1"
OVERRIDES = ["model.width=4", "model.steps=1", "model.memory=checkpoint", "model.channels_last=false",
             "train.step_mode=eager", "train.checkpoint_every=2", "train.eval_every=0", "train.sample_every=0",
             "train.progress=false", "tracking.log_model=false", "train.threads=1", "train.deterministic=true",
             "data.backend=webdataset"]


@pytest.fixture()
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(OLD / "checkpoints", run / "checkpoints")
    return run


def test_old_checkpoint_loads_evaluates_and_samples(old_run: Path, digits_shards: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    saved = torch.load(old_run / "checkpoints" / "ckpt-00000002.pt", weights_only=False)   # the test's own fixture
    assert "memory" in saved["config"]["model"] and "rng" in saved, "the fixture must keep the old layout"
    monkeypatch.setattr(checkpoint, "_told_numpy", False, raising=False)   # whatever earlier tests here loaded
    loaded = load_model(old_run, torch.device("cpu"))
    assert loaded.config.runtime.memory == "checkpoint" and loaded.step == 2
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved["ema"][name]), name
    assert cli(["evaluate", "--checkpoint", str(old_run), "--data", str(digits_shards), "--no-tracking"]) == 0
    out = capsys.readouterr().out
    assert "test bits/dim: 5.4758" in out  # what the old code printed for it
    assert cli(["sample", "--checkpoint", str(old_run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    # Its numpy RNG state was read through the explicit allowlist, said once in the log for all three loads.
    out += capsys.readouterr().out
    assert out.count("read through an explicit allowlist (numpy.") == 1, out


@pytest.mark.slow
def test_old_checkpoint_resumes_to_the_weights_the_old_code_reached(old_run: Path, digits_shards: Path,
                                                                    tmp_path: Path) -> None:
    train_cli(*OVERRIDES, f"data.root={digits_shards}", f"train.run_dir={old_run}", "train.steps=4",
              f"tracking.local_dir={tmp_path / 'mlflow'}")
    final = torch.load(old_run / "checkpoints" / "ckpt-00000004.pt", weights_only=False)
    expected = torch.load(OLD / "expected-step4.pt", weights_only=False)
    assert final["position"] == expected["position"]
    # Recorded on one CPU; another CPU's kernels may round one reduction differently (seen: one element of `top`
    # off by 2e-10, one ulp). A resume that replays or skips a batch moves weights by the learning rate's scale (1e-3).
    for key in ("model", "ema"):
        for name, value in expected[key].items():
            torch.testing.assert_close(final[key][name], value, rtol=1e-6, atol=1e-9, msg=f"{key}.{name}")
    assert "memory" not in final["config"]["model"] and final["config"]["runtime"]["memory"] == "checkpoint"
    assert "rng" not in final

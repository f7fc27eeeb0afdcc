"""The trainer end to end: real horovodrun processes, real shards, a real MLflow server on 127.0.0.1."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers import (
    BASE,
    BIN,
    DETERMINISTIC,
    REPO,
    assert_identical,
    copy_run,
    horovodrun,
    load_ckpt,
    run_check,
    train_cli,
)
from mlflow.tracking import MlflowClient

from glow_dist.checkpoint import save_checkpoint
from glow_dist.config import load_config
from glow_dist.model import build_model
from glow_dist.training.ema import UPDATES_KEY

pytestmark = pytest.mark.slow


def test_two_ranks_train_in_lockstep_and_log_to_mlflow(tmp_path, digits_shards, mlflow_server):
    run_dir = tmp_path / "run"
    overrides = BASE + [f"data.root={digits_shards}", f"train.run_dir={run_dir}", f"tracking.uri={mlflow_server}",
                        "tracking.experiment=test-train", "tracking.sample_temperatures=0,0.7,1",
                        "runtime.channels_last_min_size=1"]  # NHWC in every level: Horovod all-reduces its gradients
    r0, r1 = run_check(2, tmp_path / "out", overrides)

    # Parameters, buffers and EMA are bit-identical on both ranks after training.
    assert_identical(r0["final"], r1["final"])
    assert_identical(r0["ema"], r1["ema"])
    assert not torch.equal(r0["after_init"]["top"], r0["final"]["top"])  # training moved the weights

    # ActNorm init equals an init on both ranks' init batches concatenated (the public code used rank 0's only).
    assert not torch.equal(r0["init_x"], r1["init_x"])
    cfg = load_config(REPO / "configs" / "debug.yaml")
    torch.manual_seed(cfg.train.seed)
    reference = build_model(cfg.model)
    reference.initialize(torch.cat([r0["init_x"], r1["init_x"]]))
    for key, value in reference.state_dict().items():
        if ".actnorm." in key and not key.endswith("initialized"):
            torch.testing.assert_close(r0["after_init"][key], value, rtol=1e-4, atol=1e-5, msg=key)

    # Everything arrived in the MLflow server.
    client = MlflowClient(mlflow_server)
    run = client.get_run(r0["run_id"])
    assert run.info.status == "FINISHED"
    for name in ("bits_per_dim/train", "bits_per_dim/test_ema", "bits_per_dim/test_raw", "lr", "grad_norm",
                 "images_per_sec", "skipped_steps"):
        history = client.get_metric_history(run.info.run_id, name)
        assert history, f"metric {name} missing"
    assert not {"train/bpd", "test/bpd"} & set(run.data.metrics)  # the old names are gone
    # Both test curves start at step 0 (the initial weights, where EMA and raw are the same model).
    test = {w: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"bits_per_dim/test_{w}")}
            for w in ("ema", "raw")}
    assert sorted(test["ema"]) == sorted(test["raw"]) == [0, 3, 6]
    assert test["ema"][0] == test["raw"][0] and test["ema"][6] != test["raw"][6]
    assert r0["final_metrics"]["bits_per_dim/test_ema"] == test["ema"][6]
    params = run.data.params
    assert params["world_size"] == "2" and params["global_batch_size"] == "16"
    assert params["model.levels"] == "2" and params["train.steps"] == "6"
    assert run.data.tags["hosts"] == "1" and run.data.tags["gpu_type"] == "cpu" and run.data.tags["git_commit"]
    # What ran, on every rank: the step mode (gathered from both ranks), the grids' decode mode, the memory mode.
    assert run.data.tags["runtime.step_mode"] == "eager" and run.data.tags["runtime.sample_mode"] == "eager"
    assert run.data.tags["runtime.memory"] == "plain"
    assert not {"runtime.step_mode.fallbacks", "runtime.sample_mode.fallback"} & set(run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"images", "checkpoints", "config.yaml"} <= artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    steps = sorted(int(re.search(r"\+step\+(\d+)\+", p).group(1)) for p in images)
    assert steps == [0] * 3 + [3] * 3 + [6] * 3, "one image per temperature (0, 0.7, 1) at steps 0, 3 and 6"
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert any(p.endswith("ckpt-00000006.pt") for p in checkpoints)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["ckpt-00000003.pt", "ckpt-00000006.pt"]


def test_nonfinite_loss_on_one_rank_is_skipped_by_both(tmp_path, digits_shards):
    overrides = BASE + [f"data.root={digits_shards}", f"train.run_dir={tmp_path / 'run'}",
                        f"tracking.local_dir={tmp_path / 'mlflow'}"]
    r0, r1 = run_check(2, tmp_path / "out", overrides, env={"GLOW_DIST_INJECT_NONFINITE": "2:1,4:0"})
    assert r0["position"]["skipped_steps"] == r1["position"]["skipped_steps"] == 2
    assert r0["position"]["step"] == 6
    assert int(r0["ema"][UPDATES_KEY]) == 4  # a skipped step does not update the average
    assert_identical(r0["final"], r1["final"])
    assert all(torch.isfinite(v).all() for v in r0["final"].values() if v.is_floating_point())


def test_stop_and_resume_gives_the_same_weights(tmp_path, digits_shards):
    """2 ranks, weight decay on: the resumed run restores and broadcasts weights, EMA, optimizer state, position."""
    common = BASE + [f"data.root={digits_shards}", "train.deterministic=true", "train.steps=8",
                     f"tracking.local_dir={tmp_path / 'mlflow'}", "train.checkpoint_every=100",
                     "optim.weight_decay=0.01"]
    train_cli(*common, f"train.run_dir={tmp_path / 'straight'}", np=2)
    # The interrupted run stops at step 5 (its final checkpoint), then `resume=auto` continues to step 8.
    train_cli(*common, f"train.run_dir={tmp_path / 'resumed'}", "train.steps=5", np=2)
    train_cli(*common, f"train.run_dir={tmp_path / 'resumed'}", "train.resume=auto", np=2)
    straight, resumed = load_ckpt(tmp_path / "straight", 8), load_ckpt(tmp_path / "resumed", 8)
    assert resumed["position"] == straight["position"]
    assert_identical(straight["model"], resumed["model"])
    assert_identical(straight["ema"], resumed["ema"])
    first = load_ckpt(tmp_path / "resumed", 5)
    assert first["mlflow_run_id"] == resumed["mlflow_run_id"]  # the same MLflow run continued


def test_resume_never_refuses_to_overwrite_checkpoints(tmp_path, digits_shards, unbroken_run):
    run_dir = copy_run(unbroken_run(*DETERMINISTIC), tmp_path / "run")  # a run with checkpoints
    common = [*DETERMINISTIC, f"data.root={digits_shards}", f"train.run_dir={run_dir}", "train.steps=8",
              f"tracking.local_dir={tmp_path / 'mlflow'}"]
    out = subprocess.run([sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml", *common,
                          "train.resume=never"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2 and "already has checkpoints" in out.stderr


def test_training_on_digits_lowers_test_bpd(tmp_path, digits_shards):
    overrides = [f"data.root={digits_shards}", f"train.run_dir={tmp_path / 'run'}", "train.steps=60",
                 "train.log_every=20", "train.eval_every=1000", "train.sample_every=1000",
                 "train.checkpoint_every=1000", "train.progress=false", "optim.warmup_steps=10", "optim.lr=3e-3",
                 "optim.ema_decay=0", f"tracking.local_dir={tmp_path / 'mlflow'}"]
    (result,) = run_check(1, tmp_path / "out", overrides)
    # The debug model starts above the 5-bit uniform bound; 60 steps take it clearly below it.
    assert result["test_bpd_before"] > 5.0, result
    assert result["test_bpd_after"] < 5.0 - 0.1 and result["test_bpd_after"] < result["test_bpd_before"] - 0.3, result


def test_evaluate_command_single_and_two_ranks(tmp_path, unbroken_run):
    run_dir = unbroken_run(*DETERMINISTIC)  # evaluate only reads it
    one = subprocess.run([str(BIN / "glow-dist"), "evaluate", "--checkpoint", str(run_dir), "--baseline"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert one.returncode == 0, one.stderr
    two = horovodrun(2, "-m", "glow_dist", "evaluate", "--checkpoint", str(run_dir / "checkpoints" /
                                                                      "ckpt-00000006.pt"))

    def bpd(text: str) -> float:
        return float(text.split("test bits/dim:")[1].split()[0])

    assert "uniform 5-bit bound: 5.0000" in one.stdout and "per-pixel independent baseline" in one.stdout
    # Same split, each sample once: only the dequantization noise differs between 1 and 2 ranks.
    assert abs(bpd(one.stdout) - bpd(two.stdout)) < 0.02
    missing = subprocess.run([str(BIN / "glow-dist"), "evaluate", "--checkpoint", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_checkpoint_from_before_the_ema_warmup_resumes_as_if_unbroken(tmp_path, digits_shards, unbroken_run):
    """A checkpoint whose EMA state has no update count (written before the warm-up) resumes with the count of the
    steps it took, so it ends where an unbroken run ends; evaluate names the weights it scores."""
    common = [*DETERMINISTIC, f"data.root={digits_shards}", f"tracking.local_dir={tmp_path / 'm'}"]
    straight, old = unbroken_run(*DETERMINISTIC), tmp_path / "old"
    state = load_ckpt(straight, 3)
    assert int(state["ema"][UPDATES_KEY]) == 3
    del state["ema"][UPDATES_KEY]  # as written before the warm-up existed
    save_checkpoint(state, old, 3, keep=0)

    def evaluate(run_dir, *extra: str) -> str:
        out = subprocess.run([str(BIN / "glow-dist"), "evaluate", "--checkpoint", str(run_dir), *extra],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "weights: EMA (decay 0.999, written before the EMA warm-up" in evaluate(old)
    train_cli(*common, f"train.run_dir={old}")
    resumed, unbroken = load_ckpt(old, 6), load_ckpt(straight, 6)
    assert int(resumed["ema"][UPDATES_KEY]) == 6
    assert_identical(unbroken["ema"], resumed["ema"])
    assert_identical(unbroken["model"], resumed["model"])
    assert "weights: EMA (decay 0.999 warmed up as min(decay, (1+n)/(20+n)); 6 updates" in evaluate(old)
    assert "weights: raw" in evaluate(old, "--raw-weights")

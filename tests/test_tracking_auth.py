"""The tracking server with authentication, for real: launch/mlflow-server.sh AUTH=basic on 127.0.0.1 (MLflow's
basic-auth app), the admin's password from a file. Anonymous requests are refused; a training run with credentials
(MLFLOW_TRACKING_USERNAME/PASSWORD) logs its metrics and model, which `evaluate` and `sample --model` reach with the
same credentials; a wrong password, or a user without permission on the experiment, fails at start in one line, and
`glow-dist doctor` says so before a job is launched.
"""
from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
from helpers import REPO, env_with_venv, load_ckpt
from mlflow.tracking import MlflowClient
from test_tracking import Server, _cfg

from glow_dist.cli import main as cli
from glow_dist.config import Config
from glow_dist.mlflow_auth import TrackingAuthError
from glow_dist.preflight.doctor import check_mlflow
from glow_dist.tracking.client import make_tracker

pytestmark = pytest.mark.slow

ADMIN = ("admin", f"adm1n-{secrets.token_hex(8)}")
TRAINER = ("trainer", f"tra1ner-{secrets.token_hex(8)}")
VIEWER = ("viewer", f"v1ewer-{secrets.token_hex(8)}")
EXPERIMENT = "auth-test"
# A loaded 2-core machine and the server's deliberately slow password hash: MLflow's 5 s default is too short here.
SLOW_SERVER = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("auth_server")
    password_file = root / "admin-password"
    password_file.write_text(ADMIN[1])
    password_file.chmod(0o600)
    server = Server(root, script_env={"AUTH": "basic", "ADMIN_PASSWORD_FILE": str(password_file)}).start()
    try:
        for user, password in (TRAINER, VIEWER):   # the admin makes the accounts, as on a real server
            requests.post(f"{server.uri}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                          auth=ADMIN, timeout=120).raise_for_status()
        yield server
    finally:
        server.stop()


def as_user(monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None) -> dict[str, str]:
    """Who this process (and the environment returned, for subprocesses) authenticates as: MLflow's variables."""
    env = {**SLOW_SERVER}
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
            env[name] = value
    for name, value in SLOW_SERVER.items():
        monkeypatch.setenv(name, value)
    return env


def train(shards: Path, run_dir: Path, uri: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml", f"data.root={shards}",
           f"train.run_dir={run_dir}", f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", "train.steps=4",
           "train.log_every=2", "train.eval_every=4", "train.sample_every=0", "train.checkpoint_every=4",
           "train.progress=false", "train.threads=1", "train.max_eval_batches=2", "tracking.system_metrics=false"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env_with_venv(env))


def test_anonymous_requests_are_refused_and_no_secret_is_on_a_command_line(auth_server: Server) -> None:
    search = f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=120).status_code == 401
    assert requests.get(search, auth=(ADMIN[0], "wrong"), timeout=120).status_code == 401
    assert requests.get(search, auth=ADMIN, timeout=120).status_code == 200
    assert requests.get(f"{auth_server.uri}/health", timeout=120).status_code == 200   # liveness probes stay open
    # `ps` shows every user the command lines: the admin password and the Flask key reach mlflow another way.
    key = (auth_server.root / "flask-secret-key").read_text()
    server = psutil.Process(auth_server.proc.pid)
    for proc in [server, *server.children(recursive=True)]:
        command_line = " ".join(proc.cmdline())
        assert ADMIN[1] not in command_line and key not in command_line, command_line
    assert (auth_server.root / "flask-secret-key").stat().st_mode & 0o077 == 0


def test_training_with_credentials_logs_metrics_and_model(auth_server: Server, digits_shards: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    env = as_user(monkeypatch, *TRAINER)
    cfg = Config()
    cfg.tracking.uri = auth_server.uri
    doctor = check_mlflow(cfg, timeout=120)   # what `glow-dist doctor` checks before a launch
    assert doctor.status == "PASS" and f"answers as user {TRAINER[0]!r}" in doctor.detail, doctor

    run_dir = tmp_path / "run"
    out = train(digits_shards, run_dir, auth_server.uri, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stderr, out.stderr[-3000:]   # not one call refused or retried
    run_id = load_ckpt(run_dir, 4)["mlflow_run_id"]
    client = MlflowClient(auth_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.user"]
    assert [m.step for m in client.get_metric_history(run_id, "bits_per_dim/train")] == [2, 4]
    assert "bits_per_dim/test_ema" in run.data.metrics

    # evaluate logs to the run with the same credentials ...
    assert cli(["evaluate", "--checkpoint", str(run_dir), "--data", str(digits_shards)]) == 0
    assert f"MLflow: logged to run {run_id}" in capsys.readouterr().out
    assert [m.step for m in client.get_metric_history(run_id, "bits_per_dim/evaluate")] == [4]
    # ... and the logged model loads from the server as a teammate would load it.
    grid = tmp_path / "grid.png"
    sample = subprocess.run([sys.executable, "-m", "glow_dist", "sample", "--model", f"runs:/{run_id}/model", "--n",
                             "4", "--out", str(grid)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env=env_with_venv({**env, "MLFLOW_TRACKING_URI": auth_server.uri}))
    assert sample.returncode == 0 and grid.is_file(), sample.stderr[-3000:]


def test_wrong_password_fails_at_start(auth_server: Server, digits_shards: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    env = as_user(monkeypatch, TRAINER[0], "not-the-password")
    out = train(digits_shards, tmp_path / "run", auth_server.uri, env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"glow-dist train: tracking error: MLflow at {auth_server.uri} refused to open the run in experiment "
        f"{EXPERIMENT!r} (HTTP 401, user 'trainer': wrong password, or no such user). Set MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to an account of that server. Training did not "
        "start; `glow-dist doctor` checks the credentials"), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "checkpoints").exists()

    cfg = Config()
    cfg.tracking.uri = auth_server.uri
    wrong = check_mlflow(cfg, timeout=120)
    assert wrong.status == "FAIL" and "(HTTP 401, user 'trainer': wrong password, or no such user)" in wrong.detail
    as_user(monkeypatch, None, None)
    anonymous = check_mlflow(cfg, timeout=120)
    assert anonymous.status == "FAIL" and "(HTTP 401, anonymous: no credentials are set)" in anonymous.detail


def test_a_user_without_permission_on_the_experiment_fails_at_start(auth_server: Server, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    requests.post(f"{auth_server.uri}/api/2.0/mlflow/experiments/create", json={"name": "admins-only"}, auth=ADMIN,
                  timeout=120).raise_for_status()
    as_user(monkeypatch, *VIEWER)   # READ on every experiment (the server's default permission), EDIT on none
    cfg = _cfg(tmp_path, auth_server.uri)
    cfg.tracking.experiment = "admins-only"
    with pytest.raises(TrackingAuthError, match=r"refused to open the run in experiment 'admins-only' \(HTTP 403: "
                                                r"user 'viewer' lacks the permission\)"):
        make_tracker(cfg)


def test_credentials_refused_mid_run_are_an_outage_not_a_crash(auth_server: Server, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Once training has started, a refusal (the password changed on the server) never stops it: one warning that
    says why, metrics buffered, and sent when the server takes the credentials again."""
    as_user(monkeypatch, *TRAINER)
    tracker = make_tracker(_cfg(tmp_path, auth_server.uri))
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "changed-on-the-server")
    tracker.log_metrics({"bits_per_dim/train": 3.0}, step=1)
    tracker.log_metrics({"bits_per_dim/train": 2.5}, step=2)
    err = capsys.readouterr().err
    assert err.count("refused to send metrics (HTTP 401, user 'trainer'") == 1, err
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TRAINER[1])
    tracker.finish()   # the last flush sends what was buffered
    history = MlflowClient(auth_server.uri).get_metric_history(tracker.run_id, "bits_per_dim/train")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5)]

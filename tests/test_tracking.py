"""Tracking against a real `mlflow server` on loopback, the default local sqlite store, and unreachable servers."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from glow_dist.config import Config, flatten
from glow_dist.tracking import outbox
from glow_dist.tracking.client import Tracker, make_tracker
from glow_dist.tracking.reporter import NullReporter, make_reporter
from glow_dist.tracking.uploads import checkpoints_to_keep

SERVER_START_TIMEOUT_S = 120   # a cold start runs the sqlite migrations; slow on a busy 2-core machine


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` subprocess with a sqlite backend and proxied artifacts under `root`; with `script_env`, started
    by launch/mlflow-server.sh with those variables (e.g. AUTH=basic) instead.

    conftest.py's session fixture `mlflow_server` starts one for the whole suite (a start takes 10-30 s);
    tests that stop and restart a server make their own.
    """

    def __init__(self, root: Path, port: int | None = None, script_env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        self.root, self.port, self.script_env, self.host = root, port or _free_port(host), script_env, host
        self.uri = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        # MLflow's job runner (GenAI jobs, 8 processes) serves nothing here and only loads the shared cores.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.script_env is None:
            return [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.port),
                    "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"], env
        env.update({"MLFLOW_HOME": str(self.root), "HOST": self.host, "PORT": str(self.port), "WORKERS": "1",
                    "MLFLOW": str(Path(sys.executable).parent / "mlflow"), **self.script_env})
        return ["bash", str(Path(__file__).resolve().parents[1] / "launch" / "mlflow-server.sh")], env

    def start(self) -> Server:
        cmd, env = self.command()
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "a")  # noqa: SIM115  (the child keeps writing to it)
        # Its own session: mlflow starts workers and a job consumer, and stop() ends them all.
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited:\n{(self.root / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow server not healthy in {SERVER_START_TIMEOUT_S} s: {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _cfg(tmp_path: Path, uri: str, run_dir: str = "run") -> Config:
    cfg = Config()
    cfg.tracking.uri = uri
    cfg.tracking.local_dir = str(tmp_path / "mlflow")
    cfg.tracking.run_name = "test-run"
    cfg.train.run_dir = str(tmp_path / run_dir)
    return cfg


def _jsonl(tracker: Tracker) -> list[dict]:
    return [json.loads(line) for line in tracker.metrics_file.read_text().splitlines()]


@pytest.mark.slow
def test_log_and_read_back_through_server(mlflow_server: str, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, mlflow_server)
    params = {**flatten(cfg), **{f"extra.p{i}": i for i in range(150)}, "extra.long": "x" * 7000}  # > 100: batched
    image = np.random.default_rng(0).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    (tmp_path / "notes.txt").write_text("hello")
    with make_tracker(cfg) as tracker:
        assert isinstance(tracker, Tracker) and tracker.run_id
        tracker.log_params(params)
        tracker.set_tags({"hosts": "2", "mlflow.source.git.commit": "abc123"})
        for step in range(1, 6):
            tracker.log_metrics({"bits_per_dim/train": 8.0 / step, "train/lr": 1e-3}, step=step)
        tracker.log_image(image, "samples/t0.7.png")
        tracker.log_artifact(tmp_path / "notes.txt", "misc")
        tracker.log_config(cfg)
        assert mlflow_server in tracker.describe() and tracker.run_id in tracker.url()

    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "test-run"
    assert len(run.data.params) == len(params)
    assert run.data.params["model.levels"] == "3" and run.data.params["extra.p149"] == "149"
    assert run.data.params["extra.long"] == "x" * 6000  # MLflow's limit, truncated instead of rejected
    assert run.data.tags["hosts"] == "2" and run.data.tags["mlflow.source.git.commit"] == "abc123"
    history = client.get_metric_history(tracker.run_id, "bits_per_dim/train")
    assert sorted((m.step, m.value) for m in history) == [(s, 8.0 / s) for s in range(1, 6)]
    assert {a.path for a in client.list_artifacts(tracker.run_id)} >= {"config.yaml", "samples", "misc"}
    downloaded = client.download_artifacts(tracker.run_id, "samples/t0.7.png", str(tmp_path / "dl"))
    assert np.array_equal(np.asarray(Image.open(downloaded)), image)
    config_file = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    assert "levels: 3" in Path(config_file).read_text()
    assert len(_jsonl(tracker)) == 5


@pytest.mark.slow
def test_resume_same_run(mlflow_server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _cfg(tmp_path, mlflow_server)
    first = make_tracker(cfg)
    first.log_params({"train.steps": 100})
    first.log_metrics({"loss": 1.0}, step=1)
    first.finish("KILLED")
    assert MlflowClient(mlflow_server).get_run(first.run_id).info.status == "KILLED"

    second = make_tracker(cfg, run_id=first.run_id)
    assert second.run_id == first.run_id
    second.log_params({"train.steps": 200, "train.new": 1})  # a changed value is kept as it was, with a warning
    second.log_metrics({"loss": 0.5}, step=2)
    second.finish()
    assert "train.steps" in capsys.readouterr().err
    run = MlflowClient(mlflow_server).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "100" and run.data.params["train.new"] == "1"
    history = MlflowClient(mlflow_server).get_metric_history(first.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]


@pytest.mark.slow   # creating a fresh sqlite store runs MLflow's migrations: 10 s or more
def test_default_local_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path, uri="")
    tracker = make_tracker(cfg)
    tracker.log_metrics({"loss": 2.0}, step=3)
    tracker.log_image(np.zeros((4, 4, 1), dtype=np.uint8), "grid.png")
    tracker.finish()
    db = tmp_path / "mlflow" / "mlflow.db"
    assert tracker.uri == f"sqlite:///{db}" and db.is_file()
    assert "mlflow ui" in tracker.describe()
    run = MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 2.0} and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlflow" / "artifacts").as_uri())
    assert list((tmp_path / "mlflow" / "artifacts").rglob("grid.png")), "artifact did not land in local_dir"


def test_null_reporter_on_other_ranks(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "http://127.0.0.1:1")
    report = make_reporter(cfg, main=False, run_id=None, world_size=2, start_step=0)
    assert type(report) is NullReporter and report.run_id is None
    report.metrics({"loss": 1.0}, step=1)
    report.finish()
    assert not (tmp_path / "run").exists()


def test_unreachable_server_never_stops_training(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"   # nothing listens there
    cfg = _cfg(tmp_path, uri)
    start = time.monotonic()
    tracker = make_tracker(cfg)
    tracker.log_params(flatten(cfg))
    for step in range(200):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.log_image(np.zeros((4, 4, 3), dtype=np.uint8), "samples/x.png")
    tracker.finish()
    assert time.monotonic() - start < 20
    err = capfd.readouterr().err
    assert err.count("is unreachable") == 1 and uri in err and "tracking.uri" in err
    assert [(r["step"], r["metrics"]["loss"]) for r in _jsonl(tracker)] == [(s, float(s)) for s in range(200)]


class Relay:
    """TCP forwarder on its own port to a server: close() makes the server vanish for clients, open() restores it.

    Cheaper than stopping and restarting `mlflow server` (tens of seconds per start) and the client sees the same
    thing: refused connections, and pooled connections reset.
    """

    def __init__(self, target_uri: str) -> None:
        self.target = ("127.0.0.1", int(target_uri.rsplit(":", 1)[1]))
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets = [listener]
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.mark.slow
def test_server_goes_away_and_comes_back(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(outbox, "FIRST_RETRY_S", 0.5)   # retry soon, so the test need not wait 30 s
    relay = Relay(mlflow_server)
    relay.open()
    try:
        tracker = make_tracker(_cfg(tmp_path, relay.uri))
        tracker.log_metrics({"loss": 0.0}, step=0)
        relay.close()
        start = time.monotonic()
        for step in range(1, 51):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert time.monotonic() - start < 15, "a dead server must cost seconds, not minutes"
        assert capfd.readouterr().err.count("is unreachable") == 1
        relay.open()
        time.sleep(1.0)
        tracker.log_metrics({"loss": 51.0}, step=51)   # past the retry time: the buffer is flushed
        tracker.finish()
        assert "reachable again" in capfd.readouterr().out
    finally:
        relay.close()
    history = MlflowClient(mlflow_server).get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(52))
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "FINISHED"
    assert len(_jsonl(tracker)) == 52


def test_env_defaults_keep_dead_servers_cheap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")   # a user's own choice is kept
    make_tracker(_cfg(tmp_path, f"http://127.0.0.1:{_free_port()}")).finish()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


# ---- checkpoint upload policy ------------------------------------------------------------------------------------

def test_checkpoint_policies_keep_what_they_say() -> None:
    steps = [100, 200, 300, 400, 500]
    assert checkpoints_to_keep(steps, "none") == set()
    assert checkpoints_to_keep(steps, "last") == {500}
    assert checkpoints_to_keep(steps, "all", keep=2) == {400, 500}
    assert checkpoints_to_keep(steps, "all", keep=0) == set(steps)
    assert checkpoints_to_keep(steps, "every_n", every=200) == {200, 400, 500}
    assert checkpoints_to_keep([], "last") == set()


@pytest.mark.parametrize(("old", "new"), [(True, "all"), (False, "none"), ("true", "all"), ("no", "none")])
def test_old_boolean_log_checkpoints_still_loads(old: object, new: str) -> None:
    from glow_dist.config import from_dict, load_config

    # A checkpoint's saved config (from_dict) and a command-line override written before the policy existed.
    assert from_dict({"tracking": {"log_checkpoints": old}}).tracking.log_checkpoints == new
    assert load_config(None, [f"tracking.log_checkpoints={str(old).lower()}"]).tracking.log_checkpoints == new


def test_every_n_needs_an_interval() -> None:
    from glow_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="log_checkpoints_every"):
        load_config(None, ["tracking.log_checkpoints=every_n"])
    with pytest.raises(ConfigError, match="none, last, all, every_n"):
        load_config(None, ["tracking.log_checkpoints=some"])


def _fake_checkpoints(run_dir: Path, steps: list[int]) -> list[Path]:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        path = folder / f"ckpt-{step:08d}.pt"
        path.write_bytes(b"weights %d" % step)
        (folder / f"{path.name}.sha256").write_text(f"{'0' * 64}  {path.name}\n")
        paths.append(path)
    return paths


def _uploaded(uri: str, run_id: str) -> list[str]:
    return sorted(a.path.removeprefix("checkpoints/") for a in MlflowClient(uri).list_artifacts(run_id, "checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "extra", "kept"), [
    ("all", [], [4, 5]),                                          # train.keep_checkpoints=2, as the local folder
    ("every_n", ["tracking.log_checkpoints_every=2"], [2, 4, 5]),  # milestones plus the newest
    ("none", [], []),
])
def test_checkpoint_rotation_in_mlflow_survives_a_resume(mlflow_server: str, tmp_path: Path, policy: str,
                                                         extra: list[str], kept: list[int]) -> None:
    from glow_dist.config import load_config

    cfg = load_config(None, [f"tracking.uri={mlflow_server}", f"train.run_dir={tmp_path / 'run'}",
                             f"tracking.local_dir={tmp_path / 'mlflow'}", "train.keep_checkpoints=2",
                             f"tracking.log_checkpoints={policy}", "tracking.system_metrics=false", *extra])
    paths = _fake_checkpoints(tmp_path / "run", [1, 2, 3, 4, 5])
    first = make_tracker(cfg)
    for step, path in zip([1, 2, 3], paths[:3], strict=True):
        first.log_checkpoint(path, step)
    first.finish("KILLED")
    second = make_tracker(cfg, run_id=first.run_id)   # a new process: rotation reads MLflow's list
    for step, path in zip([4, 5], paths[3:], strict=True):
        second.log_checkpoint(path, step)
    second.finish()
    expected = sorted(n for s in kept for n in (f"ckpt-{s:08d}.pt", f"ckpt-{s:08d}.pt.sha256"))
    assert _uploaded(mlflow_server, first.run_id) == expected


def _uploads_cfg(tmp_path: Path, uri: str, *extra: str) -> Config:
    from glow_dist.config import load_config

    return load_config(None, [f"tracking.uri={uri}", f"train.run_dir={tmp_path / 'run'}",
                              f"tracking.local_dir={tmp_path / 'mlflow'}", "tracking.system_metrics=false", *extra])


@pytest.mark.slow
def test_checkpoint_uploads_leave_training_alone_and_the_end_of_a_run_waits_for_them(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload held 10 s (as a multi-GB one to a remote server would take) is not in MLflow when log_checkpoint
    returns: the training thread went on. finish() waits for it, and the rotation (policy last) leaves the newest."""
    monkeypatch.setenv("GLOW_DIST_INJECT_SLOW_UPLOAD", "10")
    paths = _fake_checkpoints(tmp_path / "run", [1, 2])
    tracker = make_tracker(_uploads_cfg(tmp_path, mlflow_server))
    tracker.log_checkpoint(paths[0], 1)
    assert _uploaded(mlflow_server, tracker.run_id) == []   # still held on the upload thread
    tracker.log_checkpoint(paths[1], 2)
    tracker.finish()
    assert _uploaded(mlflow_server, tracker.run_id) == ["ckpt-00000002.pt", "ckpt-00000002.pt.sha256"]


@pytest.mark.slow
def test_a_stop_does_not_wait_for_checkpoint_uploads(mlflow_server: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture) -> None:
    """A stop signal's run end (the Reporter after stopped()) leaves a held upload: the grace period is for the stop
    checkpoint. The run ends KILLED at once and says which checkpoint was not uploaded and where it is."""
    monkeypatch.setenv("GLOW_DIST_INJECT_SLOW_UPLOAD", "300")
    path = _fake_checkpoints(tmp_path / "run", [4])[0]
    cfg = _uploads_cfg(tmp_path, mlflow_server, "train.progress=false")
    report = make_reporter(cfg, main=True, run_id=None, world_size=1, start_step=0)
    report.checkpoint_saved(path, {"position": {"step": 4}})
    report.stopped("SIGTERM", 5, None)
    report.finish("KILLED")
    assert MlflowClient(mlflow_server).get_run(report.run_id).info.status == "KILLED"
    assert _uploaded(mlflow_server, report.run_id) == []
    err = capfd.readouterr().err
    assert "checkpoint(s) of step 4 not uploaded to MLflow (the run stopped first)" in err, err
    assert str(tmp_path / "run") in err


@pytest.mark.slow
def test_a_checkpoint_upload_is_retried_when_the_server_comes_back(mlflow_server: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capfd: pytest.CaptureFixture) -> None:
    from glow_dist.tracking import uploads

    monkeypatch.setattr(uploads, "FIRST_RETRY_S", 0.5)   # retry soon, so the test need not wait 30 s
    paths = _fake_checkpoints(tmp_path / "run", [1, 2])
    relay = Relay(mlflow_server)
    relay.open()
    try:
        tracker = make_tracker(_uploads_cfg(tmp_path, relay.uri, "tracking.log_checkpoints=all"))
        tracker.log_checkpoint(paths[0], 1)   # uploaded while the server is there
        deadline = time.monotonic() + 60
        while _uploaded(mlflow_server, tracker.run_id) != ["ckpt-00000001.pt", "ckpt-00000001.pt.sha256"]:
            assert time.monotonic() < deadline, "the first checkpoint was never uploaded"
            time.sleep(0.2)
        relay.close()
        tracker.log_checkpoint(paths[1], 2)
        err = wait_for_text(capfd, "checkpoint ckpt-00000002.pt could not be uploaded", 60)
        assert err is not None, "no warning while the server was away"
        assert "retrying in the background while training goes on" in err
        relay.open()
        deadline = time.monotonic() + 60
        while "ckpt-00000002.pt.sha256" not in _uploaded(mlflow_server, tracker.run_id):
            assert time.monotonic() < deadline, "the upload was not retried once the server came back"
            time.sleep(0.2)
        tracker.finish()
        assert "[tracking] checkpoint ckpt-00000002.pt uploaded" in capfd.readouterr().out
    finally:
        relay.close()
    both = [f"ckpt-0000000{step}.pt{suffix}" for step in (1, 2) for suffix in ("", ".sha256")]
    assert _uploaded(mlflow_server, tracker.run_id) == both   # policy all, train.keep_checkpoints 3


@pytest.mark.slow
def test_a_checkpoint_logged_while_the_server_is_away_is_uploaded_by_the_upload_thread(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server is away when the run starts and at its first checkpoint; when it is back, the training thread's
    next flush creates the run but does not upload the checkpoint (held 10 s on the upload thread, as a multi-GB
    upload takes); the end of the run waits for the upload thread. (The checkpoint used to wait in the Outbox, whose
    flush uploaded it on the training thread.)"""
    monkeypatch.setattr(outbox, "FIRST_RETRY_S", 0.5)   # the Outbox retries soon, so the test need not wait 30 s
    monkeypatch.setenv("GLOW_DIST_INJECT_SLOW_UPLOAD", "10")
    path = _fake_checkpoints(tmp_path / "run", [1])[0]
    relay = Relay(mlflow_server)   # not open yet: the server is away
    try:
        tracker = make_tracker(_uploads_cfg(tmp_path, relay.uri))
        tracker.log_checkpoint(path, 1)
        relay.open()
        time.sleep(1.0)
        tracker.log_metrics({"loss": 1.0}, step=1)   # past the retry time: the run is created, the buffer flushed
        assert tracker.run_id is not None
        assert MlflowClient(mlflow_server).get_run(tracker.run_id).data.metrics == {"loss": 1.0}
        assert _uploaded(mlflow_server, tracker.run_id) == []   # not uploaded by the training thread's flush
        tracker.finish()
    finally:
        relay.close()
    assert _uploaded(mlflow_server, tracker.run_id) == ["ckpt-00000001.pt", "ckpt-00000001.pt.sha256"]


@pytest.mark.slow
def test_the_end_of_a_run_uploads_a_checkpoint_logged_while_the_server_was_away(mlflow_server: str,
                                                                               tmp_path: Path) -> None:
    """The server is away at the checkpoint (the upload thread's first try fails and waits 30 s) and back at the
    end: finish() puts the run on the server first, then the upload thread uploads the checkpoint."""
    path = _fake_checkpoints(tmp_path / "run", [1])[0]
    relay = Relay(mlflow_server)   # not open yet: the server is away
    try:
        tracker = make_tracker(_uploads_cfg(tmp_path, relay.uri))
        tracker.log_checkpoint(path, 1)
        relay.open()
        tracker.finish()
    finally:
        relay.close()
    assert _uploaded(mlflow_server, tracker.run_id) == ["ckpt-00000001.pt", "ckpt-00000001.pt.sha256"]


@pytest.mark.slow
def test_a_stop_does_not_upload_a_checkpoint_logged_while_the_server_was_away(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """The server is away at the checkpoint and back at the stop: closing the run (KILLED) sends what the Outbox
    holds, but not the checkpoint, which the stop leaves on the upload thread and names. (Closing the Outbox used to
    upload it inside the scheduler's grace period.)"""
    monkeypatch.setenv("GLOW_DIST_INJECT_SLOW_UPLOAD", "300")
    path = _fake_checkpoints(tmp_path / "run", [4])[0]
    relay = Relay(mlflow_server)   # not open yet: the server is away
    try:
        report = make_reporter(_uploads_cfg(tmp_path, relay.uri, "train.progress=false"), main=True, run_id=None,
                               world_size=1, start_step=0)
        report.checkpoint_saved(path, {"position": {"step": 4}})
        relay.open()
        report.stopped("SIGTERM", 5, None)
        report.finish("KILLED")
    finally:
        relay.close()
    run_id = report.tracker.run_id   # created once the server was back, at the close
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "KILLED"
    assert _uploaded(mlflow_server, run_id) == []
    err = capfd.readouterr().err
    assert "checkpoint(s) of step 4 not uploaded to MLflow (the run stopped first)" in err, err


def test_rotation_keeps_the_newest_of_the_current_line() -> None:
    """After a resume from step 4 of a run that had uploaded 6 and 8: the upload of the new line's 6 keeps it
    (the newest of its line), and the abandoned line's 8 is neither the newest nor deleted."""
    assert checkpoints_to_keep([2, 4, 6, 8], "last", current=6) == {6, 8}
    assert checkpoints_to_keep([2, 4, 6, 8], "all", keep=2, current=4) == {2, 4, 6, 8}
    assert checkpoints_to_keep([2, 4, 5, 6, 8], "all", keep=2, current=5) == {4, 5, 6, 8}
    assert checkpoints_to_keep([2, 4, 5, 6, 8], "every_n", every=4, current=5) == {4, 5, 6, 8}


def wait_for_text(capfd: pytest.CaptureFixture, text: str, timeout: float) -> str | None:
    """Standard error captured so far, once it contains `text` (None after `timeout` seconds without it)."""
    seen, deadline = "", time.monotonic() + timeout
    while True:
        seen += capfd.readouterr().err
        if text in seen:
            return seen
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


# ---- run description and names ----------------------------------------------------------------------------------

def test_run_name_from_config_world_size_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime, timezone

    from glow_dist.tracking.metadata import default_run_name

    cfg = Config()
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    monkeypatch.setattr(sys, "argv", ["glow-dist", "train", "--config", "configs/digits.yaml"])
    assert default_run_name(cfg, 4, cuda=False, now=when) == "digits-4ranks-20260102-030405"
    assert default_run_name(cfg, 40, cuda=True, now=when) == "digits-40gpu-20260102-030405"
    cfg.tracking.run_name = "mine"
    assert default_run_name(cfg, 4, cuda=False, now=when) == "mine"


def test_evaluation_line_replaces_an_earlier_one() -> None:
    from glow_dist.tracking.metadata import DESCRIPTION_RESULT_MARK, with_evaluation, with_results

    note = with_results(f"head\n\n{DESCRIPTION_RESULT_MARK}", ["- `bits_per_dim/test_ema` **2.1** at step 9"])
    once = with_evaluation(note, "- `glow-dist evaluate` (ema weights, step 9): 2.2")
    twice = with_evaluation(once, "- `glow-dist evaluate` (ema weights, step 9): 2.3")
    assert twice.startswith("head") and "2.2" not in twice and twice.count("glow-dist evaluate") == 1
    assert "`bits_per_dim/test_ema` **2.1**" in twice and twice.endswith("2.3")
    assert with_evaluation("", "- `glow-dist evaluate` x").endswith("- `glow-dist evaluate` x")


def test_t0_row_is_one_image_unless_class_conditional() -> None:
    from glow_dist.tracking.reporter import temperature_images

    samples = [(0.0, torch.zeros(4, 1, 8, 8, dtype=torch.uint8)), (0.7, torch.zeros(4, 1, 8, 8, dtype=torch.uint8))]
    plain = dict(temperature_images(samples, y_condition=False, scale=1))
    assert plain[0.0].shape == (10, 10, 1) and plain[0.7].shape == (19, 19, 1)
    conditional = dict(temperature_images(samples, y_condition=True, scale=2))
    assert conditional[0.0].shape == (38, 38, 1)   # one mode per class: all 4 shown

"""The MLflow client of a run: every MLflow call of training goes through one Tracker (rank 0 only).

    tracker = make_tracker(cfg, run_id=state.get("mlflow_run_id"), world_size=n)
    tracker.log_params(run_params(cfg, world_size)); tracker.log_config(cfg)
    tracker.log_metrics({"bits_per_dim/train": 3.4}, step=100)
    tracker.log_image(grid, key="samples/T0.7", step=100)      # the UI's image slider over steps
    tracker.log_checkpoint(path, step=100)                     # uploaded and rotated per tracking.log_checkpoints
    print(tracker.describe())
    tracker.finish("FINISHED")

Where runs go: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a local sqlite store in `tracking.local_dir`
(`make mlflow-ui` shows it). Tracking never stops training once it has started: when the server cannot be reached,
one warning is printed, metrics are buffered in memory (bounded) and retried with backoff, and every metric is also
appended to `<run_dir>/metrics.jsonl`, which is the complete record whatever happens to the server. A server that
refuses the credentials when the run is opened stops training at start (TrackingAuthError, glow_dist/mlflow_auth.py).

A run is created with MLflow's standard tags (mlflow.user, mlflow.source.*, git commit and a git_dirty flag; see
metadata.py), and MLflow's own system metrics (`system/...`: CPU, memory, disk, network, and GPU utilisation and
memory where NVML is present) are sampled while it runs, when psutil is installed and `tracking.system_metrics` is on.

Checkpoints in MLflow (`tracking.log_checkpoints`), after every upload the older ones are deleted from the run:
  none     nothing is uploaded
  last     each checkpoint is uploaded and replaces the previous one: MLflow holds the newest (the default)
  all      each checkpoint is uploaded; MLflow keeps the last `train.keep_checkpoints`, like the local folder
           (`true`, the old boolean spelling, means this; `false` means none)
  every_n  each is uploaded; MLflow keeps those of steps that are multiples of `tracking.log_checkpoints_every`
           (milestones) plus the newest
Uploads run on a thread of their own (glow_dist/tracking/uploads.py), also when the server is away at the first
checkpoint: training does not wait for them, the end of a run does (a stop does not: the checkpoints are in the run's
folder).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from glow_dist.config import Config, dump_yaml, tracking_store
from glow_dist.mlflow_auth import refusal, refused_status
from glow_dist.tracking.metadata import default_run_name, source_tags, split_count, with_evaluation
from glow_dist.tracking.outbox import MAX_BUFFERED_METRICS, Outbox, warn
from glow_dist.tracking.uploads import CheckpointUploads

_PARAM_VALUE_LEN = 6000   # MLflow's limit on a param's value (mlflow/utils/validation.py): longer ones are cut
RUN_VIEW = "?workflowType=machine_learning"   # MLflow 3's UI opens runs in its GenAI view unless told otherwise

# How glow-dist's MLflow client talks to a server (names from mlflow/environment_variables.py, MLflow 3.x); set with
# setdefault by every process that opens a client, so a user's own value wins.
MLFLOW_CLIENT_DEFAULTS = {
    # A dead server must cost seconds, not MLflow's default of 7 retries with backoff and 120 s timeouts.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",   # garbage in launcher logs
    # Files of 500 MB or more (checkpoints, the model's weights) onto a server whose artifacts are on S3: the server
    # hands out presigned part URLs and the parts go to the object store directly, in parallel. Streamed through the
    # server instead, a 2.75 GiB checkpoint was never uploaded: the server copies it on to the store before it
    # answers, longer than the 5 s timeout above; with the timeout raised it took 5x as long (bench/bench_upload.py
    # --store s3, BENCHMARKS.md). Rank 0 then needs to reach the object store's endpoint (no credentials); servers
    # with a local artifact folder answer that they cannot, and the file is streamed to them as before. MLflow 3.17
    # left unset asks the server (/server-info) and gets the same answer from an S3 store; older clients stream.
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
    # 10 MB parts (MLflow's default, pinned): as fast as 32 MB and faster than 100 MB in the same run, and MLflow
    # holds one part per thread in memory (2 threads per core, up to 20)
    "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(10 << 20),
}


def set_client_defaults() -> None:
    for name, value in MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def log_evaluation(cfg: Config, run_id: str | None, step: int, metrics: dict[str, float],
                   tags: dict[str, str], summary: str) -> str:
    """Add a `glow-dist evaluate` result to the run that trained the checkpoint: metrics at the checkpoint's step,
    tags, and `summary` in the description's results. The run's status is left as it is. Returns a line for the
    user; never raises for tracking trouble (the result is printed anyway)."""
    if not run_id:
        return "MLflow: the checkpoint names no run; result not logged"
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    set_client_defaults()
    uri, _ = tracking_store(cfg.tracking)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
        now = int(time.time() * 1000)
        note = with_evaluation(run.data.tags.get("mlflow.note.content", ""), summary)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                         tags=[RunTag(k, str(v)) for k, v in {**tags, "mlflow.note.content": note}.items()])
    except Exception as e:
        if refused_status(e):
            return f"MLflow: result not logged: {refusal(uri, refused_status(e), f'log to run {run_id}')}"
        return f"MLflow: result not logged to run {run_id} at {uri} ({str(e).splitlines()[0][:200]})"
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return (f"MLflow: logged to run {run_id}: "
            f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}{RUN_VIEW}")


class Tracker:
    """An MLflow run plus a local metrics.jsonl; survives an unreachable or vanished tracking server (the Outbox
    keeps and retries what the server has not taken yet). Only rank 0 has one (glow_dist/tracking/reporter.py is
    the rank-0 boundary)."""

    def __init__(self, cfg: Config, run_id: str | None = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        set_client_defaults()
        self._cfg = cfg.tracking
        self._keep_checkpoints = cfg.train.keep_checkpoints
        run_dir = Path(cfg.train.run_dir)
        self._staging = run_dir / "tracking"   # files handed to MLflow live here until uploaded
        self._staging.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (run_dir / "metrics.jsonl").resolve()
        uri, local = tracking_store(cfg.tracking)
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)   # everything of the local store stays in tracking.local_dir
        self._dropped_warned = False
        self._uploads: CheckpointUploads | None = None   # started with the first checkpoint upload
        self._outbox = Outbox(cfg.tracking, uri, (local / "artifacts").as_uri() if local else None, run_id,
                              cfg.tracking.run_name or run_name, {**source_tags(), **(tags or {})}, self.metrics_file)
        self._outbox.flush(force=True)

    @property
    def run_id(self) -> str | None:
        return self._outbox.run_id

    @property
    def uri(self) -> str:
        return self._outbox.uri

    @property
    def experiment_id(self) -> str | None:
        return self._outbox.experiment_id

    @property
    def client(self) -> Any:
        """The MlflowClient of this run's server (calls through it should go through `call`, to be retried)."""
        return self._outbox.client

    def log_params(self, params: dict[str, Any]) -> None:
        self._outbox.params.update({k: str(v)[:_PARAM_VALUE_LEN] for k, v in params.items()})
        self._outbox.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}
        # The complete local record, written before any network call; one JSON object per line
        # (non-finite values appear as NaN/Infinity, which Python's json reads back).
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "time_ms": now_ms, "metrics": values}) + "\n")
        buffered = self._outbox.metrics
        if len(buffered) + len(values) > MAX_BUFFERED_METRICS and not self._dropped_warned:
            warn(f"over {MAX_BUFFERED_METRICS} metric values buffered; dropping the oldest from the MLflow "
                 f"buffer (they stay in {self.metrics_file})")
            self._dropped_warned = True
        buffered.extend(Metric(k, v, now_ms, step) for k, v in values.items())
        self._outbox.flush()

    def call(self, what: str, fn: Callable[[], Any], needs: Path | None = None) -> None:
        """Run fn() against the server now, or later in order with everything else when it is away (skipped if the
        file `needs` is gone by then)."""
        self._outbox.calls.append((what, fn, needs))
        self._outbox.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()

        def upload() -> None:
            log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
            log(self.run_id, str(path), artifact_path)

        self.call(f"artifact {path}", upload, path)

    def log_image(self, image: str | Path | np.ndarray, artifact_file: str | None = None, key: str | None = None,
                  step: int | None = None) -> None:
        """An image file or an HxWxC (or HxW) uint8 array. With `key` (and `step`): MLflow's time-stepped image
        (the run page's image grid with a step slider, comparable across runs); else a plain artifact file."""
        from PIL import Image

        name = artifact_file or f"images/{key.replace('/', '_')}_step{step or 0:08d}.png"
        staged = self._staging / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, np.ndarray):
            Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(staged)
        else:
            shutil.copyfile(image, staged)
        if key is None:
            self.log_artifact(staged, str(Path(name).parent) if Path(name).parent.name else None)
            return
        timestamp = int(time.time() * 1000)   # when it was made, even if the server sees it later

        def upload() -> None:
            with Image.open(staged) as img:
                self.client.log_image(self.run_id, img.copy(), key=key, step=step or 0, timestamp=timestamp)
            staged.unlink(missing_ok=True)

        self.call(f"image {key} step {step}", upload, staged)

    def log_checkpoint(self, path: str | Path, step: int) -> None:
        """Upload a checkpoint and its checksum under `checkpoints/`, then delete the uploaded checkpoints that
        `tracking.log_checkpoints` no longer keeps: always on the upload thread (glow_dist/tracking/uploads.py), so
        that training goes on meanwhile, also while the run is not on the server yet (the thread waits for it)."""
        if self._cfg.log_checkpoints == "none":
            return
        if self._uploads is None:
            self._uploads = CheckpointUploads(self._find_artifact_repository, self._cfg.log_checkpoints,
                                              self._cfg.log_checkpoints_every, self._keep_checkpoints)
        self._uploads.put(Path(path).resolve(), step)

    def _find_artifact_repository(self) -> Any:
        """The run's artifact store, for the upload thread: with a client of its own (the training thread's is the
        Outbox's), once the Outbox has the run on the server."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.tracking import MlflowClient

        run_id = self._outbox.run_id if self._outbox.ready else None
        if run_id is None:
            raise ConnectionError(f"the run is not on the MLflow server at {self.uri} yet")
        uri = MlflowClient(tracking_uri=self.uri).get_run(run_id).info.artifact_uri
        return get_artifact_repository(uri, tracking_uri=self.uri)

    def artifact_repository(self) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri, tracking_uri=self.uri)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._outbox.tags.update({k: str(v) for k, v in tags.items()})
        self._outbox.flush()

    def log_config(self, cfg: Config) -> None:
        """The resolved config as a `config.yaml` artifact at the root of the run."""
        staged = self._staging / "config.yaml"
        staged.write_text(dump_yaml(cfg))
        self.log_artifact(staged)

    def log_dataset(self, dataset: Any, context: str) -> None:
        """An `mlflow.data` Dataset as an input of the run (the run page's Datasets), tagged with its use."""
        from mlflow.entities import DatasetInput, InputTag

        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.call(f"dataset {dataset.name}", lambda: self.client.log_inputs(self.run_id, datasets=[entity]))

    def finish(self, status: str = "FINISHED", wait_for_uploads: bool = True) -> None:
        """Send what is left (one last try) and close the run with FINISHED, FAILED or KILLED. Checkpoint uploads
        still queued are finished first, unless `wait_for_uploads` is false (a stop: the scheduler's grace is for
        the stop checkpoint; they are all in the run's checkpoint folder)."""
        if self._uploads is not None:
            if wait_for_uploads and not self._outbox.ready:
                self._outbox.flush(force=True)   # the run on the server first: the upload thread needs it
            left = self._uploads.close(wait=wait_for_uploads)
            if left:
                warn(f"checkpoint(s) of step {', '.join(map(str, left))} not uploaded to MLflow (the run "
                     f"{'stopped' if not wait_for_uploads else 'ended'} first); they are in {self._staging.parent}"
                     "/checkpoints while train.keep_checkpoints keeps them")
            self._uploads = None
        self._outbox.close(status)

    def url(self) -> str:
        """Address of the run in the MLflow UI's model-training view (for the local store, once `make mlflow-ui`
        is running)."""
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        if not self._outbox.ready:
            return base
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}{RUN_VIEW}"

    def describe(self) -> str:
        """One line telling the user where to look."""
        where = f"MLflow run {self.run_id} at {self.url()}"
        if self.uri.startswith("sqlite:"):
            where += (f" after `make mlflow-ui` (default tracking.local_dir) or "
                      f"`mlflow ui --backend-store-uri {self.uri}`")
        if not self._outbox.ready:
            where = f"MLflow at {self.uri} not reachable yet"
        return f"{where}; every metric also in {self.metrics_file}"


    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # A crash marks the run FAILED and Ctrl-C marks it KILLED, so the UI never shows a dead run as RUNNING.
        status = "FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED"
        self.finish(status)


def make_tracker(cfg: Config, run_id: str | None = None, world_size: int = 1,
                 tags: dict[str, str] | None = None) -> Tracker:
    """The MLflow tracker of a run: `run_id` resumes that run; a new run is named by tracking.run_name or
    <config>-<world_size>ranks|gpu-<UTC time>, and created with `tags`."""
    import torch

    return Tracker(cfg, run_id, default_run_name(cfg, world_size, torch.cuda.is_available()), tags)


def shards_dataset(root: str | Path, split: str, manifest: dict) -> Any:
    """One split of a prepared data set as an `mlflow.data` Dataset: source = the folder, digest = the shards'
    sha256 values from the manifest, profile = counts and image shape."""
    from mlflow.data.dataset import Dataset
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    class ShardDataset(Dataset):
        def _compute_digest(self) -> str:
            shards = manifest["splits"].get(split, {}).get("shards", [])
            joined = "".join(s.get("sha256", s.get("file", "")) for s in shards)
            return hashlib.sha256(joined.encode()).hexdigest()[:16]

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile), "schema": json.dumps(self.schema)}

        @property
        def profile(self) -> dict:
            return {"num_images": split_count(manifest, split), "image_size": manifest.get("image_size"),
                    "channels": manifest.get("channels"), "source": manifest.get("source"),
                    "shards": len(manifest["splits"].get(split, {}).get("shards", []))}

        @property
        def schema(self) -> dict:
            return {"image": f"uint8[{manifest.get('channels')},{manifest.get('image_size')},"
                              f"{manifest.get('image_size')}] (png/jpeg in WebDataset tar shards)",
                    "cls": "int (-1: unlabeled)"}

    name = f"{Path(root).resolve().name}-{split}"
    with warnings.catch_warnings():   # "can be interpreted in multiple ways": both candidates are the local one
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(root).resolve()))
    return ShardDataset(source, name=name)

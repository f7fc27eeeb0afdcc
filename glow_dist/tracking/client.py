"""The MLflow client of a run: every MLflow call of training goes through one Tracker (rank 0 only).

    tracker = make_tracker(cfg, run_id=state.get("mlflow_run_id"), world_size=n)
    tracker.log_params(run_params(cfg, world_size)); tracker.log_config(cfg)
    tracker.log_metrics({"bits_per_dim/train": 3.4}, step=100)
    tracker.log_image(grid, key="samples/T0.7", step=100)      # the UI's image slider over steps
    tracker.log_checkpoint(path, step=100)                     # uploaded and rotated per tracking.log_checkpoints
    print(tracker.describe())
    tracker.finish("FINISHED")

Where runs go: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a local sqlite store in `tracking.local_dir`
(`make mlflow-ui` shows it). Tracking never stops training: when the server cannot be reached, one warning is
printed, metrics are buffered in memory (bounded) and retried with backoff, and every metric is also appended to
`<run_dir>/metrics.jsonl`, which is the complete record whatever happens to the server.

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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from glow_dist.config import Config, dump_yaml, tracking_store
from glow_dist.tracking.metadata import default_run_name, source_tags, split_count, with_evaluation

MAX_BUFFERED_METRICS = 100_000       # values held while the server is away (metrics.jsonl keeps everything)
MAX_BUFFERED_ARTIFACTS = 1_000
FIRST_RETRY_S, MAX_RETRY_S = 30.0, 600.0
_PARAM_BATCH, _METRIC_BATCH, _PARAM_VALUE_LEN = 100, 1000, 6000   # MLflow's limits (mlflow/utils/validation.py)
# Errors that mean "not reachable right now": keep the data and retry. Anything else MLflow raises is a rejection.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
_CHECKPOINT_ARTIFACT = re.compile(r"^checkpoints/ckpt-(\d{8})\.pt$")
RUN_VIEW = "?workflowType=machine_learning"   # MLflow 3's UI opens runs in its GenAI view unless told otherwise


def checkpoints_to_keep(steps: list[int], policy: str, every: int = 0, keep: int = 0) -> set[int]:
    """Of the checkpoint steps uploaded to a run, those `tracking.log_checkpoints` keeps (see the module doc)."""
    if not steps or policy == "none":
        return set()
    newest = max(steps)
    if policy == "last":
        return {newest}
    if policy == "all":
        return set(sorted(steps)[-keep:]) if keep > 0 else set(steps)
    if policy == "every_n":
        return {s for s in steps if every > 0 and s % every == 0} | {newest}
    raise ValueError(f"tracking.log_checkpoints={policy!r}: expected none, last, all or every_n")


def log_evaluation(cfg: Config, run_id: str | None, step: int, metrics: dict[str, float],
                   tags: dict[str, str], summary: str) -> str:
    """Add a `glow-dist evaluate` result to the run that trained the checkpoint: metrics at the checkpoint's step,
    tags, and `summary` in the description's results. The run's status is left as it is. Returns a line for the
    user; never raises for tracking trouble (the result is printed anyway)."""
    if not run_id:
        return "MLflow: the checkpoint names no run; result not logged"
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri, _ = tracking_store(cfg.tracking)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
        now = int(time.time() * 1000)
        note = with_evaluation(run.data.tags.get("mlflow.note.content", ""), summary)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                         tags=[RunTag(k, str(v)) for k, v in {**tags, "mlflow.note.content": note}.items()])
    except Exception as e:
        return f"MLflow: result not logged to run {run_id} at {uri} ({str(e).splitlines()[0][:200]})"
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return (f"MLflow: logged to run {run_id}: "
            f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}{RUN_VIEW}")


def _warn(message: str) -> None:
    print(f"[tracking] WARNING: {message}", file=sys.stderr, flush=True)


def _is_transient(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return not isinstance(error, MlflowException) or error.error_code in _TRANSIENT_CODES


class Tracker:
    """An MLflow run plus a local metrics.jsonl; survives an unreachable or vanished tracking server. Only rank 0
    has one (glow_dist/tracking/reporter.py is the rank-0 boundary)."""

    def __init__(self, cfg: Config, run_id: str | None = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        # A dead server must cost seconds, not MLflow's default of 7 retries with backoff and 120 s timeouts;
        # setdefault keeps values the user chose. (Names from mlflow/environment_variables.py, MLflow 3.x.)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # garbage in launcher logs
        self._cfg = cfg.tracking
        self._keep_checkpoints = cfg.train.keep_checkpoints
        self._run_name = cfg.tracking.run_name or run_name
        self._create_tags = {**source_tags(), **(tags or {})}   # set when this run is created, not on resume
        self._run_dir = Path(cfg.train.run_dir)
        self._staging = self._run_dir / "tracking"   # files handed to MLflow live here until uploaded
        self._staging.mkdir(parents=True, exist_ok=True)
        self.metrics_file = (self._run_dir / "metrics.jsonl").resolve()
        self.uri, self._artifact_location = self._resolve_uri()
        self._client = MlflowClient(tracking_uri=self.uri)
        self.run_id = run_id
        self.experiment_id: str | None = None
        self._run_ready = False           # the run exists (created or resumed) on the server
        self._online = False
        self._next_retry = 0.0
        self._retry_delay = FIRST_RETRY_S
        self._finished = False
        self._existing_params: dict[str, str] = {}
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._metrics: deque = deque(maxlen=MAX_BUFFERED_METRICS)
        # Uploads, images, deletions and other calls, in order: (what, call, file that must still exist or None).
        self._calls: deque[tuple[str, Callable[[], Any], Path | None]] = deque(maxlen=MAX_BUFFERED_ARTIFACTS)
        self._dropped_warned = False
        self._system_metrics: Any = None
        self._flush(force=True)

    def _resolve_uri(self) -> tuple[str, str | None]:
        uri, local = tracking_store(self._cfg)
        if local is None:
            return uri, None
        local.mkdir(parents=True, exist_ok=True)
        return uri, (local / "artifacts").as_uri()   # everything of the local store stays in tracking.local_dir

    # ---- connection and buffering -------------------------------------------------------------------------
    def _connect(self) -> None:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(self._cfg.experiment)
        if exp is None:
            try:
                self.experiment_id = self._client.create_experiment(
                    self._cfg.experiment, artifact_location=self._artifact_location)
            except MlflowException as e:  # another job created it between our two calls
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                self.experiment_id = self._client.get_experiment_by_name(self._cfg.experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or "mlflow.experimentKind" not in exp.tags:
            # The experiment page then opens on training runs, not MLflow 3's GenAI default.
            self._client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        if self.run_id is not None:
            try:
                run = self._client.get_run(self.run_id)
                self._existing_params = dict(run.data.params)
                self._client.update_run(self.run_id, status="RUNNING")
                self._run_ready = True
                self._start_system_metrics(resume=True)
                return
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                _warn(f"run {self.run_id} is not in {self.uri}; starting a new run (tag resumed_from)")
                self._tags["resumed_from"] = self.run_id
        run = self._client.create_run(self.experiment_id, run_name=self._run_name or None, tags=self._create_tags)
        self.run_id = run.info.run_id
        self._run_ready = True
        self._start_system_metrics(resume=False)

    def _start_system_metrics(self, resume: bool) -> None:
        """MLflow's own sampler (`system/...` metrics every 10 s), when asked for and psutil is there."""
        if not self._cfg.system_metrics or self._system_metrics is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil missing: say it once, train anyway
            print(f"[tracking] no system metrics ({e}); `pip install psutil nvidia-ml-py` to get them", flush=True)
            return
        # MLflow logs at INFO that it skips GPU metrics without NVML; that is expected on CPU ranks.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._system_metrics = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
        self._system_metrics.start()

    def _attempt(self, what: str, call: Any, *args: Any, **kwargs: Any) -> bool:
        """Run call(*args, **kwargs); on failure warn (once per outage) and schedule a retry. True on success."""
        try:
            call(*args, **kwargs)
        except Exception as e:
            if not _is_transient(e) and self._run_ready:
                _warn(f"MLflow rejected {what} ({e}); dropped it (metrics.jsonl still has every metric)")
                return True   # retrying cannot help; move on to the rest of the buffer
            if self._online or self._next_retry == 0.0:
                _warn(
                    f"MLflow tracking at {self.uri} is unreachable ({str(e).splitlines()[0][:300]}). Training "
                    f"continues; metrics are buffered and retried, and all are written to {self.metrics_file}. "
                    "Fix: start the server (or check the network), or set tracking.uri / MLFLOW_TRACKING_URI to "
                    "a reachable one; tracking.uri='' with MLFLOW_TRACKING_URI unset uses the local sqlite store."
                )
            else:
                self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_S)  # back off while it stays away
            self._online = False
            self._next_retry = time.monotonic() + self._retry_delay
            return False
        if not self._online:
            if self._next_retry:
                print(f"[tracking] MLflow at {self.uri} reachable again; sending buffered data", flush=True)
            self._online, self._retry_delay = True, FIRST_RETRY_S
        return True

    def _flush(self, force: bool = False) -> None:
        """Send what is buffered; while offline, only when the retry time has come (or `force`)."""
        if self._finished or (not self._online and not force and time.monotonic() < self._next_retry):
            return
        if not self._run_ready and not (self._attempt("run creation", self._connect) and self._run_ready):
            return
        from mlflow.entities import Param, RunTag

        self._drop_changed_params()
        while self._params:
            keys = list(self._params)[:_PARAM_BATCH]
            batch = [Param(k, self._params[k]) for k in keys]
            if not self._attempt("params", self._client.log_batch, self.run_id, params=batch):
                return
            self._existing_params.update({k: self._params.pop(k) for k in keys})
        while self._tags:
            keys = list(self._tags)[:_PARAM_BATCH]
            batch = [RunTag(k, self._tags[k]) for k in keys]
            if not self._attempt("tags", self._client.log_batch, self.run_id, tags=batch):
                return
            for k in keys:
                self._tags.pop(k)
        while self._metrics:
            batch = [self._metrics[i] for i in range(min(_METRIC_BATCH, len(self._metrics)))]
            if not self._attempt("metrics", self._client.log_batch, self.run_id, metrics=batch):
                return
            for _ in batch:
                self._metrics.popleft()
        while self._calls:
            what, call, needs = self._calls[0]
            if (needs is None or needs.exists()) and not self._attempt(what, call):
                return
            self._calls.popleft()   # a file deleted meanwhile (rotated checkpoint) is simply skipped

    def _drop_changed_params(self) -> None:
        # MLflow params are write-once: a resumed run with a changed value would be rejected. Keep the original.
        changed = [k for k, v in self._params.items() if k in self._existing_params and self._existing_params[k] != v]
        if changed:
            _warn(f"params changed since the run started, kept the original values: {', '.join(changed)} "
                  "(the new config is in the config.yaml artifact)")
        for k in [k for k in self._params if k in self._existing_params]:
            self._params.pop(k)

    # ---- the trainer-facing API ---------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._params.update({k: str(v)[:_PARAM_VALUE_LEN] for k, v in params.items()})
        self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}
        # The complete local record, written before any network call; one JSON object per line
        # (non-finite values appear as NaN/Infinity, which Python's json reads back).
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "time_ms": now_ms, "metrics": values}) + "\n")
        if len(self._metrics) + len(values) > MAX_BUFFERED_METRICS and not self._dropped_warned:
            _warn(f"over {MAX_BUFFERED_METRICS} metric values buffered; dropping the oldest from the MLflow "
                  f"buffer (they stay in {self.metrics_file})")
            self._dropped_warned = True
        self._metrics.extend(Metric(k, v, now_ms, step) for k, v in values.items())
        self._flush()

    def call(self, what: str, fn: Callable[[], Any]) -> None:
        """Run fn() against the server now, or later in order with everything else when it is away."""
        self._calls.append((what, fn, None))
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()

        def upload() -> None:
            log = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
            log(self.run_id, str(path), artifact_path)

        self._calls.append((f"artifact {path}", upload, path))
        self._flush()

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
                self._client.log_image(self.run_id, img.copy(), key=key, step=step or 0, timestamp=timestamp)
            staged.unlink(missing_ok=True)

        self._calls.append((f"image {key} step {step}", upload, staged))
        self._flush()

    def log_checkpoint(self, path: str | Path, step: int | None = None) -> None:
        """Upload a checkpoint and its checksum under `checkpoints/`, then delete the uploaded checkpoints that
        `tracking.log_checkpoints` no longer keeps."""
        if self._cfg.log_checkpoints == "none":
            return
        self.log_artifact(path, "checkpoints")
        sidecar = Path(str(path) + ".sha256")
        if sidecar.exists():
            self.log_artifact(sidecar, "checkpoints")
        self.call("checkpoint rotation", self._rotate_checkpoints)

    def _rotate_checkpoints(self) -> None:
        # Read the run's checkpoint list from MLflow itself, so checkpoints uploaded before a resume rotate too.
        names = [a.path for a in self._client.list_artifacts(self.run_id, "checkpoints")]
        steps = {int(m.group(1)): p for p in names if (m := _CHECKPOINT_ARTIFACT.match(p))}
        keep = checkpoints_to_keep(list(steps), self._cfg.log_checkpoints, self._cfg.log_checkpoints_every,
                                   self._keep_checkpoints)
        stale = [p for s, p in steps.items() if s not in keep]
        if not stale:
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(self._client.get_run(self.run_id).info.artifact_uri, tracking_uri=self.uri)
        for path in stale:
            for name in (path + ".sha256", path):   # sidecar first, as the local rotation does
                if name == path or name in names:
                    repo.delete_artifacts(name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._tags.update({k: str(v) for k, v in tags.items()})
        self._flush()

    def log_config(self, cfg: Config) -> None:
        """The resolved config as a `config.yaml` artifact at the root of the run."""
        staged = self._staging / "config.yaml"
        staged.write_text(dump_yaml(cfg))
        self.log_artifact(staged)

    def log_dataset(self, dataset: Any, context: str) -> None:
        """An `mlflow.data` Dataset as an input of the run (the run page's Datasets), tagged with its use."""
        from mlflow.entities import DatasetInput, InputTag

        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.call(f"dataset {dataset.name}", lambda: self._client.log_inputs(self.run_id, datasets=[entity]))

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left (one last try) and close the run with FINISHED, FAILED or KILLED."""
        if self._finished:
            return
        if self._system_metrics is not None:
            self._system_metrics.finish()   # its last samples go in before the run is closed
            self._system_metrics = None
        self._flush(force=True)
        if self._run_ready and self._online:
            self._attempt("run status", self._client.set_terminated, self.run_id, status=status)
        pending = len(self._metrics) + len(self._params) + len(self._tags) + len(self._calls)
        if pending:
            _warn(f"{pending} tracking items never reached {self.uri}; metrics are all in {self.metrics_file}")
        self._finished = True

    def url(self) -> str:
        """Address of the run in the MLflow UI's model-training view (for the local store, once `make mlflow-ui`
        is running)."""
        base = self.uri if self.uri.startswith("http") else "http://127.0.0.1:5000"
        if not self._run_ready:
            return base
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}{RUN_VIEW}"

    def describe(self) -> str:
        """One line telling the user where to look."""
        where = f"MLflow run {self.run_id} at {self.url()}"
        if self.uri.startswith("sqlite:"):
            where += (f" after `make mlflow-ui` (default tracking.local_dir) or "
                      f"`mlflow ui --backend-store-uri {self.uri}`")
        if not self._run_ready:
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

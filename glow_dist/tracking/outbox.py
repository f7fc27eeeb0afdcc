"""What waits to reach the MLflow server: the run itself, params, tags, metrics and calls (uploads, images,
deletions), sent in order while the server answers, kept and retried with backoff while it does not.

    outbox = Outbox(cfg.tracking, uri, artifact_location, run_id=None, run_name="digits-...", tags={...},
                    metrics_file=Path("run/metrics.jsonl"))
    outbox.params.update({...}); outbox.flush()
    outbox.close("FINISHED")

A dead server costs seconds: one warning per outage, every call tried once per retry time (30 s, doubling to 10
minutes), buffers bounded. A rejection (not a transient error) drops that item with a warning instead of blocking
the rest. A server that refuses these credentials or this user when the run is opened (HTTP 401/403) is no outage:
TrackingAuthError, so training fails at start with what to set (glow_dist/mlflow_auth.py) instead of training for
days unlogged. Used by glow_dist/tracking/client.py's Tracker only.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glow_dist.config import TrackingConfig
from glow_dist.mlflow_auth import TrackingAuthError, refusal, refused_status

MAX_BUFFERED_METRICS = 100_000       # values held while the server is away (metrics.jsonl keeps everything)
MAX_BUFFERED_CALLS = 1_000
FIRST_RETRY_S, MAX_RETRY_S = 30.0, 600.0
_PARAM_BATCH, _METRIC_BATCH = 100, 1000   # MLflow's limits (mlflow/utils/validation.py)
# Errors that mean "not reachable right now": keep the data and retry. Anything else MLflow raises is a rejection.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


def warn(message: str) -> None:
    print(f"[tracking] WARNING: {message}", file=sys.stderr, flush=True)


def is_transient(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return not isinstance(error, MlflowException) or error.error_code in _TRANSIENT_CODES


class Outbox:
    def __init__(self, cfg: TrackingConfig, uri: str, artifact_location: str | None, run_id: str | None,
                 run_name: str | None, tags: dict[str, str], metrics_file: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.cfg, self.uri, self.metrics_file = cfg, uri, metrics_file
        self._artifact_location, self._run_name, self._create_tags = artifact_location, run_name, tags
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.experiment_id: str | None = None
        self.ready = False                # the run exists (created or resumed) on the server
        self.online = False
        self._next_retry = 0.0
        self._retry_delay = FIRST_RETRY_S
        self._closed = False
        self._existing_params: dict[str, str] = {}
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metrics: deque = deque(maxlen=MAX_BUFFERED_METRICS)
        # Uploads, images, deletions and other calls, in order: (what, call, file that must still exist or None).
        self.calls: deque[tuple[str, Callable[[], Any], Path | None]] = deque(maxlen=MAX_BUFFERED_CALLS)
        self._system_metrics: Any = None

    def _connect(self) -> None:
        """Find or make the experiment, then resume the run (or create it; a run id the server does not know
        starts a new run tagged `resumed_from`)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    self.cfg.experiment, artifact_location=self._artifact_location)
            except MlflowException as e:  # another job created it between our two calls
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                self.experiment_id = self.client.get_experiment_by_name(self.cfg.experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or "mlflow.experimentKind" not in exp.tags:
            # The experiment page then opens on training runs, not MLflow 3's GenAI default.
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        if self.run_id is not None:
            try:
                run = self.client.get_run(self.run_id)
                self._existing_params = dict(run.data.params)
                self.client.update_run(self.run_id, status="RUNNING")
                self.ready = True
                self._start_system_metrics(resume=True)
                return
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warn(f"run {self.run_id} is not in {self.uri}; starting a new run (tag resumed_from)")
                self.tags["resumed_from"] = self.run_id
        run = self.client.create_run(self.experiment_id, run_name=self._run_name or None, tags=self._create_tags)
        self.run_id = run.info.run_id
        self.ready = True
        self._start_system_metrics(resume=False)

    def _start_system_metrics(self, resume: bool) -> None:
        """MLflow's own sampler (`system/...` metrics every 10 s), when asked for and psutil is there."""
        if not self.cfg.system_metrics or self._system_metrics is not None:
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

    def attempt(self, what: str, call: Any, *args: Any, **kwargs: Any) -> bool:
        """Run call(*args, **kwargs); on failure warn (once per outage) and schedule a retry. True on success."""
        try:
            call(*args, **kwargs)
        except Exception as e:
            status = refused_status(e)
            if status and not self.ready:
                action = f"open the run in experiment {self.cfg.experiment!r}"
                raise TrackingAuthError(f"{refusal(self.uri, status, action)}. Training did not start; `glow-dist "
                                        "doctor` checks the credentials") from None
            if status != 401 and not is_transient(e) and self.ready:
                warn(f"MLflow rejected {what} ({e}); dropped it (metrics.jsonl still has every metric)")
                return True   # retrying cannot help; move on to the rest of the buffer
            if (self.online or self._next_retry == 0.0) and status:
                # 401 mid-run (the password was changed on the server): the run is shut out, as in an outage.
                warn(f"{refusal(self.uri, status, f'send {what}')}. Training continues; metrics are buffered and "
                     f"retried, and all are written to {self.metrics_file}")
            elif self.online or self._next_retry == 0.0:
                warn(
                    f"MLflow tracking at {self.uri} is unreachable ({str(e).splitlines()[0][:300]}). Training "
                    f"continues; metrics are buffered and retried, and all are written to {self.metrics_file}. "
                    "Fix: start the server (or check the network), or set tracking.uri / MLFLOW_TRACKING_URI to "
                    "a reachable one; tracking.uri='' with MLFLOW_TRACKING_URI unset uses the local sqlite store."
                )
            else:
                self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_S)  # back off while it stays away
            self.online = False
            self._next_retry = time.monotonic() + self._retry_delay
            return False
        if not self.online:
            if self._next_retry:
                print(f"[tracking] MLflow at {self.uri} reachable again; sending buffered data", flush=True)
            self.online, self._retry_delay = True, FIRST_RETRY_S
        return True

    def flush(self, force: bool = False) -> None:
        """Send what is buffered; while offline, only when the retry time has come (or `force`)."""
        if self._closed or (not self.online and not force and time.monotonic() < self._next_retry):
            return
        if not self.ready and not (self.attempt("run creation", self._connect) and self.ready):
            return
        from mlflow.entities import Param, RunTag

        self._drop_changed_params()
        while self.params:
            keys = list(self.params)[:_PARAM_BATCH]
            if not self.attempt("params", self.client.log_batch, self.run_id,
                                params=[Param(k, self.params[k]) for k in keys]):
                return
            self._existing_params.update({k: self.params.pop(k) for k in keys})
        while self.tags:
            keys = list(self.tags)[:_PARAM_BATCH]
            if not self.attempt("tags", self.client.log_batch, self.run_id,
                                tags=[RunTag(k, self.tags[k]) for k in keys]):
                return
            for k in keys:
                self.tags.pop(k)
        while self.metrics:
            batch = [self.metrics[i] for i in range(min(_METRIC_BATCH, len(self.metrics)))]
            if not self.attempt("metrics", self.client.log_batch, self.run_id, metrics=batch):
                return
            for _ in batch:
                self.metrics.popleft()
        while self.calls:
            what, call, needs = self.calls[0]
            if (needs is None or needs.exists()) and not self.attempt(what, call):
                return
            self.calls.popleft()   # a file deleted meanwhile (rotated checkpoint) is simply skipped

    def _drop_changed_params(self) -> None:
        # MLflow params are write-once: a resumed run with a changed value would be rejected. Keep the original.
        changed = [k for k, v in self.params.items() if k in self._existing_params and self._existing_params[k] != v]
        if changed:
            warn(f"params changed since the run started, kept the original values: {', '.join(changed)} "
                 "(the new config is in the config.yaml artifact)")
        for k in [k for k in self.params if k in self._existing_params]:
            self.params.pop(k)

    def close(self, status: str) -> None:
        """Send what is left (one last try) and end the run with FINISHED, FAILED or KILLED."""
        if self._closed:
            return
        if self._system_metrics is not None:
            self._system_metrics.finish()   # its last samples go in before the run is closed
            self._system_metrics = None
        self.flush(force=True)
        if self.ready and self.online:
            self.attempt("run status", self.client.set_terminated, self.run_id, status=status)
        pending = len(self.metrics) + len(self.params) + len(self.tags) + len(self.calls)
        if pending:
            warn(f"{pending} tracking items never reached {self.uri}; metrics are all in {self.metrics_file}")
        self._closed = True

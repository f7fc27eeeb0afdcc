"""The rank-0 boundary: everything only rank 0 does (progress bar, MLflow run, tags, stop reasons, the run's
description, sample grids, checkpoint uploads, the final model) behind one object.

    report = make_reporter(cfg, main=dist.is_main(), run_id=resumed_run_id, world_size=n, start_step=step)
    report.start(RunFacts(world_size=n, hosts=h, data=loader.describe_short(), ...), resumed_from=path)
    report.metrics({...}, step); report.samples(model, step); report.checkpoint_saved(path, state)
    report.stopped("SIGTERM", step, path); report.finish("KILLED")
    report.failed(job_failure); report.finish("FAILED")   # a lost peer, bad data: glow_dist/failures.py

The training loop calls the same methods on every rank; `NullReporter` makes them no-ops off the main rank, so the
loop never tests its rank. Under elastic training rank 0 can move to another process: `report.for_rank(main, ...)`
hands the reporter over (a NullReporter becomes a Reporter on the new rank 0, and a former rank 0's closes).

What the MLflow run page gets from here: params that matter (metadata.run_params), the data set as inputs, a
markdown description with the final bits/dim and the commands to resume and sample, one time-stepped image per
sampling temperature (`samples/T0.7`: the UI's step slider), checkpoints per `tracking.log_checkpoints`, and at the
end of a completed run the final EMA weights as an MLflow model (glow_dist/tracking/mlflow_model.py).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from glow_dist.config import Config, save_config
from glow_dist.failures import JobFailure
from glow_dist.inference.decoding import Decoder, display_scale, image_grid, sample_images, save_png
from glow_dist.model import Glow
from glow_dist.tracking import metadata
from glow_dist.tracking.client import Tracker, make_tracker, shards_dataset

NOTE_TAG = "mlflow.note.content"   # the run's description in the MLflow UI


class RunFacts(NamedTuple):
    """What a (re)started run is made of, for its tags: the same fields on every start path."""
    world_size: int
    hosts: int
    data_backend: str
    data_decode: str
    elastic: bool = False
    memory: str = ""        # runtime.memory as resolved for this device (auto: plain or checkpoint)


class NullReporter:
    run_id: str | None = None

    def for_rank(self, main: bool, cfg: Config, run_id: str | None, world_size: int,
                 start_step: int) -> NullReporter:
        """The reporter this process should hold now that it is (or is not) rank 0."""
        return make_reporter(cfg, main, run_id, world_size, start_step) if main else self

    def start(self, facts: RunFacts, resumed_from: str | None) -> None: ...
    def step(self, step: int) -> None: ...
    def metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def samples(self, model: Glow, step: int, note: str = "") -> None: ...
    def checkpoint_saved(self, path: Path, state: dict, upload: bool = True) -> None: ...
    def stopped(self, reason: str, step: int, checkpoint: Path | None, seconds: float | None = None) -> None: ...
    def tags(self, tags: dict[str, str]) -> None: ...
    def failed(self, failure: JobFailure) -> None: ...
    def message(self, text: str) -> None: ...
    def results(self, line: str) -> None: ...
    def bad_samples(self, rows: list[dict], step: int) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def make_reporter(cfg: Config, main: bool, run_id: str | None, world_size: int, start_step: int) -> NullReporter:
    """A Reporter with its MLflow run (resumed when `run_id` is given) on the main rank, a NullReporter elsewhere."""
    if not main:
        return NullReporter()
    return Reporter(cfg, make_tracker(cfg, run_id=run_id, world_size=world_size), start_step)


def _is_test_metric(name: str) -> bool:
    return name.startswith("bits_per_dim/test") or name == "test/bpd"


def temperature_images(samples: list[tuple[float, torch.Tensor]], y_condition: bool,
                       scale: int) -> list[tuple[float, np.ndarray]]:
    """One square grid (uint8 HxWxC, enlarged `scale` times) per temperature from its samples. At T=0 every draw is
    the prior's mode, so an unconditional model gets one image there instead of n copies of it."""
    grids = []
    for t, images in samples:
        if t == 0 and not y_condition:
            images = images[:1]
        grid = image_grid(images, ncols=math.ceil(math.sqrt(len(images))))
        grids.append((t, grid.repeat(scale, axis=0).repeat(scale, axis=1)))
    return grids


class Reporter(NullReporter):
    def __init__(self, cfg: Config, tracker: Tracker, start_step: int):
        self.cfg = cfg
        self.tracker = tracker
        self.run_dir = Path(cfg.train.run_dir)
        self.run_id = tracker.run_id
        self._bar = None
        self._start = (time.monotonic(), start_step)
        # A live bar on a terminal; under horovodrun or a batch scheduler (no TTY) the same bar as one line per
        # log interval, since carriage-return redraws turn into garbage once a launcher prefixes every line.
        self._text_bar = cfg.train.progress and not sys.stderr.isatty()
        if cfg.train.progress and not self._text_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        self._last_line = 0.0
        self._note = ""
        self._last_test: dict[str, tuple[int, float]] = {}     # test metric -> (step, value), for the description
        self._final_state: dict | None = None                  # the newest checkpoint's EMA weights and config
        self._decoders: dict[int, Decoder] = {}               # id(model) -> its sample-grid decoder
        self._decode_tagged: dict[str, str] = {}              # the decode-mode tags set last
        self._stopped = False                                  # a stop signal ended the run

    def for_rank(self, main: bool, cfg: Config, run_id: str | None, world_size: int,
                 start_step: int) -> NullReporter:
        if main:
            return self
        self.finish("FINISHED")  # no longer rank 0: the new rank 0 reopens the same MLflow run
        return NullReporter()

    def start(self, facts: RunFacts, resumed_from: str | None) -> None:
        """Config, params, tags, description and data sets of the run; one line on where it stands."""
        cfg = self.cfg
        save_config(cfg, self.run_dir / "config.yaml")
        self.tracker.log_params(metadata.run_params(cfg, facts.world_size, facts.hosts))
        manifest = metadata.read_manifest_or_none(cfg.data.root)
        self._note = metadata.description(cfg, facts.world_size, manifest, self.run_id, metadata.command_line())
        tags = {"hosts": str(facts.hosts), "gpu_type": metadata.gpu_type(), "world_size": str(facts.world_size),
                "data.backend": facts.data_backend, "data.decode": facts.data_decode,
                "elastic": str(facts.elastic).lower(), **metadata.git_tags()}
        if facts.memory:
            tags["runtime.memory"] = facts.memory
        self.tracker.set_tags({**tags, NOTE_TAG: self._note})
        self.tracker.log_config(cfg)
        if manifest is not None:
            for split, context in (("train", "training"), ("test", "evaluation")):
                self.tracker.log_dataset(shards_dataset(cfg.data.root, split, manifest), context)
        resumed = f" | resumed from {resumed_from}" if resumed_from else ""
        self.message(f"run dir {self.run_dir} | world size {facts.world_size} | "
                     f"global batch {facts.world_size * cfg.train.batch_size}{resumed}")
        self.message(f"MLflow run: {self.tracker.url()}")

    def step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        self._last_test.update({k: (step, v) for k, v in metrics.items() if _is_test_metric(k)})
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.set_postfix_str(shown, refresh=False)
        if self._text_bar:
            from tqdm import tqdm

            t0, step0 = self._start
            bar = tqdm.format_meter(step - step0, self.cfg.train.steps - step0, time.monotonic() - t0, ncols=60,
                                    prefix="train", unit="step", ascii=True)
            self.message(f"{bar} step {step} | {shown}")
        # With a live bar, a permanent line for test results and at least once a minute; else one per interval.
        elif self._bar is None or any(map(_is_test_metric, metrics)) or time.monotonic() - self._last_line > 60:
            self.message(f"step {step}: {shown}")
            self._last_line = time.monotonic()

    def samples(self, model: Glow, step: int, note: str = "") -> None:
        """One MLflow image per temperature, key `samples/T<t>`, at this step; locally one PNG per step with a row
        per temperature (what `glow-dist sample` writes). The prior draws are the same at every step. `note`: a
        line saying which weights they come from."""
        if note:
            self.message(note)
        t = self.cfg.tracking
        scale = display_scale(self.cfg.model.image_size)
        decoder = self._decoder(model)
        samples = [(temp, sample_images(decoder, t.sample_count, temp, seed=self.cfg.train.seed))
                   for temp in t.sample_temperatures]
        rows = image_grid(torch.cat([images for _, images in samples]), ncols=t.sample_count)
        save_png(rows, self.run_dir / "samples" / f"step-{step:08d}.png", scale=scale)
        for temperature, grid in temperature_images(samples, model.cfg.y_condition, scale):
            self.tracker.log_image(grid, key=f"samples/T{temperature:g}", step=step)
        self.tags(self._decode_tags(decoder))

    def _decode_tags(self, decoder: Decoder) -> dict[str, str]:
        """`runtime.sample_mode`: the decode mode the grids ran (rank 0 draws them), and why not the asked one; only
        when it changed since the last grids (a fallback happens at a decoder's first call of a shape)."""
        tags = {"runtime.sample_mode": decoder.mode}
        if decoder.reason:
            tags["runtime.sample_mode.fallback"] = decoder.reason[:4000]
        if tags == self._decode_tagged:
            return {}
        self._decode_tagged = tags
        return tags

    def _decoder(self, model: Glow) -> Decoder:
        """One Decoder per model sampled from (EMA, raw), kept for the run: it compiles or captures once, and its
        graphs read the weights in place, as the optimizer and the EMA update them."""
        decoder = self._decoders.get(id(model))
        if decoder is None or decoder.model is not model:
            decoder = Decoder(model, self.cfg.runtime.sample_mode, log=self.message)
            self._decoders[id(model)] = decoder
        return decoder

    def checkpoint_saved(self, path: Path, state: dict, upload: bool = True) -> None:
        """A checkpoint that rank 0 has written: uploaded per tracking.log_checkpoints (upload=False: the stop
        checkpoint, local only; an upload of GBs would outlast the scheduler's grace), and remembered for the model
        logged at the end (references, not copies: the final checkpoint is the last call)."""
        if upload:
            self.tracker.log_checkpoint(path, int(state["position"]["step"]))
        self._final_state = {k: state[k] for k in ("ema", "config", "position", "world_size") if k in state}
        self._final_state.update(mlflow_run_id=self.run_id, source_checkpoint=path.name)

    def stopped(self, reason: str, step: int, checkpoint: Path | None, seconds: float | None = None) -> None:
        """A stop signal ended the run at `step`: the stop.* tags, and a line saying how to resume. The run's end
        then does not wait for checkpoint uploads still queued (the scheduler's grace is for the stop checkpoint)."""
        self._stopped = True
        self.tracker.set_tags({"stop.reason": reason, "stop.step": str(step),
                               "stop.checkpoint": str(checkpoint) if checkpoint else "none"})
        if checkpoint is not None:
            self.message(f"stopped by {reason} at step {step}; checkpoint {checkpoint} saved and verified in "
                         f"{seconds or 0:.1f} s. Run the same command again to resume (train.resume=auto)")

    def failed(self, failure: JobFailure) -> None:
        """A fault ended the job (glow_dist/failures.py): its `failure.*` tags (reason, last good step, newest
        verified checkpoint, the line). The run is then closed FAILED without waiting for checkpoint uploads."""
        self._stopped = True
        self.tracker.set_tags(failure.tags())

    def tags(self, tags: dict[str, str]) -> None:
        """Tags learnt while the run goes: which step mode every rank runs (after the first step's capture) and
        which decode mode the sample grids ran (after the first grids)."""
        if tags:
            self.tracker.set_tags(tags)

    def bad_samples(self, rows: list[dict], step: int) -> None:
        """Every bad sample replaced so far: the `data/bad_samples` metric and the table artifact
        data/bad_samples.json (MLflow's table format: columns and rows; the Artifacts tab shows it)."""
        import json

        self.tracker.log_metrics({"data/bad_samples": float(len(rows))}, step)
        path = self.run_dir / "data" / "bad_samples.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(rows[0]) if rows else []
        path.write_text(json.dumps({"columns": columns, "data": [[r[c] for c in columns] for r in rows]}, indent=1))
        self.tracker.log_artifact(path, "data")

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _log_model(self) -> list[str]:
        """The final EMA weights as an MLflow model, when training completed; lines for the description."""
        state = self._final_state
        if not (self.cfg.tracking.log_model and state is not None
                and state["position"]["step"] >= self.cfg.train.steps):
            return []
        from glow_dist.tracking.mlflow_model import log_glow_model

        uri = log_glow_model(self.tracker, state, self.run_dir / "tracking" / "model",
                             register_as=self.cfg.tracking.register_as)
        lines = [f"- model: `{uri}` (final EMA weights, step {state['position']['step']:,})"]
        if self.cfg.tracking.register_as:
            lines.append(f"- registered as `{self.cfg.tracking.register_as}` (see the run's `registered_model` tag)")
        return lines

    def results(self, line: str) -> None:
        """The run's final line, and where to look at it."""
        self.message(line)
        self.message(f"results: {self.tracker.describe()}")

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED (the final model is logged), KILLED or FAILED."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        lines = [f"- `{name}` **{value:.4f}** at step {step:,}"
                 for name, (step, value) in sorted(self._last_test.items())]
        if status == "FINISHED":
            lines += self._log_model()
        if lines and self._note:
            self.tracker.set_tags({NOTE_TAG: metadata.with_results(self._note, lines)})
        self.tracker.finish(status, wait_for_uploads=not self._stopped)

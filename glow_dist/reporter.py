"""Everything only rank 0 does (progress bar, MLflow, sample grids, checkpoints) behind one object.

The training loop calls the same methods on every rank; `NullReporter` makes them no-ops off the main rank, so the
loop never tests its rank.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from glow_dist.checkpoint import save_checkpoint
from glow_dist.config import Config, flatten, save_config
from glow_dist.model import Glow
from glow_dist.sampling import save_png, temperature_grid
from glow_dist.tracking import NullTracker, Tracker


class NullReporter:
    run_id: str | None = None

    def start(self, cfg: Config, world_size: int, tags: dict[str, str], resumed_from: str | None) -> None: ...
    def step(self, step: int) -> None: ...
    def metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def samples(self, model: Glow, step: int) -> None: ...
    def checkpoint(self, make_state: Callable[[], dict], step: int, upload: bool = True) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class Reporter(NullReporter):
    def __init__(self, cfg: Config, tracker: Tracker | NullTracker, start_step: int):
        self.cfg = cfg
        self.tracker = tracker
        self.run_dir = Path(cfg.train.run_dir)
        self.run_id = getattr(tracker, "run_id", None)
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

    def start(self, cfg: Config, world_size: int, tags: dict[str, str], resumed_from: str | None) -> None:
        save_config(cfg, self.run_dir / "config.yaml")
        params = flatten(cfg)
        params.update({"world_size": world_size, "global_batch_size": world_size * cfg.train.batch_size})
        self.tracker.log_params(params)
        self.tracker.set_tags(tags)
        self.tracker.log_config(cfg)
        resumed = f" | resumed from {resumed_from}" if resumed_from else ""
        self.message(f"run dir {self.run_dir} | world size {world_size} | "
                     f"global batch {world_size * cfg.train.batch_size}{resumed}")

    def step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
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
        elif self._bar is None or "bits_per_dim/test_ema" in metrics or time.monotonic() - self._last_line > 60:
            self.message(f"step {step}: {shown}")
            self._last_line = time.monotonic()

    def samples(self, model: Glow, step: int) -> None:
        temps = self.cfg.tracking.sample_temperatures
        grid = temperature_grid(model, temps, self.cfg.tracking.sample_count, seed=self.cfg.train.seed)
        scale = max(1, 64 // self.cfg.model.image_size)
        path = save_png(grid, self.run_dir / "samples" / f"step-{step:08d}.png", scale=scale)
        self.tracker.log_image(path, f"samples/step-{step:08d}_T{'-'.join(f'{t:g}' for t in temps)}.png")

    def checkpoint(self, make_state: Callable[[], dict], step: int, upload: bool = True) -> None:
        """upload=False: the stop checkpoint, local only; an upload of GBs would outlast the scheduler's grace."""
        path = save_checkpoint(make_state(), self.run_dir, step, self.cfg.train.keep_checkpoints)
        if upload:
            self.tracker.log_checkpoint(path)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def finish(self, status: str = "FINISHED") -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.tracker.finish(status)

"""The step watchdog: every rank ends the job when no step has completed for `dist.hang_timeout` seconds.

    watchdog = StepWatchdog(cfg.dist.hang_timeout, on_hang=ends_the_job)   # after dist.init()
    watchdog.beat(step)             # after every completed step
    with watchdog.busy():           # a checkpoint write, the stop, the end of the run: long, but not a hang
        ...
    watchdog.close()                # the run ended normally

A hang has no error to raise: Horovod puts no timeout on NCCL collectives, and a rank stalled in its own step (a
hung data loader, disk or kernel) leaves the others waiting in an all-reduce forever, with Gloo's background loop
still negotiating. So a thread of each rank watches the time since the last completed step. When it exceeds the
budget, the thread dumps every thread's Python stack to stderr (faulthandler: the record of where each rank was),
calls `on_hang(seconds)` (which says who held the job up, reports and returns an exit status; bounded by
ON_HANG_S) and ends the process with os._exit: the main thread may be inside a C++ collective, where no exception
can reach it. The same thread beats this rank's heartbeat (peers.py) every BEAT_S for the others' verdicts.

The budget (`dist.hang_timeout`): a number of seconds, counted from the first completed step (the first step
compiles or captures, start-up loads data: neither is bounded); or 0, auto: max(FLOOR_S, FACTOR x the median of the
last steps' wall times), armed after WARMUP_STEPS steps. The median ignores the occasional long step (an evaluation,
a sample grid); 20x covers those and the other ranks' wait while rank 0 waits for a checkpoint write before the
next one; 120 s is four times the slowest stop checkpoint measured for CelebA-HQ 256 (29 s, docs/stopping.md,
"Grace periods") and well above Gloo's own 30 s timeout, so on CPU a lost peer is named by the collective's error first.
Time spent `busy` does not count.
"""
from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

from glow_dist.distributed import gateway as dist
from glow_dist.distributed.peers import BEAT_S, Heartbeats
from glow_dist.failures import EX_PEER_LOST

WARMUP_STEPS = 10
FLOOR_S = 120.0
FACTOR = 20
ON_HANG_S = 90.0   # on_hang's own budget (a verdict, a checkpoint verified, MLflow told); then the process ends


class StepWatchdog:
    def __init__(self, hang_timeout: float, on_hang: Callable[[float], int], enabled: bool = True) -> None:
        self.fixed = hang_timeout          # 0: auto
        self.on_hang = on_hang
        self.heartbeats = Heartbeats(dist.rank(), dist.size(), socket.gethostname())
        self.step = 0
        self._steps = 0                    # completed in this process
        self._last: float | None = None    # monotonic time of the last completed step (or of the end of `busy`)
        self._durations: collections.deque[float] = collections.deque(maxlen=101)
        self._busy = 0
        self._closed = threading.Event()
        self.enabled = enabled
        threading.Thread(target=self._run, name="glow-dist-watchdog", daemon=True).start()

    def beat(self, step: int) -> None:
        """A step completed (every rank calls it after every step)."""
        now = time.monotonic()
        if self._last is not None and self._busy == 0:
            self._durations.append(now - self._last)
        self._last, self.step, self._steps = now, step, self._steps + 1

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Work that may outlast the budget and is no hang (a checkpoint write, the stop, the end of the run)."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if self._last is not None:
                self._last = time.monotonic()

    def budget(self) -> float | None:
        """Seconds without a completed step that end the job; None while not armed."""
        if not self.enabled:
            return None
        if self.fixed > 0:
            return self.fixed if self._steps >= 1 else None
        if self._steps < WARMUP_STEPS or not self._durations:
            return None
        return max(FLOOR_S, FACTOR * statistics.median(self._durations))

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(BEAT_S):
            if not self.enabled:
                return
            self.heartbeats.put(self.step, dist.in_collective())
            budget, last = self.budget(), self._last
            if budget is None or last is None or self._busy:
                continue
            silent = time.monotonic() - last
            if silent > budget:
                self._fire(silent, budget)

    def _fire(self, silent: float, budget: float) -> None:
        print(f"[watchdog] rank {dist.rank()} on {socket.gethostname()}: no step finished for {silent:.0f} s "
              f"(dist.hang_timeout: {budget:.0f} s) after step {self.step}; every thread's Python stack:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        beats = threading.Thread(target=self._keep_beating, daemon=True)   # the others' verdicts need ours
        beats.start()
        status = [EX_PEER_LOST]
        worker = threading.Thread(target=lambda: status.__setitem__(0, self.on_hang(silent)), daemon=True)
        worker.start()
        worker.join(ON_HANG_S)
        sys.stderr.flush()
        os._exit(status[0])

    def _keep_beating(self) -> None:
        while True:
            self.heartbeats.put(self.step, dist.in_collective())
            time.sleep(BEAT_S)

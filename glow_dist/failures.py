"""Faults that end a job: one line, printed once per job by one rank, the MLflow run ended FAILED with `failure.*`
tags, and an exit status that tells a scheduler or a script what to do.

    raise JobFailure("rank 1 on hostB went silent ...", reason="peer-lost", kind="peer", status=EX_PEER_LOST,
                     step=12, checkpoint="runs/x/checkpoints/ckpt-00000010.pt", speaks=dist.is_main())

The Trainer reports it through the rank-0 reporter (`report.failed(f)`: tags `failure.reason`, `failure.step`,
`failure.checkpoint`, `failure.message`) and closes the run FAILED; `glow-dist` then prints
`glow-dist train: peer error: <line>` on the rank that `speaks` (the others print nothing) and exits `status`
(at once, with os._exit, when `exit_now`).
Where no exception can be raised (the step watchdog's thread, while the main thread is stuck inside a collective),
`announce(f)` prints the same line, at most once per process, and the caller ends the process with os._exit.
"""
from __future__ import annotations

import sys
import threading

# sysexits.h EX_UNAVAILABLE: a peer (a rank, its host or the network between them) was lost or hung. Nothing is
# wrong with the input or the disk: the same command resumes from the newest verified checkpoint, so schedulers
# requeue on it (launch/slurm/celeba_hq_256.sbatch, a bounded number of times). Distinct from a stop (75,
# train.stop_exit_code in the launch files), a disk error (74) and wrong input (2).
EX_PEER_LOST = 69


class JobFailure(Exception):
    """A fault a user meets that ends the job (not a bug: no traceback). `str(f)` is the one line; `reason` is a
    short slug for the `failure.reason` tag; `kind` names it after `glow-dist CMD:`; `speaks` is true on the one
    rank that prints it; `step` is the last step every rank completed; `checkpoint` the newest verified one."""

    def __init__(self, line: str, *, reason: str, kind: str = "job", status: int = 1, speaks: bool = True,
                 step: int | None = None, checkpoint: str | None = None, exit_now: bool = False) -> None:
        super().__init__(line)
        self.reason, self.kind, self.status, self.speaks = reason, kind, status, speaks
        self.step, self.checkpoint = step, checkpoint
        # Once the line is out, end the process at once (os._exit) instead of the interpreter's teardown: after a
        # lost peer Horovod's shutdown can take longer than the 5 s horovodrun gives a rank before its SIGKILL.
        self.exit_now = exit_now

    def tags(self) -> dict[str, str]:
        """The run's `failure.*` tags (MLflow tag values are capped at 5000 characters)."""
        tags = {"failure.reason": self.reason, "failure.message": str(self)[:4000]}
        if self.step is not None:
            tags["failure.step"] = str(self.step)
        tags["failure.checkpoint"] = self.checkpoint or "none"
        return tags

    def line(self, command: str) -> str:
        return f"glow-dist {command}: {self.kind} error: {self}"


_announced = threading.Event()


def announce(failure: JobFailure, command: str = "train") -> None:
    """Print the failure's line to stderr if this rank speaks for the job, at most once per process (the watchdog's
    thread and the main thread may both get there)."""
    if not failure.speaks or _announced.is_set():
        return
    _announced.set()
    print(failure.line(command), file=sys.stderr, flush=True)

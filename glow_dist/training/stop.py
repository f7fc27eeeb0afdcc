"""Stopping on a signal: SIGTERM (scancel, preemption, pod deletion, `docker stop`), SIGINT (Ctrl-C) and SIGUSR1
(Slurm's early warning, `#SBATCH --signal=B:USR1@LEAD`) make every rank stop after the same step with a verified
checkpoint. A second SIGINT interrupts at once.
"""
from __future__ import annotations

import signal


class StopSignal:
    """A stop signal sets a flag that the loop checks after every step (every rank votes on it with the step's skip
    decision), so the job saves a checkpoint and exits cleanly.

    Installed before anything starts (loaders, Horovod, MLflow): a signal that arrives during start-up is kept and
    acted on after the first step, never the default action that would kill the process mid-way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.name = ""

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.name = True, signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        # A launcher may start the process with them blocked so that one sent before this handler existed waits
        # instead of killing it (glow-dist-srun's tasks): delivered now, to the handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

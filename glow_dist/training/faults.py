"""A lost peer, told once: the line that names the rank and host that went silent, what likely happened, the newest
verified checkpoint and that the same command resumes; the MLflow run ended FAILED with it; exit status 69.

    loss = PeerLoss(cfg, watchdog.heartbeats)
    failure = loss.failure(step, cause="Gloo: Timed out waiting 20000ms for recv operation")   # a JobFailure

Both ways a lost peer shows up end here: a collective that raises (Gloo's timeout, a connection closed by a dead
peer; the Trainer catches it) and the step watchdog (no step for `dist.hang_timeout`: a hang, on CPU or GPU).
Every surviving rank builds the failure; one speaks: rank 0 while it is alive, else the lowest rank still beating
(peers.py says who is). The ranks that do not speak wait up to LINGER_S before they exit, so that the speaker is not
killed by horovodrun (which ends the other ranks 5 s after the first non-zero exit) before it has printed the line
and closed the MLflow run.
"""
from __future__ import annotations

from pathlib import Path

from glow_dist.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from glow_dist.config import Config
from glow_dist.distributed.peers import WINDOW_S, Heartbeats, wait_until_silent, who
from glow_dist.failures import EX_PEER_LOST, JobFailure

LINGER_S = 30.0


def newest_verified_checkpoint(run_dir: str | Path) -> tuple[Path, int] | None:
    """(path, step) of the newest checkpoint whose sha256 matches its sidecar, as train.resume=auto would pick."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except (CheckpointError, OSError):
            continue
        return path, int(path.stem.split("-")[-1])
    return None


class PeerLoss:
    def __init__(self, cfg: Config, heartbeats: Heartbeats) -> None:
        self.cfg, self.heartbeats = cfg, heartbeats

    def failure(self, step: int, cause: str) -> JobFailure:
        """This rank's account of the lost peer after `step` (the last step every rank completed); `cause` is what
        this rank saw (the collective's error, or the watchdog's silence)."""
        rank, verdict = self.heartbeats.rank, self.heartbeats.verdict()
        live_ranks = sorted({r for r in range(self.heartbeats.size)} - {e["rank"] for e in verdict.silent})
        speaks = rank == 0 or (any(e["rank"] == 0 for e in verdict.silent) and live_ranks[:1] == [rank]) \
            or verdict.cut_off
        if verdict.cut_off:
            what = (f"rank {rank} on {self.heartbeats.host} lost the launcher's host (its heartbeat store cannot "
                    "be reached: this host's network link is down)")
        elif verdict.silent:
            what = (f"{who(verdict.silent)} went silent (no heartbeat for {WINDOW_S:g} s: the process is frozen or "
                    "dead, or its host or network link is down)")
        elif verdict.stalled:
            plural = len(verdict.stalled) > 1
            what = (f"{who(verdict.stalled)} {'are' if plural else 'is'} alive but did not finish step {step + 1}, "
                    f"outside any collective, while the others waited for {'them' if plural else 'it'} (a stalled "
                    "step: a hung data loader, disk or GPU kernel; each rank's Python stack is in the log)")
        elif self.heartbeats.size == 1:
            what = ("this process's step hangs (a hung data loader, disk or GPU kernel; its Python stack is in the "
                    "log)")
        elif verdict.all_waiting:
            what = ("every rank waits in a collective (a hung all-reduce: NCCL, Gloo or the network between the "
                    "hosts; each rank's Python stack is in the log)")
        else:
            what = "another rank or its host went silent"
        found = newest_verified_checkpoint(self.cfg.train.run_dir) if speaks else None
        resume = (f"newest verified checkpoint {found[0]} (step {found[1]})" if found else
                  f"no verified checkpoint in {self.cfg.train.run_dir} yet (the rerun starts from step 0)")
        line = (f"{what}, after step {step} ({cause}); {resume}; run the same command again to resume "
                f"(exit status {EX_PEER_LOST})")
        return JobFailure(line, reason="peer-lost", kind="peer", status=EX_PEER_LOST, speaks=speaks, step=step,
                          checkpoint=str(found[0]) if found else None, exit_now=True)


def linger(failure: JobFailure, heartbeats: Heartbeats) -> None:
    """A rank that does not speak gives rank 0, which does, time to print and close the run (see the docstring):
    until rank 0 has ended (its heartbeat stopped), at most LINGER_S."""
    if not failure.speaks:
        wait_until_silent(heartbeats, 0, LINGER_S)

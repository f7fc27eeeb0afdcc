"""Checkpoint uploads to the run's artifact store on a thread of their own, so that a multi-GB upload never stalls
training (a checkpoint's write is already off the training path: glow_dist/training/background.py).

    uploads = CheckpointUploads(find_repo, "last", every=0, keep=3)   # find_repo(): the run's artifact repository
    uploads.put(Path("run/checkpoints/ckpt-00000100.pt"), 100)   # returns at once
    uploads.close(wait=True)     # the end of a run: until every queued upload is done; False (a stop): at once

Every checkpoint upload runs here, also when the server was away at the first checkpoint (the run's artifact
store is then looked up on this thread once the server answers, never on the training thread). One upload at a time,
in order: the checkpoint, its sha256 sidecar, then the rotation of `checkpoints/` in the artifact store per
`tracking.log_checkpoints` (glow_dist/tracking/client.py). Apart from finding the artifact store (with a client of its
own), only the artifact store is touched, so the thread shares nothing with the Outbox on the training thread. Under
`last`, a queued upload that has not started is dropped when a newer one comes (the rotation would delete it at
once); a file rotated away locally before its upload starts is skipped. A failure is warned once per outage and
retried with the Outbox's backoff (30 s doubling to 10 minutes); a rejection (not a transient error) drops that
upload. The sidecar goes up after its checkpoint, so an upload cut short (a stop's exit, a kill) leaves at most a
checkpoint without its sidecar: incomplete by the format's own rule (glow_dist/checkpoint.py), and rotated away by
the next upload.

Fault drill: GLOW_DIST_INJECT_SLOW_UPLOAD=SECONDS holds every upload that long before it starts, as a multi-GB
upload to a remote server would take; tests check that training and its end do not (or do) wait for it.
"""
from __future__ import annotations

import os
import re
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glow_dist.tracking.outbox import FIRST_RETRY_S, MAX_RETRY_S, is_transient, warn

_CHECKPOINT_ARTIFACT = re.compile(r"^checkpoints/ckpt-(\d{8})\.pt$")


def checkpoints_to_keep(steps: list[int], policy: str, every: int = 0, keep: int = 0,
                        current: int | None = None) -> set[int]:
    """Of the checkpoint steps uploaded to a run, those `tracking.log_checkpoints` keeps (see client.py's doc).
    `current`: the step just uploaded; steps past it are of a line of training abandoned by a resume from an older
    checkpoint, neither the newest nor deleted (their local files were set aside, not deleted, too)."""
    if current is not None:
        past = {s for s in steps if s > current}
        return past | checkpoints_to_keep([s for s in steps if s <= current], policy, every, keep)
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


def rotate_checkpoints(repo: Any, policy: str, every: int, keep: int, current: int | None = None) -> None:
    """Delete from the artifact store the uploaded checkpoints (and sidecars) the policy no longer keeps, after the
    upload of step `current`. MLflow's own list is read, so checkpoints uploaded before a resume rotate too."""
    names = [f.path for f in repo.list_artifacts("checkpoints")]
    steps = {int(m.group(1)): p for p in names if (m := _CHECKPOINT_ARTIFACT.match(p))}
    keep_steps = checkpoints_to_keep(list(steps), policy, every, keep, current)
    for step, path in steps.items():
        if step in keep_steps:
            continue
        for name in (path + ".sha256", path):   # sidecar first, as the local rotation does
            if name == path or name in names:
                repo.delete_artifacts(name)


class CheckpointUploads:
    def __init__(self, find_repo: Callable[[], Any], policy: str, every: int = 0, keep: int = 0) -> None:
        self.policy, self.every, self.keep = policy, every, keep
        self._find_repo = find_repo
        self.repo: Any = None    # found on this thread before the first upload (retried while the server is away)
        self._pending: deque[tuple[Path, int]] = deque()
        self._current: tuple[Path, int] | None = None
        self._failed: list[int] = []
        self._final = False      # the end of the run: what is queued is tried once more, then the thread ends
        self._abandon = False    # a stop: nothing more starts
        self._cond = threading.Condition()
        self._drill_s = float(os.environ.get("GLOW_DIST_INJECT_SLOW_UPLOAD", "0") or 0)
        self._thread = threading.Thread(target=self._run, name="glow-dist-checkpoint-upload", daemon=True)
        self._thread.start()

    def put(self, path: Path, step: int) -> None:
        with self._cond:
            if self.policy == "last":
                self._pending.clear()   # not started yet; the newer checkpoint would rotate them away at once
            self._pending.append((path, step))
            self._cond.notify_all()

    def close(self, wait: bool) -> list[int]:
        """No more uploads after this. With `wait` (the end of a run) every queued upload is finished, or tried once
        more if the store is away; without (a stop), nothing more starts and one in progress is left to the exit.
        Returns the steps not uploaded."""
        with self._cond:
            self._final, self._abandon = True, not wait
            self._cond.notify_all()
        if wait:
            self._thread.join()
        with self._cond:
            left = [s for _, s in ([self._current] if self._current else []) + list(self._pending)]
            return sorted(set(self._failed + left))

    def _next(self) -> tuple[Path, int] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._final)
            if self._abandon or not self._pending:
                return None
            self._current = self._pending.popleft()
            return self._current

    def _run(self) -> None:
        while (item := self._next()) is not None:
            self._upload(*item)
            with self._cond:
                self._current = None

    def _newer_queued(self) -> bool:
        """Under `last`, a newer checkpoint waits: the one in hand need not (or no longer) be uploaded."""
        return self.policy == "last" and bool(self._pending)

    def _upload(self, path: Path, step: int) -> None:
        if self._drill_s > 0:
            with self._cond:
                self._cond.wait_for(lambda: self._abandon, timeout=self._drill_s)
        delay = FIRST_RETRY_S
        while True:
            if self._abandon or self._newer_queued():
                return   # a stop, or a newer checkpoint to upload instead
            if not path.exists():
                return   # rotated away locally before its turn: a newer checkpoint follows
            try:
                if self.repo is None:
                    self.repo = self._find_repo()
                self.repo.log_artifact(str(path), "checkpoints")
                sidecar = path.with_name(path.name + ".sha256")
                if sidecar.exists():
                    self.repo.log_artifact(str(sidecar), "checkpoints")
                rotate_checkpoints(self.repo, self.policy, self.every, self.keep, step)
                if delay > FIRST_RETRY_S:   # after retries
                    print(f"[tracking] checkpoint {path.name} uploaded", flush=True)
                return
            except Exception as e:
                if not is_transient(e) or self._final:
                    warn(f"checkpoint {path.name} was not uploaded to MLflow ({str(e).splitlines()[0][:300]}); it is "
                         f"in {path.parent}")
                    self._failed.append(step)
                    return
                if delay == FIRST_RETRY_S:
                    warn(f"checkpoint {path.name} could not be uploaded ({str(e).splitlines()[0][:300]}); retrying "
                         "in the background while training goes on")
            with self._cond:
                self._cond.wait_for(lambda: self._final or self._newer_queued(), timeout=delay)   # retry early
            delay = min(delay * 2, MAX_RETRY_S)

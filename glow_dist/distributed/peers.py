"""Which peer went silent: every rank's heartbeat in horovodrun's rendezvous store, read when a collective fails.

    beats = Heartbeats(rank, size, host)     # None-safe: no store (no horovodrun) makes every call a no-op
    beats.put(step=12, waiting=True)         # from the watchdog's thread, every BEAT_S
    verdict = beats.verdict()                # which ranks stopped beating, and which are stuck outside a collective

When a collective times out or hangs, the error on the surviving ranks does not say who stopped answering. So each
rank's watchdog thread PUTs {rank, host, step, waiting, seq} every BEAT_S seconds into the key-value store that
horovodrun's launcher already serves to the ranks for their rendezvous (HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT, an HTTP
server in the launcher process; ad-hoc scopes are part of its protocol). A verdict reads every rank's entry twice,
WINDOW_S apart, on the reader's own clock (hosts' clocks may differ): a rank whose `seq` did not move is silent (its
process is frozen or dead, or its host or link is down); a live rank that is not waiting in a collective while the
others are is the one holding them up (a stalled step: a hung data loader, disk or GPU kernel). A rank that cannot
reach the store itself is cut off from the launcher's host. Without a store (mpirun, a single process) the verdict
is empty and the caller says less.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, NamedTuple

BEAT_S = 0.5        # between two heartbeats of a rank
WINDOW_S = 2.0      # a rank whose heartbeat did not change over this long is silent
SCOPE = "glowdist-heartbeat"
_HTTP_TIMEOUT_S = 2.0


class Verdict(NamedTuple):
    silent: list[dict]        # the entries (rank, host, step, ...) of ranks that stopped beating
    stalled: list[dict]       # live ranks outside any collective while others wait in one
    all_waiting: bool         # every rank is alive and waits in a collective: the collective itself hangs
    cut_off: bool             # this rank cannot reach the store: its host lost the launcher's host
    known: bool               # heartbeats were available at all


class Heartbeats:
    def __init__(self, rank: int, size: int, host: str) -> None:
        addr, port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
        self.base = f"http://{addr}:{port}/{SCOPE}" if addr and port and size > 1 else None
        self.rank, self.size, self.host = rank, size, host
        self.seq = 0
        self.reachable = True

    def put(self, step: int, waiting: bool) -> None:
        """This rank's heartbeat; a store that cannot be reached marks this rank cut off (until it can again)."""
        if self.base is None:
            return
        self.seq += 1
        body = json.dumps({"rank": self.rank, "host": self.host, "step": step, "waiting": waiting,
                           "seq": self.seq}).encode()
        request = urllib.request.Request(f"{self.base}/{self.rank}", data=body, method="PUT")
        try:
            urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S).close()
            self.reachable = True
        except (OSError, urllib.error.URLError):
            self.reachable = False

    def _read(self) -> dict[int, dict] | None:
        """Every rank's last heartbeat ({} entries missing for ranks that never beat); None if unreachable."""
        found: dict[int, dict] = {}
        for rank in range(self.size):
            try:
                with urllib.request.urlopen(f"{self.base}/{rank}", timeout=_HTTP_TIMEOUT_S) as response:
                    found[rank] = json.loads(response.read())
            except urllib.error.HTTPError:   # 404: that rank never beat
                continue
            except (OSError, ValueError):
                return None
        return found

    def verdict(self) -> Verdict:
        """Read every heartbeat twice, WINDOW_S apart (blocking that long), and say who stopped."""
        if self.base is None:
            return Verdict([], [], False, False, known=False)
        first = self._read()
        time.sleep(WINDOW_S)
        second = self._read()
        if first is None or second is None or not self.reachable:
            return Verdict([], [], False, cut_off=True, known=True)
        silent, live = [], []
        for rank in range(self.size):
            before, now = first.get(rank), second.get(rank)
            entry: dict[str, Any] = now or before or {"rank": rank, "host": "?", "step": -1, "waiting": False}
            moved = before is not None and now is not None and now["seq"] != before["seq"]
            (live if moved or rank == self.rank else silent).append(entry)
        waiting = [e for e in live if e["waiting"]]
        stalled = [e for e in live if not e["waiting"]] if waiting and not silent else []
        return Verdict(silent, stalled, all_waiting=bool(live) and len(waiting) == len(live) and not silent,
                       cut_off=False, known=True)


def wait_until_silent(heartbeats: Heartbeats, rank: int, timeout: float) -> None:
    """Until `rank` stops beating (its process ended), at most `timeout` seconds; without a store, the timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        seen = heartbeats._read() if heartbeats.base is not None else None
        seq = (seen or {}).get(rank, {}).get("seq")
        if seen is not None and last is not None and seq == last:
            return
        last = seq
        time.sleep(min(WINDOW_S, max(0.0, deadline - time.monotonic())))


def who(entries: list[dict]) -> str:
    """'rank 1 on hostB', 'ranks 1, 3 on hostB, hostC'."""
    ranks = ", ".join(str(e["rank"]) for e in entries)
    hosts = ", ".join(dict.fromkeys(str(e["host"]) for e in entries))
    return f"rank{'s' if len(entries) > 1 else ''} {ranks} on {hosts}"

"""A rank's guard: a small process beside each rank, on the rank's own host, that ends the rank when the job that
launched it has gone (no rank left behind).

    guard.start()                                  # in the rank, once it is launched by horovodrun
    python -m glow_dist.distributed.guard RANK_PID # what that runs: stdlib only, a few MB

Why a process and not a thread: a rank frozen with SIGSTOP (or stuck in the kernel) runs none of its threads, and
prctl(PR_SET_PDEATHSIG) does not cross ssh. horovodrun ends a job by killing each rank's middleman tree; for a rank
on another host that tree ends at the local `ssh`, so the remote rank was left running (keeping its GPU memory):
sshd closes the session's pipes when the client goes, but sends no signal to a command that has no terminal.

What the guard watches: the write ends of the rank's stdout and stderr, which it shares. When nobody reads them any
more (POLLERR/POLLHUP: sshd closed the session because the launcher killed its ssh, or the launcher itself died for a
local rank), the job is over: the guard sends the rank SIGTERM, a stop (the other ranks may still be there: on a Slurm
site with pam_slurm_adopt, scancel ends the ssh sessions of a job that is stopping with a checkpoint, and the rank
must still take part in the stop vote), then SIGKILL GRACE_S later if it has not exited (a frozen or stuck rank,
whose launcher has really gone), and exits. Output that goes to a
file or a terminal is not watched. The guard exits as soon as the rank does (its parent changes), so it never holds
the session's pipes open past the rank.
"""
from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 10.0   # SIGTERM -> SIGKILL: time for the rank's part in a stop (a vote and its exit), short of a hang


def _watched_fds() -> list[int]:
    """stdout and stderr when they are pipes or sockets (a session's), not files or terminals."""
    found = []
    for fd in (1, 2):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            found.append(fd)
    return found


def start() -> subprocess.Popen | None:
    """Start this rank's guard (Linux, output to a pipe or socket); None where there is nothing to watch."""
    if sys.platform != "linux" or not _watched_fds():
        return None
    return subprocess.Popen([sys.executable, "-m", "glow_dist.distributed.guard", str(os.getpid())],
                            stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True)


def watch(rank_pid: int) -> int:
    poller = select.poll()
    for fd in _watched_fds():
        poller.register(fd, 0)   # POLLERR and POLLHUP are always reported: the reader of this pipe is gone
    while os.getppid() == rank_pid:
        if poller.poll(POLL_S * 1000):
            _end(rank_pid)
            return 0
    return 0


def _end(rank_pid: int) -> None:
    """SIGTERM (the rank stops with the others if they are there), then SIGKILL unless it has exited meanwhile."""
    try:
        os.kill(rank_pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_S
    while os.getppid() == rank_pid and time.monotonic() < deadline:   # our parent changes when the rank is gone
        time.sleep(0.2)
    if os.getppid() == rank_pid:
        try:
            os.kill(rank_pid, signal.SIGKILL)   # it did not stop: a frozen or stuck rank
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    # The stop signals are the rank's to act on (a stop is voted, then checkpointed): the guard ignores them.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(watch(int(sys.argv[1])))

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
local rank), the job is over: the guard SIGKILLs the rank (a stopped process too) and exits. Output that goes to a
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

POLL_S = 1.0


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
            try:
                os.kill(rank_pid, signal.SIGKILL)   # its launcher is gone: nothing it does can reach anyone
            except ProcessLookupError:
                pass
            return 0
    return 0


if __name__ == "__main__":
    # The stop signals are the rank's to act on (a stop is voted, then checkpointed): the guard ignores them.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(watch(int(sys.argv[1])))

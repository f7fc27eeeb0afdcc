"""`glow-dist-horovodrun`: horovodrun, with stop signals that end in a checkpoint rather than a kill.

    glow-dist-horovodrun -np 2 -H localhost:2 --gloo glow-dist train --config configs/digits.yaml

It takes horovodrun's arguments and runs horovodrun (Gloo) in this process. Five things differ, all but the fourth
about stopping (horovod 0.28.1, horovod/runner/gloo_run.py and common/util/safe_shell_exec.py):

1. horovodrun answers SIGTERM or SIGINT by sending SIGTERM to each rank and SIGKILL 5 s later
   (GRACEFUL_TERMINATION_TIME_S, not an option): rank 0, busy writing the stop checkpoint, is killed and horovodrun
   exits 1 with a traceback. Here SIGTERM, SIGINT and SIGUSR1 are forwarded to the ranks on this host instead; the
   ranks vote to stop after the same step, rank 0 checkpoints, every rank exits and horovodrun ends by itself.
   The scheduler's own SIGKILL (Slurm's KillWait, Kubernetes' grace period) stays the deadline. A second SIGINT, or
   GLOW_DIST_STOP_TIMEOUT seconds after the first signal (if set), hands over to horovodrun's termination, which
   here gives ranks on this host LOCAL_RANK_GRACE_S (30 s, not 5) between SIGTERM and SIGKILL: after a lost peer,
   rank 0 has the time to print its line and close the run before horovodrun's teardown kills it.
2. Slurm signals every process of the job, horovodrun's helpers too: the per-rank middleman, its `sh -c` and the
   `ssh` to a remote host. horovodrun reads their death as a failed rank and kills the rest. Here they ignore the
   stop signals (the setting is inherited, and sh and ssh keep a signal that was ignored when they started).
3. A rank's non-zero exit status becomes the launcher's (horovodrun prints a traceback and exits 1), so
   `train.stop_exit_code` reaches the scheduler. When any rank exited 69 (a lost peer: glow_dist/failures.py),
   that is the status, whichever rank horovodrun saw fail first: the ranks killed after a lost peer (the ssh to a
   dead host: 255; a rank terminated by horovodrun: 143) say nothing about what to do, 69 does (rerun to resume).
4. Secrets stay off command lines. horovodrun writes every exported variable into each rank's command, and into
   `ssh host '...'` for other hosts, where `ps` shows it to every user. The variables that credentials.is_secret
   names (MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, *_TOKEN, ...) are left out of those commands, and the
   middleman writes them to the rank's standard input instead (over ssh's channel to another host); the rank reads
   them into its environment at start (credentials.receive, in `glow-dist`'s main).
5. On a Slurm site with pam_slurm_adopt, the ssh sessions that horovodrun opens to the other nodes join the job,
   so scancel or preemption sends SIGTERM to their sshd too: each session ends, its ssh here exits 255 ("Connection
   to hostB closed by remote host") and horovodrun would kill rank 0 5 s later, in the middle of the stop checkpoint
   (tests/test_slurm.py reproduces it). The remote rank itself got the signal and stops with the others, over Gloo,
   which needs no ssh. So when a remote rank's ssh ends with 255 during a stop, or SESSION_GRACE_S before its signal
   reaches this launcher (the nodes are signalled at about the same time, in either order), the launcher says so and
   waits for the ranks instead; without a stop it is a failure as before, SESSION_GRACE_S later.

A stop signal that comes while the ranks are still starting (Slurm's time-limit warning or a scancel during a slow
start) is not lost: each rank on this host gets it as soon as it has installed its handler (the signal's bit in
SigCgt of /proc/PID/status; before that the signal's default action would kill it), until the launcher ends.

Ranks on other hosts (over ssh) do not see a signal sent to this launcher: the scheduler must signal them (Slurm
does, every process of the job; on Kubernetes each worker's PID 1 forwards it, launch/forward-stop.sh). One rank
that sees it is enough, since the stop is voted.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from typing import Any

from glow_dist.distributed import credentials
from glow_dist.failures import EX_PEER_LOST

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


# Between horovodrun's SIGTERM and its SIGKILL to a rank on this host when the job is torn down (horovodrun: 5 s).
# After a lost peer the first rank to exit is often the one that died; rank 0 then needs the time to name it,
# verify the newest checkpoint (a 2.75 GiB one reads in about 15 s) and close the MLflow run. The `ssh` to a remote
# rank keeps 5 s: killing it ends the remote session, and the rank's guard then ends the rank.
LOCAL_RANK_GRACE_S = 30


def _middleman(*args: Any) -> None:
    """horovodrun's per-rank middleman process, ignoring the stop signals (inherited by `sh -c` and ssh), and giving
    a rank's command the secrets on its stdin."""
    from horovod.runner.common.util import safe_shell_exec

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _secrets_to_stdin(command=args[0])
    if not str(args[0]).lstrip().startswith("ssh "):   # the command of a rank on this host
        safe_shell_exec.GRACEFUL_TERMINATION_TIME_S = LOCAL_RANK_GRACE_S
    safe_shell_exec._exec_middleman(*args)


# Secrets (4. above): off the command lines, onto each rank's stdin.

def _hold_back_secrets() -> None:
    """Leave this environment's secrets out of the commands horovodrun writes (local ranks still inherit them as
    environment, which only their user can read) and tell the ranks to read them from stdin."""
    from horovod.runner.common.util import env as env_util

    secrets = credentials.secrets_in(os.environ)
    if not secrets:
        return
    exportable = env_util.is_exportable   # gloo_run calls env_util.is_exportable(name) for each variable it writes
    env_util.is_exportable = lambda name: exportable(name) and name not in secrets
    os.environ[credentials.ON_STDIN] = ",".join(sorted(secrets))   # names only: exported, so every rank sees it


def _secrets_to_stdin(command: str) -> None:
    """In the middleman: when `command` starts a rank (it carries ON_STDIN), make the secrets its stdin (a pipe
    that holds the one line, then EOF; ssh forwards it to a remote rank). Other commands (horovodrun's ssh checks)
    keep /dev/null."""
    names = os.environ.get(credentials.ON_STDIN)
    if not names or f"{credentials.ON_STDIN}=" not in command:
        return
    line = credentials.encode({name: os.environ[name] for name in names.split(",")})
    read, write = os.pipe()

    def feed() -> None:   # a thread: a line longer than the pipe's buffer must not block the start
        with os.fdopen(write, "wb") as pipe:
            pipe.write(line)

    threading.Thread(target=feed, daemon=True).start()
    os.dup2(read, 0)   # the command (sh -c, then ssh or the rank) inherits fd 0
    os.close(read)


def local_ranks() -> list[Any]:
    """This launcher's descendants that are training ranks: HOROVOD_RANK in their environment and not in their
    parent's (so not their data-loader workers)."""
    import psutil

    def is_rank(proc: psutil.Process) -> bool:
        try:
            return "HOROVOD_RANK" in proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            parent = proc.parent()
        except psutil.NoSuchProcess:
            continue
        if is_rank(proc) and not (parent is not None and is_rank(parent)):
            found.append(proc)
    return found


def catches(pid: int, signum: int) -> bool:
    """True once process `pid` has a handler for `signum` (its bit in SigCgt, /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


class _Forwarder:
    """Signal handlers of the launcher: forward a stop signal to the local ranks, and to ranks that are still
    starting once they can take it; escalate on a second SIGINT."""

    POLL_S = 0.5

    def __init__(self, shutdown: threading.Event) -> None:
        self.shutdown = shutdown  # setting it starts horovodrun's own termination (SIGTERM, 5 s, SIGKILL)
        self.stopping = False
        self.signalled: set[int] = set()   # ranks that got the first stop signal
        self._lock = threading.RLock()   # a second signal may come while the handler forwards the first

    def _forward(self, signum: int, again: bool) -> list[int]:
        """Send `signum` to the local ranks that handle it (all of them again if `again`, else only those not yet
        signalled); returns their pids."""
        sent = []
        with self._lock:
            for proc in local_ranks():
                if (again or proc.pid not in self.signalled) and catches(proc.pid, signum):
                    try:
                        proc.send_signal(signum)
                    except Exception:  # noqa: BLE001 - a rank that already exited needs no signal
                        continue
                    self.signalled.add(proc.pid)
                    sent.append(proc.pid)
        return sent

    def _late_ranks(self, signum: int) -> None:
        while not self.shutdown.wait(self.POLL_S):
            for pid in self._forward(signum, again=False):
                _say(f"{signal.Signals(signum).name}: forwarded to rank process {pid}, which was still starting")

    def __call__(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.stopping and signum == signal.SIGINT:
            _say(f"second {name}: terminating the ranks now (no checkpoint)")
            self.shutdown.set()
            return
        sent = self._forward(signum, again=True)
        if not self.stopping:
            pids = ", ".join(str(p) for p in sent) or "none yet on this host"
            _say(f"{name}: forwarded to the ranks ({pids}); waiting for them to checkpoint and exit")
            threading.Thread(target=self._late_ranks, args=(signum,), daemon=True).start()
            timeout = float(os.environ.get("GLOW_DIST_STOP_TIMEOUT", "0") or 0)
            if timeout > 0:
                timer = threading.Timer(timeout, self._timeout, args=(timeout,))
                timer.daemon = True
                timer.start()
        self.stopping = True

    def _timeout(self, timeout: float) -> None:
        _say(f"the ranks did not exit within GLOW_DIST_STOP_TIMEOUT={timeout:g} s: terminating them")
        self.shutdown.set()


# A remote rank's ssh session ended by the stop (5. above).

SSH_LOST = 255          # ssh's own status: the connection ended (the remote command's status is unknown)
SESSION_GRACE_S = 5.0   # how long after a stop signal (or before it) an ended session is put down to the stop


def _execute_tolerating_stopped_sessions(execute: Any, forward: _Forwarder) -> Any:
    """horovodrun's safe_shell_exec.execute, except that a remote rank's ssh ending with SSH_LOST around a stop signal
    counts as done rather than failed, so that horovodrun does not terminate the other ranks for it; rank 0's own
    status still decides the launcher's."""
    from horovod.runner.util.remote import SSH_COMMAND_PREFIX

    def run(command: str, *args: Any, **kwargs: Any) -> int:
        status = execute(command, *args, **kwargs)
        if status != SSH_LOST or not command.startswith(SSH_COMMAND_PREFIX) or "HOROVOD_RANK=" not in command:
            return status
        deadline = time.monotonic() + SESSION_GRACE_S
        while not forward.stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if not forward.stopping:
            return status
        rank = re.search(r"HOROVOD_RANK=(\d+)", command)
        host = re.search(r"HOROVOD_HOSTNAME=(\S+)", command)
        _say(f"rank {rank.group(1) if rank else '?'} on {host.group(1) if host else '?'}: its ssh session ended "
             "with the stop signal (a scheduler that signals ssh sessions too); it stops with the others over Gloo, "
             "so the ranks are left to finish the stop")
        return 0

    return run
def _recording(exec_command_fn: Any, statuses: list[int]) -> Any:
    """horovodrun's per-rank executor factory, recording every rank's exit status in `statuses`."""
    def factory(settings: Any) -> Any:
        run_rank = exec_command_fn(settings)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            exit_code, timestamp = run_rank(*args, **kwargs)
            statuses.append(exit_code)
            return exit_code, timestamp
        return recorded
    return factory


def _say(text: str) -> None:
    print(f"glow-dist-horovodrun: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from horovod.runner import gloo_run, launch
    from horovod.runner.common.util import safe_shell_exec

    shutdown = threading.Event()
    forward = _Forwarder(shutdown)

    def register_shutdown_event() -> threading.Event:
        # Replaces horovodrun's: our handlers instead of its terminate-on-signal (called in the main thread).
        for sig in STOP_SIGNALS:
            signal.signal(sig, forward)
        return shutdown

    gloo_run.register_shutdown_event = register_shutdown_event
    statuses: list[int] = []
    gloo_run._exec_command_fn = _recording(gloo_run._exec_command_fn, statuses)
    safe_shell_exec._exec_middleman = _middleman  # spawned by reference: the child imports this module
    safe_shell_exec.execute = _execute_tolerating_stopped_sessions(safe_shell_exec.execute, forward)
    _hold_back_secrets()
    for sig in STOP_SIGNALS:  # from here on, before horovodrun has started anything
        signal.signal(sig, forward)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        launch.run_commandline()
    except RuntimeError as e:
        code = re.search(r"Exit code: (-?\d+)", str(e))
        if code is None:
            raise
        status = int(code.group(1))
        status = 128 - status if status < 0 else status  # killed by a signal: the shell's convention
        if EX_PEER_LOST in statuses and status != EX_PEER_LOST:
            _say(f"a rank exited with status {status} after a peer was lost; exiting with {EX_PEER_LOST}")
            return EX_PEER_LOST
        _say(f"a rank exited with status {status}; exiting with it")
        return status or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

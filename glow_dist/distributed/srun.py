"""`glow-dist-srun`: Horovod over Gloo with the ranks started by `srun`, no ssh (LAUNCHER=srun in
launch/slurm/celeba_hq_256.sbatch). Run it in the batch script of a Slurm job, on the job's first node:

    glow-dist-srun -np 40 --network-interface ib0 glow-dist train --config configs/celeba_hq_256.yaml

It brings up what `horovodrun --gloo` brings up (horovod 0.28.1, horovod/runner/gloo_run.py: launch_gloo), with
srun in place of ssh:

1. The plan: the job's nodes in Slurm's order, np / nodes slots each, given ranks by Horovod's own
   get_host_assignments (block: node i holds ranks i*k .. i*k+k-1, which is also srun's default distribution).
2. Horovod's RendezvousServer, initialized with that plan, listening on this node's address on the NIC.
3. `srun --kill-on-bad-exit=1 --ntasks-per-node=k ... glow-dist-srun task CMD`: one task per slot on every node.
   Each task derives its Horovod rank, size, local and cross rank from Slurm's task variables (SLURM_PROCID,
   SLURM_LOCALID, SLURM_NODEID, ...), checks them against the plan (a mismatch would hang the rendezvous) and
   `exec`s CMD, so the rank is the task Slurm tracks, signals and cleans up. Its GPU is chosen by local rank
   (gateway.pin_device).

Stopping. Slurm delivers scancel's, preemption's and `scontrol requeue`'s SIGTERM to every task itself. srun gets
it too, and answers by asking for SIGKILL of its tasks ("srun: forcing job termination"), which a job that is already
being cancelled does not get before KillWait (tests/test_slurm.py). A signal for the batch shell alone (the
time-limit warning of `--signal=B:USR1@300`, `scancel --batch`) reaches this process through the batch script and
goes on to the ranks as SIGUSR1 through srun, the one signal of the three that srun forwards to its tasks (it
kills them on SIGTERM and prints their status on SIGINT); srun reaches only this run's step, never a requeued run.
The ranks vote, rank 0 writes the verified checkpoint and exits with train.stop_exit_code, which becomes this
launcher's exit status. A task starts with the stop signals blocked, so one that comes before `glow-dist train` has
installed its handler is kept pending rather than killing the rank (glow_dist/training/stop.py unblocks them).

MPI (`--mpi pmix`, LAUNCHER=srun-mpi): the same, but `srun --mpi=pmix` and Horovod's MPI controller and CPU
operations (HOROVOD_CONTROLLER=mpi, HOROVOD_CPU_OPERATIONS=mpi): Open MPI takes its ranks from Slurm's PMIx server,
so the Horovod build must include MPI (launch/install-horovod.sh with GLOW_DIST_HOROVOD_MPI=1), built against the
MPI the nodes run, and Slurm must have the mpi/pmix plugin with a PMIx library (the ranks get PMIX_MCA_gds=hash
unless the site sets it: mpi_env). The rendezvous server still runs:
it is the store of the ranks' heartbeats (glow_dist/distributed/peers.py), which name a lost peer.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PLAN_ENV = "GLOW_DIST_SRUN_HOSTS"   # the plan, "node:slots,...", for the tasks to check themselves against


class LaunchError(Exception):
    """A problem the user fixes (not inside Slurm, np not a multiple of the nodes, a task placed elsewhere)."""


def _say(text: str) -> None:
    print(f"glow-dist-srun: {text}", file=sys.stderr, flush=True)


def plan(hosts: str) -> list[Any]:
    """Horovod's slot assignment for "node:slots,..." (the same function horovodrun uses, so the rendezvous scopes
    match what each rank asks for)."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    parsed = parse_hosts(hosts)
    return get_host_assignments(parsed, sum(h.slots for h in parsed))


def job_hosts(np: int, env: Mapping[str, str]) -> str:
    """"node:slots,..." for this job's nodes (SLURM_JOB_NODELIST, expanded by `scontrol show hostnames`)."""
    nodelist = env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("not inside a Slurm job (SLURM_JOB_NODELIST is not set): submit the batch script with "
                          "sbatch, or launch with glow-dist-horovodrun")
    nodes = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    if np < 1 or np % len(nodes):
        raise LaunchError(f"-np {np} is not a multiple of the job's {len(nodes)} nodes ({nodelist}): srun starts "
                          "the same number of ranks on every node")
    return ",".join(f"{node}:{np // len(nodes)}" for node in nodes)


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_STEP_TASKS_PER_NODE ("2(x3),1") as one count per node."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if m is None:
            raise LaunchError(f"cannot read SLURM_STEP_TASKS_PER_NODE={spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slot_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """This task's Horovod variables from Slurm's task variables, checked against the launcher's plan."""
    rank, node_index, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NODEID"]), int(env["SLURM_LOCALID"])
    per_node = tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
    mine = {"HOROVOD_HOSTNAME": env["SLURMD_NODENAME"], "HOROVOD_RANK": rank,
            "HOROVOD_SIZE": int(env["SLURM_STEP_NUM_TASKS"]), "HOROVOD_LOCAL_RANK": local_rank,
            "HOROVOD_LOCAL_SIZE": per_node[node_index], "HOROVOD_CROSS_RANK": node_index,
            "HOROVOD_CROSS_SIZE": sum(1 for n in per_node if n > local_rank)}
    slots = plan(env[PLAN_ENV])
    expected = slots[rank] if rank < len(slots) else None
    if expected is None or mine != {"HOROVOD_HOSTNAME": expected.hostname, "HOROVOD_RANK": expected.rank,
                                    "HOROVOD_SIZE": expected.size, "HOROVOD_LOCAL_RANK": expected.local_rank,
                                    "HOROVOD_LOCAL_SIZE": expected.local_size,
                                    "HOROVOD_CROSS_RANK": expected.cross_rank,
                                    "HOROVOD_CROSS_SIZE": expected.cross_size}:
        raise LaunchError(f"srun placed task {rank} as local task {local_rank} of {mine['HOROVOD_LOCAL_SIZE']} on "
                          f"{mine['HOROVOD_HOSTNAME']}, but the rendezvous expects {expected}: run the step with "
                          f"block distribution and the same tasks on every node ({env[PLAN_ENV]})")
    return {k: str(v) for k, v in mine.items()}


def task(command: list[str]) -> int:
    """One srun task: become the rank (exec), with the stop signals blocked until its handler unblocks them."""
    try:
        slot = slot_from_slurm(os.environ)
    except LaunchError as e:
        _say(str(e))
        return 2
    os.environ.update(slot)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        _say(f"cannot run {command[0]} on {slot['HOROVOD_HOSTNAME']}: {e}")
        return 127


def waits_for(pid: int, signum: int) -> bool:
    """True once process `pid` takes `signum` rather than dying of it: blocked (srun's signal thread waits for its
    signals with sigwait) or caught (SigBlk or SigCgt of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigBlk:", "SigCgt:"))]
    except (OSError, ValueError):
        return False
    return any(mask >> (signum - 1) & 1 for mask in masks)


class _Forwarder:
    """The launcher's handlers: pass a stop signal to the ranks as SIGUSR1 through srun, which forwards USR1 to
    every task of its step (and only of its step: this run's, not a requeued run's). Not SIGTERM: srun answers
    SIGTERM by killing its tasks, and SIGINT by printing their status. When Slurm signalled the whole job, the ranks
    already have the signal from their own slurmstepd; one more is harmless (a rank keeps the first)."""

    POLL_S = 0.2

    def __init__(self) -> None:
        self.srun: subprocess.Popen | None = None
        self.pending = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        if self.pending.is_set():
            return
        self.pending.set()
        _say(f"{signal.Signals(signum).name}: passing SIGUSR1 to the ranks through srun; waiting for them to "
             "checkpoint and exit")
        threading.Thread(target=self._forward, daemon=True).start()

    def _forward(self) -> None:
        # A signal that comes before srun is up waits for it (USR1 would otherwise kill srun).
        while (srun := self.srun) is None or (srun.poll() is None and not waits_for(srun.pid, signal.SIGUSR1)):
            time.sleep(self.POLL_S)
        if srun.poll() is None:
            srun.send_signal(signal.SIGUSR1)


def srun_command(np: int, hosts: str, command: list[str], extra: list[str], env: Mapping[str, str],
                 mpi: str | None = None) -> list[str]:
    nodes = len(hosts.split(","))
    per_node = np // nodes
    cpus = max(1, int(env.get("SLURM_CPUS_ON_NODE", per_node)) // per_node)
    return ["srun", *([f"--mpi={mpi}"] if mpi else []), "--kill-on-bad-exit=1", "--label", "--distribution=block",
            f"--nodes={nodes}", f"--ntasks={np}", f"--ntasks-per-node={per_node}", f"--cpus-per-task={cpus}", *extra,
            sys.executable, "-m", "glow_dist.distributed.srun", "task", *command]


def mpi_env(nic: str, env: Mapping[str, str]) -> dict[str, str]:
    """What the ranks of the MPI route need besides srun's PMIx: Horovod's MPI controller and CPU operations (a build
    with Gloo too would otherwise pick by its own rules), and Open MPI's TCP transport on the training NIC (a value
    the site sets wins)."""
    import horovod.torch as hvd

    if not hvd.mpi_built():
        raise LaunchError("this Horovod was built without MPI, which --mpi (LAUNCHER=srun-mpi) needs: build it with "
                          "GLOW_DIST_HOROVOD_MPI=1 launch/install-horovod.sh against the MPI the nodes run, or use "
                          "LAUNCHER=srun (Gloo)")
    return {"HOROVOD_CONTROLLER": "mpi", "HOROVOD_CPU_OPERATIONS": "mpi",
            "OMPI_MCA_btl_tcp_if_include": env.get("OMPI_MCA_btl_tcp_if_include", nic),
            # PMIx's shared-memory data store (gds/shmem, PMIx 4.2) segfaults the client at MPI_Init under
            # srun --mpi=pmix (openpmix/openpmix#3019; seen here: rank 0 SIGSEGV at address 0 with Debian 12's
            # PMIx 4.2.2); the hash store is PMIx's plain one, the workaround its maintainers give.
            "PMIX_MCA_gds": env.get("PMIX_MCA_gds", "hash")}


def launch(args: argparse.Namespace) -> int:
    from horovod.runner.gloo_run import create_run_env_vars
    from horovod.runner.http.http_server import RendezvousServer
    from horovod.runner.util.network import get_driver_ip

    hosts = job_hosts(args.np, os.environ)
    mpi = mpi_env(args.network_interface, os.environ) if args.mpi else {}
    forward = _Forwarder()
    for sig in STOP_SIGNALS:   # from here on: a stop before srun has started is passed on when it comes
        signal.signal(sig, forward)
    try:
        address = get_driver_ip([args.network_interface])
    except (KeyError, RuntimeError):
        raise LaunchError(f"no IPv4 address on network interface {args.network_interface!r} of "
                          f"{os.environ.get('SLURMD_NODENAME', 'this node')}: set NIC to the interface the nodes "
                          "reach each other on (ib0, eth0, ...)") from None
    rendezvous = RendezvousServer()
    port = rendezvous.start()
    rendezvous.init(plan(hosts))
    gloo = create_run_env_vars(address, [args.network_interface], port)   # horovodrun's, for these ranks too
    env = {**os.environ, **{k: str(v) for k, v in gloo.items()}, **mpi,
           PLAN_ENV: hosts, "PYTHONUNBUFFERED": "1", "HOROVOD_GLOO_TIMEOUT_SECONDS": str(args.start_timeout)}
    cmd = srun_command(args.np, hosts, args.command, shlex.split(args.srun_args), env, args.mpi)
    _say(f"rendezvous at {address}:{port} for {hosts}; {shlex.join(cmd[:9])} ...")
    try:
        forward.srun = subprocess.Popen(cmd, env=env)
        status = forward.srun.wait()
    finally:
        rendezvous.stop()
    status = 128 - status if status < 0 else status
    if status:
        _say(f"srun exited with status {status}; exiting with it")
    return status


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options (also read by the docs' command-line reference, docs/gen_reference.py)."""
    parser = argparse.ArgumentParser(prog="glow-dist-srun", description=__doc__.split("\n\n")[0])
    parser.add_argument("-np", "--num-proc", dest="np", type=int, required=True,
                        help="ranks in all, the same number on every node of the job")
    parser.add_argument("--network-interface", required=True, help="the NIC the ranks talk over (Gloo and NCCL)")
    parser.add_argument("--start-timeout", type=int, default=300,
                        help="seconds for every rank to reach the rendezvous (HOROVOD_GLOO_TIMEOUT_SECONDS)")
    parser.add_argument("--srun-args", default="", help="more srun options, one string (--gpu-bind=none ...)")
    parser.add_argument("--mpi", choices=["pmix"], default=None,
                        help="start the ranks with srun --mpi=pmix and Horovod's MPI controller (a Horovod built "
                             "with MPI); default: Gloo")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="what each rank runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["task"]:
        return task(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("no command to run")
    try:
        return launch(args)
    except LaunchError as e:
        _say(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())

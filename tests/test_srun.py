"""glow-dist-srun's parts that need no Slurm cluster (glow_dist/distributed/srun.py): each task's Horovod variables
from Slurm's task variables, equal to what horovodrun gives the same slot; a task placed where the rendezvous does
not expect it is one clear line; and a stop signal that reaches a task before its handler exists waits for it.
The launch route itself, with every way Slurm stops a job, runs on a real cluster in tests/test_slurm.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

pytest.importorskip("horovod.runner")
from horovod.runner.gloo_run import create_slot_env_vars  # noqa: E402

from glow_dist.distributed.srun import (  # noqa: E402
    PLAN_ENV,
    LaunchError,
    plan,
    slot_from_slurm,
    srun_command,
    tasks_per_node,
)

HOSTS = "gpu1:2,gpu2:2"   # what the launcher passes its tasks for a 2-node, 4-rank job


def slurm_task(procid: int, node: str, nodeid: int, localid: int, per_node: str = "2(x2)") -> dict[str, str]:
    """The variables srun gives task `procid` (srun(1), OUTPUT ENVIRONMENT VARIABLES)."""
    return {"SLURM_PROCID": str(procid), "SLURMD_NODENAME": node, "SLURM_NODEID": str(nodeid),
            "SLURM_LOCALID": str(localid), "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": per_node,
            PLAN_ENV: HOSTS}


def test_tasks_per_node_reads_slurms_compressed_counts():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]
    with pytest.raises(LaunchError, match="SLURM_STEP_TASKS_PER_NODE"):
        tasks_per_node("2x3")


def test_each_task_gets_the_horovod_variables_horovodrun_gives_its_slot():
    # srun's block distribution: tasks 0, 1 on gpu1 and 2, 3 on gpu2.
    tasks = [slurm_task(0, "gpu1", 0, 0), slurm_task(1, "gpu1", 0, 1), slurm_task(2, "gpu2", 1, 0),
             slurm_task(3, "gpu2", 1, 1)]
    slots = plan(HOSTS)
    for task, slot in zip(tasks, slots, strict=True):
        assert slot_from_slurm(task) == create_slot_env_vars(slot)


def test_a_task_placed_elsewhere_than_the_rendezvous_expects_is_one_line():
    # srun --distribution=cyclic would put task 1 on gpu2: the rendezvous would wait for it on gpu1 forever.
    with pytest.raises(LaunchError) as error:
        slot_from_slurm(slurm_task(1, "gpu2", 1, 0))
    message = str(error.value)
    assert "\n" not in message and "task 1 as local task 0 of 2 on gpu2" in message
    assert "block distribution" in message and HOSTS in message


def test_launcher_outside_slurm_says_so_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, "-m", "glow_dist.distributed.srun", "-np", "2", "--network-interface", "lo",
                          "true"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == ("glow-dist-srun: not inside a Slurm job (SLURM_JOB_NODELIST is not set): submit the "
                                  "batch script with sbatch, or launch with glow-dist-horovodrun")


# The rank, right after the task's exec: it signals itself before installing its handler (as Slurm's time-limit
# warning can reach a rank still importing torch), then installs glow-dist train's handler.
EARLY_SIGNAL = """
import os, signal, time
from glow_dist.training.stop import StopSignal
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.5)
print("alive before the handler", flush=True)
with StopSignal() as stop:
    print("stop requested:", stop.requested, stop.name, flush=True)
"""


def test_a_stop_signal_before_the_ranks_handler_waits_for_it():
    env = {**os.environ, **slurm_task(0, "gpu1", 0, 0)}
    out = subprocess.run([sys.executable, "-m", "glow_dist.distributed.srun", "task", sys.executable, "-c",
                          EARLY_SIGNAL], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr   # not killed by SIGUSR1's default action
    assert out.stdout.splitlines() == ["alive before the handler", "stop requested: True SIGUSR1"]


def test_the_mpi_route_runs_srun_with_pmix_and_refuses_a_horovod_without_mpi_in_one_line(tmp_path):
    """LAUNCHER=srun-mpi: `srun --mpi=pmix`; with the default Horovod (Gloo only, `make horovod`) the launcher
    stops before starting anything, in one line that says which build it needs."""
    cmd = srun_command(4, HOSTS, ["glow-dist", "train"], [], {"SLURM_CPUS_ON_NODE": "8"}, mpi="pmix")
    assert cmd[:3] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1"] and "--cpus-per-task=4" in cmd
    assert "--mpi=pmix" not in srun_command(4, HOSTS, ["glow-dist", "train"], [], {})
    built = subprocess.run([sys.executable, "-c", "import horovod.torch as h; print(h.mpi_built())"],
                           capture_output=True, text=True, timeout=120)
    if built.stdout.strip() != "False":
        pytest.skip("this Horovod has MPI built in: the refusal is for a Gloo-only build")
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho gpu1; echo gpu2\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    out = subprocess.run([sys.executable, "-m", "glow_dist.distributed.srun", "-np", "2", "--network-interface", "lo",
                          "--mpi", "pmix", "true"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (
        "glow-dist-srun: this Horovod was built without MPI, which --mpi (LAUNCHER=srun-mpi) needs: build it with "
        "GLOW_DIST_HOROVOD_MPI=1 launch/install-horovod.sh against the MPI the nodes run, or use LAUNCHER=srun (Gloo)")

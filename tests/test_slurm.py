"""The project's sbatch script on a real two-node Slurm 22.05 cluster (launch/slurm/local-cluster.sh): munged,
slurmctld, and slurmd on hostA and hostB, two network-namespace hosts with their own address and sshd, so that
horovodrun starts rank 1 on hostB over ssh as on a cluster. The script is `launch/slurm/celeba_hq_256.sbatch` as
users submit it; only what a user passes differs (sbatch options, GPUS_PER_NODE=1, the debug config, directories).

Every way Slurm stops a job is driven at once, on jobs that share the two nodes: the time-limit warning (the script
requeues itself), preemption by a job of the high-priority partition, `scontrol requeue`, `scancel`, and
`scancel --signal=USR1 --batch`. Each must end with a verified checkpoint, resume in the same MLflow run and finish
with the weights of a job that was never stopped. Then hostB dies mid-run: a plain job ends (it does not hang) and a
resubmission resumes; an elastic one goes on with hostA alone.

It runs once per launch route of the script (LAUNCHER): `srun` (the default: srun starts both ranks, glow-dist-srun
the Gloo rendezvous) on a cluster started with SSHD=0, where no sshd runs on either node, with every row; `ssh`
(horovodrun starts rank 1 over ssh, on the cluster with sshd on both nodes) with the rows whose code differs from
srun's (ROWS); and `srun-mpi` (srun --mpi=pmix, Horovod over Open MPI) where an MPI build of Horovod is installed
(MPI_VENV), with the rows that tell whether MPI behaves like Gloo. `-k srun` or `-k ssh` picks one.

Root, network namespaces and Debian's slurm-wlm and munge (installed if missing) are needed; elsewhere the module
skips and says why. `make test-slurm` runs it. The time from each signal to the checkpoint on disk and Slurm's final
state are printed (pytest -rP shows them).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from helpers import BIN, REPO, assert_identical, wait_for
from mlflow.tracking import MlflowClient

from glow_dist.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = REPO / "launch" / "slurm" / "local-cluster.sh"
SBATCH = "launch/slurm/celeba_hq_256.sbatch"
SKIP = 77  # local-cluster.sh: this machine cannot run it
CONTROLLER = "10.201.9.1"  # where the cluster's nodes reach this namespace (the MLflow server listens there)
STEPS = 200
# The debug model, each step held STEP_SECONDS (GLOW_DIST_INJECT_SLOW_STEP) so that the scheduler's signals find a
# job mid-run; a checkpoint every 50 steps for the lost node. Deterministic: a resumed job ends with the weights of
# one that never stopped.
TRAIN = [f"train.steps={STEPS}", "train.log_every=10", "train.eval_every=0", "train.sample_every=0",
         "train.checkpoint_every=50", "train.keep_checkpoints=100", "train.progress=false", "train.threads=1",
         "train.max_eval_batches=2", "train.deterministic=true", "tracking.log_checkpoints=false"]
STEP_SECONDS = "0.15"
# The time-limit job must still be training when the warning comes (up to about 52 s after it starts, on an idle
# machine too): its steps are held 0.3 s, 200 steps at least 60 s. Once it has requeued itself, its time limit is
# raised to 10 minutes (as root; a user would resubmit with a longer --time): each run would be warned again about
# 45 s after it starts, most of which a loaded machine spends starting the ranks, and the job would take many runs.
TIME_LIMIT_STEP_SECONDS = "0.3"
# The lost node's job under srun: 150 steps after its resume take at least 60 s, so its requeued run is training
# when the failed run's terminate request reaches hostB again (lost_node).
LOST_NODE_STEP_SECONDS = "0.4"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}


LAUNCHERS = ["ssh", "srun", "srun-mpi"]
# The Horovod built with MPI for LAUNCHER=srun-mpi (GLOW_DIST_HOROVOD_MPI=1 make horovod VENV=.venv-mpi): its own venv,
# never the default one. Without it, the srun-mpi route is skipped.
MPI_VENV = Path(os.environ.get("GLOW_DIST_MPI_VENV", REPO / ".venv-mpi"))
# Which rows run on which route. srun, the default, runs all. ssh runs the rows whose code differs from srun's:
# the ranks start over ssh (reference), a TERM forwarded by glow-dist-horovodrun to rank 0 with rank 1 stopped by
# the vote (scancel), a USR1 from the batch shell through glow-dist-horovodrun (scancel --signal=USR1 --batch: the
# time limit's path in the script as well), a lost node (its job FAILS instead of Slurm requeueing it) and elastic,
# and the pam_slurm_adopt drill. What it skips goes through the same script lines and the same launcher handler as a
# row it runs: preemption and `scontrol requeue` are scancel's SIGTERM (only Slurm's decision after it differs, and
# that is not the route's), the time limit is USR1 to the batch shell, a stop cut by KillWait is SIGKILL to rank 0 in
# the batch step on either route, and a lost peer's exit 69 is the script's logic (the launcher's pass-through of 69
# is make test-hosts' under horovodrun). srun-mpi runs the rows where MPI might differ from Gloo: the start, TERM,
# USR1 through srun (from scancel --batch and from the time-limit warning), a lost node.
ROWS = {"srun": {"reference", "time-limit", "preemption", "scontrol-requeue", "scancel", "scancel-usr1-batch",
                 "scancel-past-killwait", "lost-node", "peer-lost"},
        "ssh": {"reference", "scancel", "scancel-usr1-batch", "lost-node", "adopted"},
        "srun-mpi": {"reference", "time-limit", "scancel", "scancel-usr1-batch", "lost-node"}}


def needs_row(cluster: Cluster, row: str) -> None:
    if row not in ROWS[cluster.launcher]:
        pytest.skip(f"{row} on LAUNCHER={cluster.launcher}: the same code path as a row it runs (ROWS)")


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]
    launcher: str   # the sbatch script's LAUNCHER; "srun" and "srun-mpi" run on nodes without sshd
    bin: Path = BIN  # the venv the jobs run (BIN of launch/celeba_hq_256.sh)

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=120)
        assert not check or out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", job_id)))

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def node(self, action: str, node: str) -> None:
        out = subprocess.run(["bash", str(CLUSTER), action, str(self.dir), node], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr

    def sshd_on_nodes(self) -> list[str]:
        """Every sshd process inside the nodes' namespaces (`ip netns pids`), as "node:pid"."""
        found = []
        for node in ("A", "B"):
            pids = subprocess.run(["ip", "netns", "pids", f"glow{node}-slurm"], capture_output=True, text=True)
            found += [f"host{node}:{pid}" for pid in pids.stdout.split()
                      if Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"]
        return found


@pytest.fixture(scope="session", params=LAUNCHERS)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running two-node cluster for each launch route; stopped afterwards (jobs cancelled, daemons, namespaces and
    the /etc/hosts lines removed), even when a test fails. The srun route's nodes run no sshd (SSHD=0)."""
    launcher = request.param
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs Linux and root (network namespaces, munged, slurmd)")
    if not (BIN / "horovodrun").exists():
        pytest.skip("horovodrun is not installed in this environment: run `make horovod`")
    bin = BIN
    if launcher == "srun-mpi":
        bin = MPI_VENV / "bin"
        built = subprocess.run([str(bin / "python"), "-c", "import horovod.torch as h; print(h.mpi_built())"],
                               capture_output=True, text=True) if (bin / "python").exists() else None
        if built is None or built.stdout.strip() != "True":
            pytest.skip(f"no Horovod built with MPI in {MPI_VENV} (GLOW_DIST_HOROVOD_MPI=1 make horovod "
                        f"VENV={MPI_VENV}; needs openmpi-bin libopenmpi-dev libpmix-dev)")
    root = tmp_path_factory.mktemp(f"slurm-{launcher}")
    cmd = ["bash", str(CLUSTER)]
    try:
        up = subprocess.run([*cmd, "start", str(root)], capture_output=True, text=True, timeout=900,  # may apt-get
                            env={**os.environ, "SSHD": "1" if launcher == "ssh" else "0"})
        if up.returncode == SKIP:
            pytest.skip(up.stderr.strip())
        assert up.returncode == 0, up.stderr
        env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"),
               "PATH": f"{root / 'hosts' / 'bin'}:{BIN}:{os.environ['PATH']}"}
        if launcher == "srun-mpi":
            plugins = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, env=env)
            if "pmix" not in plugins.stdout + plugins.stderr:
                pytest.skip(f"Slurm has no mpi/pmix plugin here: {plugins.stdout + plugins.stderr}")
        yield Cluster(root, env, launcher, bin)
    finally:
        down = subprocess.run([*cmd, "stop", str(root)], capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="session")
def cluster_mlflow(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow server that the nodes reach (on the controller's address, not loopback)."""
    from test_tracking import Server

    server = Server(tmp_path_factory.mktemp("slurm_mlflow"), host=CONTROLLER).start()
    try:
        yield server.uri
    finally:
        server.stop()


@dataclass
class Job:
    """One submission of the sbatch script, its directories, and what the test did to it."""
    name: str
    dir: Path
    ids: list[str] = field(default_factory=list)   # a cancelled job's resubmission adds one
    signalled_at: float | None = None               # when the test acted (time.time())

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def output(self) -> str:
        return "".join(p.read_text() for p in sorted(self.dir.glob("job-*.out")))

    def steps_logged(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        return metrics.read_text().count("bits_per_dim/train") * 10 if metrics.exists() else 0


def submit(cluster: Cluster, uri: str, shards: Path, job: Job, *options: str, env: dict | None = None,
           args: tuple[str, ...] = ()) -> str:
    """sbatch the project's script as a user would for 2 nodes x 1 rank of the debug model."""
    job.dir.mkdir(parents=True, exist_ok=True)
    exports = {"GPUS_PER_NODE": "1", "NIC": "gd0", "SSH_PORT": "2222", "START_TIMEOUT": "120",
               "CONFIG": "configs/debug.yaml", "DATA": str(shards), "RUN_DIR": str(job.run_dir),
               "HOSTFILE": str(job.dir / "hostfile"), "MLFLOW_TRACKING_URI": uri,
               "GLOW_DIST_INJECT_SLOW_STEP": STEP_SECONDS, "LAUNCHER": cluster.launcher, "BIN": str(cluster.bin),
               **(env or {})}
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe",
           f"--job-name={job.name}", f"--output={job.dir / f'job-{len(job.ids)}.out'}", *options,
           SBATCH, *TRAIN, f"tracking.experiment=slurm-{job.name}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**cluster.env, **exports}, timeout=60)
    assert out.returncode == 0, out.stderr
    job.ids.append(out.stdout.strip().split(";")[0])
    return job.ids[-1]


def wait_final(cluster: Cluster, jobs: list[Job], timeout: float) -> None:
    def done() -> bool:
        return all(cluster.state(j.ids[-1]) in FINAL_STATES for j in jobs)

    wait_for(done, timeout, "final states of " + ", ".join(f"{j.name} ({j.ids[-1]})" for j in jobs))


def signal_times(output: str) -> list[float]:
    """The batch shell's timestamped lines for the signals it received (launch/slurm/celeba_hq_256.sbatch)."""
    return [datetime.fromisoformat(f"{m}+00:00").timestamp()
            for m in re.findall(r"^(\S+) (?:USR1|TERM|INT): ", output, re.MULTILINE)]


def stop_checkpoints(job: Job) -> list[tuple[int, Path]]:
    """(step, path) of every stop checkpoint the job's output reports."""
    return [(int(step), Path(path)) for step, path in
            re.findall(r"stopped by \S+ at step (\d+); checkpoint (\S+) saved and verified", job.output)]


def final_weights(run_dir: Path) -> dict:
    final = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert final["position"]["step"] == STEPS
    return final


def mlflow_runs(uri: str, job: Job) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"slurm-{job.name}")
    return client.search_runs([experiment.experiment_id]) if experiment else []


# ---------------------------------------------------------------------------------------------------------------------
# Item 2 and 3: one reference job and every stop path, all at once on the two nodes.

PATHS = ["time-limit", "preemption", "scontrol-requeue", "scancel", "scancel-usr1-batch"]
# scancel while the stop checkpoint takes longer than KillWait (30 s, Slurm's default, on the local cluster): every
# checkpoint write of that job is held 45 s (GLOW_DIST_INJECT_SLOW_CHECKPOINT), so SIGKILL cuts the stop's.
PAST_KILLWAIT = "scancel-past-killwait"
CUT_CHECKPOINT_SECONDS = "45"


@pytest.fixture(scope="module")
def stop_paths(cluster: Cluster, cluster_mlflow: str, digits_shards: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """Submits the reference job and one job per stop path, stops each once it has trained a few steps, resubmits
    the cancelled one, and waits until every job has finished. The tests then read what happened."""
    root = tmp_path_factory.mktemp("slurm-jobs")
    rows = ROWS[cluster.launcher]
    jobs = {name: Job(name, root / name) for name in ["reference", *PATHS, PAST_KILLWAIT] if name in rows}

    def sub(name: str, *options: str, env: dict | None = None) -> None:
        if name in jobs:
            submit(cluster, cluster_mlflow, digits_shards, jobs[name], *options, env=env)

    # `high` is never preempted, so only the job in `low` can make room for the preemptor. The warning of
    # --signal=B:USR1@60 with --time=2 comes 60-90 s before the limit (the controller checks every 30 s).
    for name in ["reference", "scontrol-requeue", "scancel", "scancel-usr1-batch"]:
        sub(name, "--partition=high")
    sub("time-limit", "--partition=high", "--time=2", "--signal=B:USR1@60",
        env={"GLOW_DIST_INJECT_SLOW_STEP": TIME_LIMIT_STEP_SECONDS})
    # The preemptor asks for 2500 MB per node, this job holds 2500 of the 4000 each node has: it must go.
    sub("preemption", "--partition=low", "--mem=2500")
    sub(PAST_KILLWAIT, "--partition=high", env={"GLOW_DIST_INJECT_SLOW_CHECKPOINT": CUT_CHECKPOINT_SECONDS})

    actions: dict[str, Callable[[str], object]] = {
        "scontrol-requeue": lambda i: cluster.run("scontrol", "requeue", i),
        "scancel": lambda i: cluster.run("scancel", i),
        "scancel-usr1-batch": lambda i: cluster.run("scancel", "--signal=USR1", "--batch", i),
        "preemption": lambda i: cluster.run("sbatch", "--parsable", "--partition=high", "--nodes=2", "--mem=2500",
                                            "--job-name=preemptor", "--output=/dev/null", "--wrap=sleep 3"),
    }

    actions[PAST_KILLWAIT] = actions["scancel"]

    def extend_time_limit(i: str) -> None:
        cluster.run("scontrol", "update", f"JobId={i}", "TimeLimit=10")

    actions["time-limit"] = extend_time_limit
    actions = {name: action for name, action in actions.items() if name in jobs}

    def ready(name: str) -> bool:
        job = jobs[name]
        if name == "time-limit":
            return "requeueing job" in job.output
        if name == PAST_KILLWAIT:   # after its first periodic checkpoint (step 50): the one to fall back to
            return bool(list_checkpoints(job.run_dir)) and job.steps_logged() >= 60
        return job.steps_logged() >= 20

    def act() -> bool:
        for name in list(actions):
            job = jobs[name]
            if ready(name) and (name == "time-limit" or cluster.state(job.ids[-1]) == "RUNNING"):
                if name != "time-limit":
                    job.signalled_at = time.time()
                actions.pop(name)(job.ids[-1])
        return not actions

    wait_for(act, 400, "every stop path's job to train and be stopped")
    for name in {"scancel", PAST_KILLWAIT} & set(jobs):   # the user resubmits a cancelled job: the same command
        wait_for(lambda n=name: cluster.state(jobs[n].ids[0]) in FINAL_STATES, 120, f"the cancelled {name} to end")
        sub(name, "--partition=high")
    wait_final(cluster, list(jobs.values()), 600)
    return jobs


def test_sbatch_trains_on_two_nodes_with_final_bits_per_dim_in_output_and_mlflow(stop_paths, cluster, cluster_mlflow):
    job = stop_paths["reference"]
    info = cluster.job(job.ids[0])
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job.output[-3000:]
    assert info["NodeList"] == "hostA,hostB"
    assert (job.dir / "hostfile").read_text().splitlines() == ["hostA slots=1", "hostB slots=1"]
    bpd = re.search(r"final test bits/dim (\d+\.\d+) with the EMA weights", job.output)
    assert bpd is not None, job.output[-3000:]
    (run,) = mlflow_runs(cluster_mlflow, job)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hosts"] == "2" and run.data.tags["world_size"] == "2"  # rank 1 really ran on hostB
    assert f"{run.data.metrics['bits_per_dim/test_ema']:.4f}" == bpd.group(1)
    if cluster.launcher != "ssh":   # srun started both ranks, and there was no sshd to start them otherwise
        assert "glow-dist-srun: rendezvous at 10.200.0.1:" in job.output, job.output[-3000:]
        assert ("srun --mpi=pmix" in job.output) == (cluster.launcher == "srun-mpi"), job.output[-3000:]
        assert cluster.sshd_on_nodes() == []
    else:
        assert "glow-dist-srun" not in job.output and len(cluster.sshd_on_nodes()) == 2
    print(f"[{cluster.launcher}] reference job {job.ids[0]}: {info['JobState']} on {info['NodeList']}, "
          f"final test bits/dim {bpd.group(1)} (EMA), MLflow run {run.info.run_id}")


@pytest.mark.parametrize("path", PATHS)
def test_stop_path_ends_with_a_verified_checkpoint_and_resumes_to_the_same_weights(stop_paths, cluster,
                                                                                   cluster_mlflow, path):
    needs_row(cluster, path)
    job, reference = stop_paths[path], stop_paths["reference"]
    output = job.output
    stops = stop_checkpoints(job)
    assert stops, f"{path}: no stop checkpoint reported\n{output[-4000:]}"
    for step, checkpoint in stops:
        verify_checkpoint(checkpoint)   # still intact after the resumed job finished
        assert f"resumed from {checkpoint}" in output, output[-4000:]
        assert 0 < step < STEPS
    info = cluster.job(job.ids[-1])
    assert info["JobState"] == "COMPLETED", f"{path}: {info}\n{output[-4000:]}"
    if path == "scancel":   # not requeued: cancelled for good, and the user's resubmission resumed
        first = cluster.job(job.ids[0])
        assert (first["JobState"], first["Restarts"]) == ("CANCELLED", "0"), first
        assert "requeueing job" not in output
    else:
        assert len(job.ids) == 1 and int(info["Restarts"]) >= 1, info
    if path in ("time-limit", "scancel-usr1-batch"):   # USR1 reached the batch shell, which requeued the job
        assert f"requeueing job {job.ids[0]}" in output and "USR1: the time limit is near" in output, output[-4000:]
    else:
        assert "TERM: stopping with a checkpoint" in output, output[-4000:]
    # One MLflow run from start to finish, and the weights of the job that never stopped.
    (run,) = mlflow_runs(cluster_mlflow, job)
    assert run.info.status == "FINISHED"
    assert {load_checkpoint(p)["mlflow_run_id"] for p in list_checkpoints(job.run_dir)} == {run.info.run_id}
    resumed, straight = final_weights(job.run_dir), final_weights(reference.run_dir)
    assert_identical(straight["model"], resumed["model"])
    assert_identical(straight["ema"], resumed["ema"])

    signalled = signal_times(output)[0] if path == "time-limit" else job.signalled_at
    written = Path(f"{stops[0][1]}.sha256").stat().st_mtime
    print(f"[{cluster.launcher}] {path}: job {','.join(job.ids)}; signal -> verified stop checkpoint "
          f"(step {stops[0][0]}) {written - signalled:.1f} s; {len(stops)} stop(s); final state {info['JobState']}, "
          f"Restarts={info['Restarts']}")


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: hostB dies mid-run (its slurmd, its sshd and the ranks on it, at once).

@dataclass
class LostNode:
    plain: Job
    elastic: Job
    state_after_loss: str          # the plain job's state once it stopped running
    requeued_run: str              # how the run that Slurm requeued for the node failure ended ("" if none)
    seconds_to_end: float          # from the loss to that state
    checkpoints_after_loss: list[Path]


@pytest.fixture(scope="module")
def lost_node(stop_paths, cluster: Cluster, cluster_mlflow: str, digits_shards: Path,
              tmp_path_factory: pytest.TempPathFactory) -> LostNode:
    """A plain job and an elastic one (ELASTIC=1, --no-kill) on both nodes. Once the plain one has a periodic
    checkpoint, hostB dies; the plain job must end by itself and the elastic one finish on hostA. Then hostB comes
    back and the plain job is resubmitted (unless Slurm requeued it for the node failure: then it runs again by
    itself). `stop_paths` first: the loss would stop those jobs too. The srun routes refuse ELASTIC=1 (the elastic
    job ends at once).

    Under srun the job must end COMPLETED by itself. The failed run's srun (--kill-on-bad-exit, rank 0 failed first)
    asked the controller to end step N.0, which the controller retries to hostB about once a minute
    (REQUEST_SIGNAL_TASKS); once hostB is back, its slurmd delivers it to the requeued run's step, also N.0, and
    the rank there stops (1 run in 3 with STEP_SECONDS). This job's steps are slowed to LOST_NODE_STEP_SECONDS so the
    requeued run is still training when that happens, and the sbatch script must requeue a run stopped this way
    (its shell got no signal) instead of ending FAILED with exit 75."""
    root = tmp_path_factory.mktemp("slurm-lost-node")
    plain, elastic = Job("lost-node", root / "plain"), Job("lost-node-elastic", root / "elastic")
    submit(cluster, cluster_mlflow, digits_shards, plain, "--partition=high",
           env={"GLOW_DIST_INJECT_SLOW_STEP": LOST_NODE_STEP_SECONDS} if cluster.launcher != "ssh" else None)
    submit(cluster, cluster_mlflow, digits_shards, elastic, "--partition=high", "--no-kill",
           env={"ELASTIC": "1", "MIN_NP": "1"}, args=("dist.commit_every=5",))

    elastic_runs = cluster.launcher == "ssh"

    def both_training() -> bool:
        return bool(list_checkpoints(plain.run_dir)) and cluster.state(plain.ids[0]) == "RUNNING" and \
            (not elastic_runs or (elastic.steps_logged() >= 20 and cluster.state(elastic.ids[0]) == "RUNNING"))

    wait_for(both_training, 300, "a checkpoint of the plain job and 20 steps of the elastic one")
    plain.signalled_at = time.time()
    cluster.node("node-kill", "hostB")
    ended = wait_for(lambda: (s := cluster.state(plain.ids[0])) not in ("RUNNING", "COMPLETING") and s, 300,
                     "the plain job to stop running after losing hostB")
    seconds = time.time() - plain.signalled_at
    checkpoints = list_checkpoints(plain.run_dir)
    wait_final(cluster, [elastic], 600)
    cluster.node("node-start", "hostB")
    if ended in FINAL_STATES:
        submit(cluster, cluster_mlflow, digits_shards, plain, "--partition=high")
    wait_final(cluster, [plain], 600)
    requeued_run = ""
    if ended not in FINAL_STATES:   # Slurm requeued it (srun waits for the lost node until Slurm declares it down)
        info = cluster.job(plain.ids[-1])
        stale = plain.output.count("stopped by a signal sent to an earlier run")
        requeued_run = (f"{info['JobState']} (exit {info['ExitCode']}, Restarts={info['Restarts']}; stopped by the "
                        f"failed run's late step-cancel request and requeued by the script {stale} time(s))")
    return LostNode(plain, elastic, ended, requeued_run, seconds, checkpoints)


def test_lost_node_ends_the_job_keeps_its_checkpoints_and_a_resubmission_resumes(lost_node, stop_paths, cluster,
                                                                                 cluster_mlflow):
    job = lost_node.plain
    assert lost_node.checkpoints_after_loss, job.output[-4000:]
    for path in lost_node.checkpoints_after_loss:
        verify_checkpoint(path)   # none was cut short by the loss
    last = lost_node.checkpoints_after_loss[-1]
    assert f"resumed from {last}" in job.output, job.output[-4000:]
    info = cluster.job(job.ids[-1])
    assert info["JobState"] == "COMPLETED", f"{info}\n{job.output[-4000:]}"
    if cluster.launcher != "ssh":   # requeued by Slurm, and by the script after the late request: not resubmitted
        assert len(job.ids) == 1 and lost_node.requeued_run, f"{info}\n{job.output[-4000:]}"
    (run,) = mlflow_runs(cluster_mlflow, job)
    assert run.info.status == "FINISHED"
    resumed, straight = final_weights(job.run_dir), final_weights(stop_paths["reference"].run_dir)
    assert_identical(straight["model"], resumed["model"])
    print(f"[{cluster.launcher}] lost node: job {job.ids[0]} {lost_node.state_after_loss} "
          f"{lost_node.seconds_to_end:.1f} s after hostB died; requeued run: {lost_node.requeued_run or '-'}; "
          f"resumed from {last.name} as job {job.ids[-1]}: {info['JobState']}")


def test_elastic_job_goes_on_with_one_node(lost_node, cluster, cluster_mlflow):
    job = lost_node.elastic
    info = cluster.job(job.ids[0])
    if cluster.launcher != "ssh":   # refused with one line: horovodrun's elastic driver needs the ssh route
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
        assert job.output.strip() == ("celeba_hq_256.sbatch: ELASTIC=1 needs LAUNCHER=ssh (horovodrun's elastic "
                                      "driver starts and restarts the ranks itself, over ssh; the srun routes do not "
                                      "run it): resubmit with LAUNCHER=ssh"), job.output
        return
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), f"{info}\n{job.output[-4000:]}"
    assert "world size 2 -> 1" in job.output, job.output[-4000:]
    (run,) = mlflow_runs(cluster_mlflow, job)
    assert run.info.status == "FINISHED"
    client = MlflowClient(cluster_mlflow)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size"))
    assert [w for _, w in history][:2] == [2.0, 1.0], history
    assert final_weights(job.run_dir)["position"]["step"] == STEPS
    print(f"elastic: job {job.ids[0]} {info['JobState']} after hostB died; world size {history}")


def test_scancel_past_killwait_keeps_the_previous_checkpoint_which_resumes(stop_paths, cluster, cluster_mlflow):
    """The stop checkpoint outlasts KillWait: SIGKILL cuts it, the half-written file is never taken for a checkpoint,
    and the resubmitted job resumes from the periodic one before and still ends with the reference's weights."""
    needs_row(cluster, PAST_KILLWAIT)
    job, reference = stop_paths[PAST_KILLWAIT], stop_paths["reference"]
    output = job.output
    first = cluster.job(job.ids[0])
    assert (first["JobState"], first["Restarts"]) == ("CANCELLED", "0"), first
    assert "TERM: stopping with a checkpoint" in output and not stop_checkpoints(job), output[-4000:]
    previous = job.run_dir / "checkpoints" / "ckpt-00000050.pt"
    verify_checkpoint(previous)
    assert f"resumed from {previous}" in output, output[-4000:]
    info = cluster.job(job.ids[-1])
    assert info["JobState"] == "COMPLETED", f"{info}\n{output[-4000:]}"
    (run,) = mlflow_runs(cluster_mlflow, job)
    assert run.info.status == "FINISHED"
    resumed, straight = final_weights(job.run_dir), final_weights(reference.run_dir)
    assert_identical(straight["model"], resumed["model"])
    assert_identical(straight["ema"], resumed["ema"])
    print(f"[{cluster.launcher}] {PAST_KILLWAIT}: job {job.ids[0]} CANCELLED, the stop checkpoint cut by SIGKILL "
          f"after KillWait; job {job.ids[-1]} resumed from {previous.name}: {info['JobState']}")


# ---------------------------------------------------------------------------------------------------------------------
# The cluster's folder: root trusts what it holds (munge.key, slurm.conf, the lines copied into /etc/hosts).

PLANTED = ["owned by another user", "writable by others", "a symbolic link", "below another user's folder"]


@pytest.mark.parametrize("how", PLANTED)
def test_local_cluster_refuses_a_folder_another_user_could_have_planted(tmp_path, how):
    """A folder that a local user created first (or can write or swap) is refused in one line, exit 2, before root
    reads anything from it. `status` and `env` go through the same check as `start` (start would otherwise set up
    the namespaces, which may not run beside another cluster)."""
    if os.geteuid() != 0:
        pytest.skip("the check guards root's use of the folder; as another user there is nothing to guard")
    tmp_path.chmod(0o700)
    planted = tmp_path / "glow-slurm"
    if how == "owned by another user":
        planted.mkdir()
        os.chown(planted, 12345, 12345)   # any uid but root's: the folder's maker
    elif how == "writable by others":
        planted.mkdir()
        planted.chmod(0o777)
    elif how == "a symbolic link":
        (tmp_path / "elsewhere").mkdir()
        planted.symlink_to(tmp_path / "elsewhere")
    else:
        (tmp_path / "users").mkdir()
        os.chown(tmp_path / "users", 12345, 12345)
        planted = tmp_path / "users" / "glow-slurm"
        planted.mkdir()
    (planted / "slurm.conf").write_text("SlurmctldHost=attacker\n")
    for action in ("status", "env"):
        out = subprocess.run(["bash", str(CLUSTER), action, str(planted)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stdout == "", (action, out)
        (line,) = out.stderr.splitlines()
        assert line.startswith(f"local-cluster: refusing {planted}: ") and "another user could have planted" in line
    fresh = tmp_path / "fresh"   # a folder of root's, 0700, is accepted
    fresh.mkdir(mode=0o700)
    out = subprocess.run(["bash", str(CLUSTER), "env", str(fresh)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"SLURM_CONF={fresh}/slurm.conf" in out.stdout, out


# ---------------------------------------------------------------------------------------------------------------------
# A site where processes started over ssh join the job (pam_slurm_adopt): scancel signals them too.

ADOPT_CHECKPOINT_SECONDS = "12"   # the stop checkpoint outlasts horovodrun's 5 s between SIGTERM and SIGKILL


def adopted_processes(cluster: Cluster, job_id: str, host: str) -> list[int]:
    """What pam_slurm_adopt puts into job `job_id` on `host`: each sshd session that started one of the job's ranks
    there (the child of the node's sshd listener that the rank descends from), and every process below it (the
    remote shell of horovodrun's command, the rank, its workers)."""
    listener = int((cluster.dir / "hosts" / f"sshd_{host}.pid").read_text())
    parent, environ = {}, {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ[int(entry.name)] = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
    sessions = set()
    for pid, env in environ.items():
        if f"SLURM_JOB_ID={job_id}".encode() in env and any(v.startswith(b"HOROVOD_RANK=") for v in env):
            p = pid
            while parent.get(p, listener) not in (listener, 0, 1):
                p = parent[p]
            if parent.get(p) == listener:
                sessions.add(p)

    def below(pid: int) -> list[int]:
        return [pid] + [d for child, up in parent.items() if up == pid for d in below(child)]

    return [pid for session in sorted(sessions) for pid in below(session)]


def job_ranks(job_id: str) -> list[int]:
    """The job's rank processes left on any node (SLURM_JOB_ID and HOROVOD_RANK in their environment)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env and any(v.startswith(b"HOROVOD_RANK=") for v in env):
            found.append(int(entry.name))
    return found


def test_scancel_that_also_signals_the_ranks_ssh_sessions_still_ends_with_the_stop_checkpoint(
        cluster, cluster_mlflow, digits_shards, tmp_path_factory):
    """scancel on a site with pam_slurm_adopt: SIGTERM to every process of the job on every host, on hostB the
    sshd session that horovodrun opened there and everything below it (its `bash -c` wrapper, the rank). The stop
    checkpoint takes longer than horovodrun's 5 s grace; it must still be written and verified, not cut by
    horovodrun killing rank 0 because rank 1's ssh ended."""
    needs_row(cluster, "adopted")   # srun opens no ssh session for pam_slurm_adopt to adopt: its tasks are the job's
    job = Job("adopted", tmp_path_factory.mktemp("slurm-adopted") / "job")
    submit(cluster, cluster_mlflow, digits_shards, job, "--partition=high",
           env={"GLOW_DIST_INJECT_SLOW_CHECKPOINT": ADOPT_CHECKPOINT_SECONDS})
    job_id = job.ids[0]
    wait_for(lambda: job.steps_logged() >= 20 and cluster.state(job_id) == "RUNNING", 300, "the job to train")
    on_b = adopted_processes(cluster, job_id, "hostB")
    assert on_b, "no process of the job found below hostB's sshd"
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") for pid in on_b}
    job.signalled_at = time.time()
    cluster.run("scancel", job_id)   # SIGTERM to the job's processes on hostA (its batch step), SIGKILL KillWait later
    for pid in on_b:                 # ... and, as pam_slurm_adopt makes it, to the ones it adopted on hostB
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        wait_final(cluster, [job], 120)
        # Rank 1 lost its session (its output goes nowhere now) but stopped with rank 0 and exited by itself.
        wait_for(lambda: not job_ranks(job_id), 60, f"the ranks of job {job_id} to exit")
    finally:
        for pid in job_ranks(job_id):   # what a real site's job end would SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = job.output
    print(f"adopted: job {job_id}, SIGTERM on hostB to {sorted(names.values())}\n{output[-3000:]}")
    stops = stop_checkpoints(job)
    assert stops, f"no stop checkpoint: horovodrun ended the job first\n{output[-4000:]}"
    verify_checkpoint(stops[0][1])
    # horovodrun did not take rank 1's ended session for a failed rank; rank 0's status (75) is the launcher's.
    assert "Terminating remaining workers after failure of Process 1" not in output, output[-4000:]
    assert "rank 1 on hostB: its ssh session ended with the stop signal" in output, output[-4000:]
    assert "glow-dist-horovodrun: a rank exited with status 75; exiting with it" in output, output[-4000:]
    written = Path(f"{stops[0][1]}.sha256").stat().st_mtime
    print(f"adopted: signal -> verified stop checkpoint (step {stops[0][0]}) {written - job.signalled_at:.1f} s; "
          f"final state {cluster.state(job_id)}")


def test_a_lost_peer_requeues_the_job_a_bounded_number_of_times(cluster, cluster_mlflow, digits_shards,
                                                                 tmp_path_factory):
    """Exit status 69 (a peer was lost: here rank 1 on hostB stalls in step 7, which the step watchdog ends) makes
    the sbatch script requeue the job, which resumes from the newest verified checkpoint; with PEER_LOST_RETRIES=1
    the second loss ends the job FAILED with exit status 69 instead of requeueing forever."""
    needs_row(cluster, "peer-lost")
    job = Job("peer-lost", tmp_path_factory.mktemp("slurm-peer-lost"))
    submit(cluster, cluster_mlflow, digits_shards, job, "--partition=high",
           env={"GLOW_DIST_INJECT_STALL": "7:1", "PEER_LOST_RETRIES": "1", "GLOW_DIST_INJECT_SLOW_STEP": "0"},
           args=("train.checkpoint_every=2", "dist.hang_timeout=15"))
    wait_final(cluster, [job], 900)
    output, info = job.output, cluster.job(job.ids[0])
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "69:0", "1"), \
        f"{info}\n{output[-4000:]}"
    assert output.count("a peer was lost (exit 69): requeueing job") == 1, output[-4000:]
    assert "a peer was lost (exit 69) again: not requeueing" in output, output[-4000:]
    assert output.count("glow-dist train: peer error: rank 1 on hostB is alive but did not finish step 8") == 2
    assert f"resumed from {job.run_dir / 'checkpoints' / 'ckpt-00000006.pt'}" in output, output[-4000:]
    print(f"peer lost: job {job.ids[0]} requeued once, then {info['JobState']} with exit {info['ExitCode']}")

"""A real two-host Horovod run on one machine: two network namespaces (hostA, hostB) joined by a veth pair, an sshd
in each, and `horovodrun -H hostA:1,hostB:1 --network-interfaces gd0` launched from inside hostA, so rank 1 starts
over ssh and every byte of rendezvous and all-reduce crosses the veth link, as between two machines.

Needs root and network namespaces (launch/netns-hosts.sh installs openssh-server/iproute2 if missing);
elsewhere it skips and says why.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import wait_for
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETUP = REPO / "launch" / "netns-hosts.sh"
SKIP = 77  # the setup script's "this machine cannot do it" exit code

pytestmark = [pytest.mark.slow, pytest.mark.hosts]


def netns(hosts_dir: Path, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SETUP), args[0], str(hosts_dir), *args[1:]], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[Path]:
    """The setup folder of two namespaces with sshd running; everything is torn down afterwards, even on failure."""
    if sys.platform != "linux" or os.geteuid() != 0:
        reason = "two-host test needs Linux and root (network namespaces, sshd)"
        print(reason)
        pytest.skip(reason)
    hosts_dir = tmp_path / "hosts"
    hosts_dir.mkdir()
    daemons: list[subprocess.Popen] = []
    try:
        up = netns(hosts_dir, "up", str(os.getpid() % 10**6), timeout=600)  # may apt-get install openssh-server
        if up.returncode == SKIP:
            print(up.stderr.strip())
            pytest.skip(up.stderr.strip())
        assert up.returncode == 0, up.stderr
        for host in ("hostA", "hostB"):
            daemons.append(subprocess.Popen(["bash", str(SETUP), "sshd", str(hosts_dir), host],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ready = netns(hosts_dir, "wait")
        assert ready.returncode == 0, ready.stderr
        yield hosts_dir
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        netns(hosts_dir, "down")


def test_two_hosts_over_ssh_train_in_lockstep(two_hosts, tmp_path, digits_shards):
    out = tmp_path / "out"
    train = [sys.executable, str(REPO / "tests" / "scripts" / "train_check.py"), str(out),
             "--config", "configs/debug.yaml", f"data.root={digits_shards}", f"train.run_dir={tmp_path / 'run'}",
             f"tracking.local_dir={tmp_path / 'mlflow'}", "train.steps=4", "train.log_every=2",
             "train.eval_every=100", "train.sample_every=100", "train.checkpoint_every=100",
             "train.max_eval_batches=2", "train.progress=false", "train.threads=1"]
    horovodrun = [str(BIN / "horovodrun"), "-np", "2", "-H", "hostA:1,hostB:1", "--gloo",
                  "--network-interfaces", "gd0", "-p", "2222", "--ssh-identity-file", str(two_hosts / "id_ed25519"),
                  "--start-timeout", "60", "--disable-cache", *train]
    # The venv's bin first: rank 1's environment (PATH included) is exported to hostB through ssh by horovodrun.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(SETUP), "run", str(two_hosts), *horovodrun], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, f"horovodrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"

    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["world"] == r1["world"]
    for key, value in r0["final"].items():
        assert torch.equal(value, r1["final"][key]), f"{key} differs between hostA and hostB"
    assert not torch.equal(r0["after_init"]["top"], r0["final"]["top"])  # training moved the weights
    # The trainer counted two distinct hosts (their hostnames), so rank 1 really ran inside hostB.
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}").get_run(r0["run_id"])
    assert run.data.tags["hosts"] == "2"


# ---------------------------------------------------------------------------------------------------------------------
# Secrets in the launching environment: on no command line on either host, and still with the ranks.

def in_host(hosts_dir: Path, host: str) -> list[str]:
    """The command prefix that runs inside `host`'s network namespace."""
    namespaces = (hosts_dir / "namespaces").read_text().split()
    return ["ip", "netns", "exec", namespaces[0 if host == "hostA" else 1]]


def net_namespace(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class CommandLineWatch(threading.Thread):
    """Reads every process's command line (/proc/*/cmdline: what `ps` shows any user) every 0.1 s until stopped;
    keeps those that hold one of `values`, and the network namespace of every rank process seen (HOROVOD_RANK in its
    environment), so the test knows that both hosts were watched while their ranks ran."""

    def __init__(self, values: list[str]) -> None:
        super().__init__(daemon=True)
        self.values = [v.encode() for v in values]
        self.leaks: dict[int, str] = {}
        self.ranks: dict[int, tuple[str, int | None]] = {}   # pid -> (HOROVOD_RANK, net namespace inode)
        self.scans = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                    if any(v in cmdline for v in self.values):
                        self.leaks[int(proc.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:3000]
                    if int(proc.name) not in self.ranks:
                        rank = re.search(rb"(?:^|\0)HOROVOD_RANK=(\d+)\0", (proc / "environ").read_bytes())
                        if rank:
                            self.ranks[int(proc.name)] = (rank.group(1).decode(), net_namespace(proc.name))
                except OSError:
                    continue
            self.scans += 1


@pytest.fixture
def auth_server_in_host_a(two_hosts: Path, tmp_path: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    """launch/mlflow-server.sh AUTH=basic inside hostA, on hostA's address on the link (so hostB reaches it too):
    (its URI, the admin's (user, password))."""
    from test_tracking import Server

    root = tmp_path / "mlflow-server"
    root.mkdir()
    admin = ("admin", f"adm1n-{secrets.token_hex(8)}")
    password_file = root / "admin-password"
    password_file.write_text(admin[1])
    password_file.chmod(0o600)
    server = Server(root, port=5055, host="10.200.0.1",
                    script_env={"AUTH": "basic", "ADMIN_PASSWORD_FILE": str(password_file)})
    cmd, env = server.command()
    log = open(root / "server.log", "a")  # noqa: SIM115  (the server keeps writing to it)
    proc = subprocess.Popen([*in_host(two_hosts, "hostA"), *cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        probe = ("import sys, urllib.request, urllib.error\n"
                 "try: urllib.request.urlopen(sys.argv[1], timeout=2)\n"
                 "except urllib.error.HTTPError as e: print(e.code)\n"
                 "except OSError: print('down')\n"
                 "else: print(200)\n")

        def status(path: str) -> str:
            return subprocess.run([*in_host(two_hosts, "hostA"), sys.executable, "-c", probe, f"{server.uri}{path}"],
                                  capture_output=True, text=True, timeout=60).stdout.strip()

        wait_for(lambda: proc.poll() is not None or status("/health") == "200", 180, "the MLflow server in hostA",
                 log=root / "server.log")
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        # Authentication is on: an anonymous request is refused.
        assert status("/api/2.0/mlflow/experiments/search?max_results=1") == "401"
        yield server.uri, admin
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_secrets_stay_off_every_command_line_on_both_hosts_and_the_remote_rank_authenticates(
        two_hosts, auth_server_in_host_a, tmp_path, digits_shards):
    """glow-dist-horovodrun from hostA with rank 0 on hostB (over ssh): the MLflow password and two other secrets
    are in the launching environment. No process on either host shows any of them on its command line while the
    job runs, and rank 0, on the far side of ssh, still logs to the authenticated server."""
    uri, (user, password) = auth_server_in_host_a
    secret_values = {"MLFLOW_TRACKING_PASSWORD": password, "AWS_SECRET_ACCESS_KEY": f"aws-{secrets.token_hex(12)}",
                     "AWS_SESSION_TOKEN": f"session-{secrets.token_hex(12)}"}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_USERNAME": user, **secret_values,
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "120", "GLOW_DIST_INJECT_SLOW_STEP": "0.5"}
    run_dir = tmp_path / "run"
    launcher = [str(BIN / "glow-dist-horovodrun"), "-np", "2", "-H", "hostB:1,hostA:1", "--gloo",
                "--network-interfaces", "gd0", "-p", "2222", "--ssh-identity-file", str(two_hosts / "id_ed25519"),
                "--start-timeout", "60", "--disable-cache",
                "glow-dist", "train", "--config", "configs/debug.yaml", f"data.root={digits_shards}",
                f"train.run_dir={run_dir}", f"tracking.uri={uri}", "tracking.experiment=secrets", "train.steps=6",
                "train.log_every=2", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=6",
                "train.max_eval_batches=2", "train.progress=false", "train.threads=1",
                "tracking.system_metrics=false", "tracking.log_checkpoints=false"]
    watch = CommandLineWatch(list(secret_values.values()))
    watch.start()
    try:
        result = subprocess.run(["bash", str(SETUP), "run", str(two_hosts), *launcher], capture_output=True,
                                text=True, cwd=REPO, env=env, timeout=400)
    finally:
        watch.done.set()
        watch.join()
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    assert not watch.leaks, "secrets on command lines:\n" + "\n".join(f"{p}: {c}" for p, c in watch.leaks.items())
    namespaces = (two_hosts / "namespaces").read_text().split()
    host_of = {os.stat(f"/run/netns/{ns}").st_ino: host
               for ns, host in zip(namespaces, ("hostA", "hostB"), strict=True)}
    # (rank processes of other jobs on this machine, in no namespace of ours, do not count)
    seen = {(rank, host_of[ns]) for rank, ns in watch.ranks.values() if ns in host_of}
    assert {("0", "hostB"), ("1", "hostA")} <= seen, (seen, watch.scans)   # both hosts watched while ranks ran

    # Rank 0, started over ssh on hostB, authenticated: the run is on the server with its metrics.
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow-server' / 'mlflow.db'}")
    (experiment,) = [e for e in store.search_experiments() if e.name == "secrets"]
    (run,) = store.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["hosts"] == "2"
    assert [m.step for m in store.get_metric_history(run.info.run_id, "bits_per_dim/train")] == [2, 4, 6]
    print(f"{watch.scans} scans of every command line on both hosts, none held a secret; ranks seen {sorted(seen)}; "
          f"MLflow run {run.info.run_id} FINISHED as user {user!r}")

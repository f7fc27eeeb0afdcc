"""A real two-host Horovod run on one machine: two network namespaces (hostA, hostB) joined by a veth pair, an sshd
in each, and `horovodrun -H hostA:1,hostB:1 --network-interfaces gd0` launched from inside hostA, so rank 1 starts
over ssh and every byte of rendezvous and all-reduce crosses the veth link, as between two machines.

Needs root and network namespaces (launch/netns-hosts.sh installs openssh-server/iproute2 if missing);
elsewhere it skips and says why.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETUP = REPO / "launch" / "netns-hosts.sh"
SKIP = 77  # the setup script's "this machine cannot do it" exit code

pytestmark = pytest.mark.slow


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

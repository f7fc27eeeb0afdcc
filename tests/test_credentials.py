"""Secrets in the environment stay off command lines (glow_dist/distributed/credentials.py): which variables count,
glow-dist-horovodrun's ranks on one host (the two-host run over ssh, against an authenticated MLflow server, is in
tests/test_multihost.py), a rank whose secrets never arrive, and the Docker route's `docker run` lines."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import BIN, REPO, env_with_venv

from glow_dist.distributed.credentials import ON_STDIN, docker_env_args, is_secret


def test_which_variables_are_secrets():
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AZURE_STORAGE_CONNECTION_STRING", "GITHUB_TOKEN", "DB_PASSWORD", "WANDB_API_KEY", "HF_TOKEN",
                 "APP_SECRET", "SSH_PRIVATE_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert is_secret(name), name
    for name in ("PATH", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "AWS_ACCESS_KEY_ID", "NCCL_SOCKET_IFNAME",
                 "TOKENIZERS_PARALLELISM", "HOROVOD_SECRET_KEY"):   # the last is Horovod's own business
        assert not is_secret(name), name
    # A URL with a password in it, under any name.
    assert is_secret("MLFLOW_TRACKING_URI", "https://alice:hunter2@mlflow-host")
    assert not is_secret("MLFLOW_TRACKING_URI", "https://mlflow-host:5000")
    assert docker_env_args({"MLFLOW_TRACKING_USERNAME": "a", "MLFLOW_TRACKING_PASSWORD": "b", "PATH": "/bin"}) == [
        "-e", "MLFLOW_TRACKING_PASSWORD", "-e", "MLFLOW_TRACKING_USERNAME"]
    # data on an object store: the token is a secret; the store's address goes with the keys into a container
    assert is_secret("AWS_SESSION_TOKEN") and not is_secret("AWS_ENDPOINT_URL")
    assert docker_env_args({"AWS_ENDPOINT_URL": "http://10.0.0.5:9000", "AWS_ACCESS_KEY_ID": "a",
                            "AWS_SECRET_ACCESS_KEY": "b", "AWS_SESSION_TOKEN": "c", "AWS_REGION": "eu-1"}) == [
        "-e", "AWS_ACCESS_KEY_ID", "-e", "AWS_ENDPOINT_URL", "-e", "AWS_REGION", "-e", "AWS_SECRET_ACCESS_KEY",
        "-e", "AWS_SESSION_TOKEN"]


RANK = """
import hashlib, json, os, sys
from glow_dist.distributed.credentials import receive
names = receive()
seen = {n: hashlib.sha256(os.environ.get(n, '').encode()).hexdigest() for n in sys.argv[2:]}
open(os.path.join(sys.argv[1], 'rank' + os.environ['HOROVOD_RANK'] + '.json'), 'w').write(json.dumps([names, seen]))
"""


def leaks_while(proc: subprocess.Popen, values: list[str]) -> dict[int, str]:
    """Every process's command line read every 0.05 s until `proc` ends: those holding one of `values`."""
    found: dict[int, str] = {}
    needles = [v.encode() for v in values]
    while proc.poll() is None:
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(n in cmdline for n in needles):
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
        threading.Event().wait(0.05)
    return found


@pytest.mark.slow
def test_ranks_get_the_secrets_and_no_command_line_shows_them(tmp_path):
    if not (BIN / "horovodrun").exists():
        pytest.skip("horovodrun is not installed in this environment: run `make horovod`")
    values = {"MLFLOW_TRACKING_PASSWORD": f"pw-{secrets.token_hex(8)}",
              "AWS_SECRET_ACCESS_KEY": f"aws-{secrets.token_hex(8)}",
              "MY_SERVICE_TOKEN": f"tok-{secrets.token_hex(8)} with spaces ' and \" quotes",
              "MLFLOW_TRACKING_URI": f"http://alice:{secrets.token_hex(8)}@mlflow-host:5000"}
    cmd = [str(BIN / "glow-dist-horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
           sys.executable, "-c", RANK, str(tmp_path), *values]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_with_venv(values), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    leaks = leaks_while(proc, list(values.values()))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert not leaks, leaks
    want = {n: hashlib.sha256(v.encode()).hexdigest() for n, v in values.items()}
    for rank in (0, 1):
        names, seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(names) == sorted(values) and seen == want, (rank, names)


def test_a_rank_whose_secrets_never_arrive_says_so_in_one_line():
    """The launcher promised secrets on stdin (ON_STDIN) and something between closed it: one line, exit 2, before
    any command runs (a rank must not go on to a tracking server without its password)."""
    out = subprocess.run([sys.executable, "-m", "glow_dist", "config"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, ON_STDIN: "MLFLOW_TRACKING_PASSWORD", "HOROVOD_RANK": "3"})
    assert out.returncode == 2 and out.stdout == "", out
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"glow-dist: rank 3 on {os.uname().nodename}: glow-dist-horovodrun sends "
                           "MLFLOW_TRACKING_PASSWORD on the rank's standard input, and they did not arrive"), line


def test_make_docker_train_passes_credentials_by_name_only(tmp_path):
    values = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": f"pw-{secrets.token_hex(8)}",
              "AWS_SESSION_TOKEN": f"tok-{secrets.token_hex(8)}"}
    out = subprocess.run(["make", "-n", "--no-print-directory", "docker-train", "GPUS=0", f"DATA={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, **values})
    assert out.returncode == 0, out.stderr
    text = out.stdout.replace("\\\n", " ")
    assert values["MLFLOW_TRACKING_PASSWORD"] not in text and values["AWS_SESSION_TOKEN"] not in text
    runs = [shlex.split(line) for line in text.splitlines() if line.startswith("docker run") and "glow-dist " in line]
    assert len(runs) == 2   # training and evaluate: both talk to MLflow
    for run in runs:
        named = {run[i + 1] for i, arg in enumerate(run) if arg == "-e"}
        assert set(values) <= named, run


def test_k8s_manifests_give_secrets_only_from_kubernetes_secrets():
    """No secret is written into a manifest (where `kubectl get -o yaml` and every command line show it): a secret
    variable comes from a Secret (valueFrom), and no command or argument holds one."""
    import yaml

    for path in (REPO / "launch" / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for containers in _find(doc, "containers"):
                for container in containers:
                    for env in container.get("env", []):
                        assert not is_secret(env["name"], str(env.get("value", ""))) or "value" not in env, (path, env)
                    for arg in [*container.get("command", []), *container.get("args", [])]:
                        name, _, value = str(arg).partition("=")
                        assert not (value and is_secret(name.lstrip("-"), value)), (path, arg)


def _find(node: object, key: str) -> list:
    if isinstance(node, dict):
        return ([node[key]] if key in node else []) + [f for v in node.values() for f in _find(v, key)]
    if isinstance(node, list):
        return [f for v in node for f in _find(v, key)]
    return []

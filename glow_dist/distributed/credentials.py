"""Secrets in the environment, kept off every command line: which variables are secrets, and how
glow-dist-horovodrun hands them to the ranks.

horovodrun (Gloo) starts each rank as `env VAR=value ... python ...`, over `ssh host '...'` on other hosts, with every
exported variable written out (horovod 0.28.1, runner/gloo_run.py): on every host, any user could read
MLFLOW_TRACKING_PASSWORD or AWS_SECRET_ACCESS_KEY in `ps`. glow-dist-horovodrun keeps the variables that `is_secret`
names off those command lines, and its per-rank middleman writes them as one JSON line to the rank command's standard
input: a pipe on this host, ssh's own encrypted channel to another one. The rank reads that line first thing
(`receive`, from the CLI's main, before MLflow or boto read the environment). Nothing is written to any disk, so
nothing is left behind when a job is killed; the variable ON_STDIN (names only) tells the rank to read.

    python -m glow_dist.distributed.credentials docker-env   # `-e NAME` for each credential set here (Makefile)
"""
from __future__ import annotations

import json
import os
import re
import select
import sys
import time
from collections.abc import Mapping

# Names that hold a secret whatever they are called: the ones glow-dist's users set (docs/security.md) ...
SECRET_NAMES = frozenset({
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY", "DATABRICKS_TOKEN", "HF_TOKEN", "WANDB_API_KEY", "NETRC",
})
# ... and any other whose name says it is one, word by word (GITHUB_TOKEN, DB_PASSWORD, MY_API_KEY, APP_SECRET,
# SSH_PRIVATE_KEY; not TOKENIZERS_PARALLELISM).
SECRET_WORDS = re.compile(r"(^|_)(PASSWORD|PASSWD|PASSPHRASE|SECRETS?|TOKEN|APIKEY|CREDENTIALS?|"
                          r"(API|ACCESS|SECRET|PRIVATE|SIGNING)_KEY|CONNECTION_STRING)(_|$)", re.IGNORECASE)
# A URL with a password in it (postgresql://user:password@host, http://user:password@mlflow-host) is one too.
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
# Horovod's own variables (HOROVOD_SECRET_KEY) are Horovod's to handle.
NOT_OURS = "HOROVOD_"
# Who the secrets belong to and where they are used: not secret (an account name, a key's public id, the object
# store's address and region), but useless without them, so forwarded by name into containers with them.
COMPANIONS = ("MLFLOW_TRACKING_USERNAME", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
              "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE")

ON_STDIN = "GLOW_DIST_SECRETS_ON_STDIN"   # set by the launcher: the secret names that come on the rank's stdin
READ_TIMEOUT_S = 120.0


class CredentialsError(RuntimeError):
    """The launcher said secrets would come on standard input and they did not."""


def is_secret(name: str, value: str = "") -> bool:
    """True when the environment variable `name` (holding `value`) must stay off command lines."""
    if name.startswith(NOT_OURS) or name in COMPANIONS:
        return False
    return name in SECRET_NAMES or bool(SECRET_WORDS.search(name)) or bool(URL_WITH_PASSWORD.search(value))


def secrets_in(environ: Mapping[str, str]) -> dict[str, str]:
    """The secret variables of `environ`."""
    return {name: value for name, value in environ.items() if is_secret(name, value)}


def encode(secrets: Mapping[str, str]) -> bytes:
    """What the middleman writes to a rank's stdin: one JSON line."""
    return json.dumps(dict(secrets), separators=(",", ":")).encode() + b"\n"


def _read_line(fd: int, timeout: float) -> bytes:
    """Bytes from `fd` up to the first newline or EOF, waiting at most `timeout` seconds in all."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def receive(timeout: float = READ_TIMEOUT_S) -> list[str]:
    """In a rank started by glow-dist-horovodrun: read the secrets from stdin into this process's environment
    (so MLflow, boto and every child process find them as usual) and return their names; a no-op elsewhere."""
    names = os.environ.pop(ON_STDIN, None)
    if names is None:
        return []
    expected = [n for n in names.split(",") if n]
    where = f"rank {os.environ.get('HOROVOD_RANK', '?')} on {os.uname().nodename}"
    try:
        line = _read_line(sys.stdin.fileno(), timeout)
        secrets = json.loads(line) if line else None
    except (OSError, ValueError, TimeoutError):
        secrets = None
    if not isinstance(secrets, dict) or sorted(secrets) != sorted(expected):
        raise CredentialsError(
            f"{where}: glow-dist-horovodrun sends {', '.join(expected)} on the rank's standard input, and they did "
            f"not arrive within {timeout:g} s. Something between the launcher and the rank closed or replaced stdin "
            "(an ssh wrapper with -n, a remote shell that reads stdin); launch with plain ssh, or give the ranks the "
            "credentials another way (~/.mlflow/credentials on every host; docs/security.md)")
    os.environ.update({str(k): str(v) for k, v in secrets.items()})
    return expected


def docker_env_args(environ: Mapping[str, str]) -> list[str]:
    """`-e NAME` (never `-e NAME=value`, which `ps` would show) for each credential set in `environ`: docker run
    copies the value from its own environment."""
    names = sorted(set(secrets_in(environ)) | {n for n in COMPANIONS if n in environ})
    return [arg for name in names for arg in ("-e", name)]


if __name__ == "__main__":
    if sys.argv[1:] != ["docker-env"]:
        sys.exit("usage: python -m glow_dist.distributed.credentials docker-env")
    print(" ".join(docker_env_args(os.environ)))

"""The tracking server on a cluster's stores, for real: launch/mlflow-server.sh with runs in PostgreSQL (a cluster of
its own, tests/postgres_server.py) and artifacts proxied onto an S3 bucket (SeaweedFS, tests/object_store.py), with
AUTH=basic and its users in PostgreSQL too. A 2-rank training run logs metrics, sample images, checkpoints and the
registered model through it, with no storage credentials on the training side; the objects are in the bucket and
the rows in the database; `glow-dist sample --model models:/NAME/1` loads the model back through the server. A
store the server cannot use stops its start with one line.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from helpers import BASE, REPO, env_with_venv, horovodrun_cmd, load_ckpt, train_cmd
from object_store import ADMIN_KEY, READER_KEY, SeaweedS3
from postgres_server import PostgresServer, postgres_server  # noqa: F401 - the session's PostgreSQL
from test_tracking import Server, _free_port

pytestmark = [pytest.mark.s3, pytest.mark.slow]

SCRIPT = REPO / "launch" / "mlflow-server.sh"
BUCKET = "tracking"
DB_PASSWORD = f"db-{secrets.token_hex(8)}"
ADMIN = ("admin", f"adm1n-{secrets.token_hex(8)}")
TRAINER = ("trainer", f"tra1ner-{secrets.token_hex(8)}")
MODEL = "glow-store"
# A loaded 2-core machine and the auth app's deliberately slow password hash (tests/test_tracking_auth.py)
SLOW_SERVER = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}


def s3_variables(store: SeaweedS3, key: tuple[str, str] = ADMIN_KEY) -> dict[str, str]:
    """The AWS SDK's variables for the store (endpoint, keys; no profile files): the server's environment only."""
    return {k: v for k, v in store.env(key).items() if k.startswith("AWS_")}


def without_storage_credentials(extra: dict[str, str]) -> dict[str, str]:
    """A training machine's environment: nothing of the object store (artifacts go through the tracking server)."""
    env = env_with_venv(extra)
    return {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}


@pytest.fixture(scope="module")
def store_server(postgres_server: PostgresServer, s3_store: SeaweedS3,  # noqa: F811
                 tmp_path_factory: pytest.TempPathFactory):
    for database in ("mlflow", "mlflow_auth"):
        postgres_server.create_database(database, database, DB_PASSWORD)
    s3_store.make_bucket(BUCKET)
    root = tmp_path_factory.mktemp("store_server")
    password_file = root / "admin-password"
    password_file.write_text(ADMIN[1])
    password_file.chmod(0o600)
    server = Server(root, script_env={
        "AUTH": "basic", "ADMIN_PASSWORD_FILE": str(password_file),
        "BACKEND_STORE_URI": postgres_server.uri("mlflow", "mlflow", DB_PASSWORD),
        "AUTH_DATABASE_URI": postgres_server.uri("mlflow_auth", "mlflow_auth", DB_PASSWORD),
        "ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow", **s3_variables(s3_store)}).start()
    try:
        requests.post(f"{server.uri}/api/2.0/mlflow/users/create", auth=ADMIN, timeout=120,
                      json={"username": TRAINER[0], "password": TRAINER[1]}).raise_for_status()
        yield server
    finally:
        server.stop()


def test_training_logs_to_postgres_and_s3_and_the_model_loads_back(store_server: Server, digits_shards: Path,
                                                                     postgres_server: PostgresServer,  # noqa: F811
                                                                     s3_store: SeaweedS3, tmp_path: Path) -> None:
    # A checkpoint of the debug model is 200 KB: files from 128 KiB go by proxied multipart upload (the parts
    # straight into the bucket through the server's presigned URLs), as a real checkpoint of 500 MB or more does.
    env = without_storage_credentials({**SLOW_SERVER, "MLFLOW_TRACKING_USERNAME": TRAINER[0],
                                       "MLFLOW_TRACKING_PASSWORD": TRAINER[1],
                                       "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(128 << 10)})
    run_dir = tmp_path / "run"
    train = subprocess.run(horovodrun_cmd(2, *train_cmd(
        *BASE, f"data.root={digits_shards}", f"train.run_dir={run_dir}", f"tracking.uri={store_server.uri}",
        "tracking.experiment=store-test", "tracking.log_checkpoints=all", f"tracking.register_as={MODEL}",
        "tracking.system_metrics=false")),
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert train.returncode == 0, f"{train.stdout[-3000:]}\n{train.stderr[-3000:]}"
    assert "WARNING" not in train.stderr, train.stderr[-3000:]   # not one upload refused or retried
    run_id = load_ckpt(run_dir, 6)["mlflow_run_id"]

    # The runs are rows of PostgreSQL ...
    status, artifact_uri, experiment_id = postgres_server.query(
        "mlflow", "SELECT status, artifact_uri, experiment_id FROM runs WHERE run_uuid = %s", (run_id,))[0]
    assert status == "FINISHED" and artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
    steps = postgres_server.query("mlflow", "SELECT step FROM metrics WHERE run_uuid = %s AND key = %s ORDER BY step",
                                  (run_id, "bits_per_dim/train"))
    assert [s for (s,) in steps] == [2, 4, 6]
    assert postgres_server.query("mlflow", "SELECT name, version, run_id FROM model_versions") == [(MODEL, 1, run_id)]
    assert {u for (u,) in postgres_server.query("mlflow_auth", "SELECT username FROM users")} == {ADMIN[0], TRAINER[0]}
    # ... the artifacts objects of the bucket, and nothing on the server's disk.
    prefix = f"mlflow/{experiment_id}/{run_id}/artifacts/"
    bucket = s3_store.client()
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"mlflow/{experiment_id}/")["Contents"]]
    names = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    assert {"config.yaml", "checkpoints/ckpt-00000003.pt", "checkpoints/ckpt-00000006.pt",
            "checkpoints/ckpt-00000006.pt.sha256"} <= names, keys
    assert any(n.startswith("images/samples~T") for n in names), keys   # the sample grids (MLflow's image log)
    # MLflow 3 keeps a logged model's files beside the runs: mlflow/<experiment>/models/<model id>/artifacts/
    assert any(k.startswith(f"mlflow/{experiment_id}/models/") and k.endswith("/MLmodel") for k in keys), keys
    assert any(k.startswith(f"mlflow/{experiment_id}/models/") and k.endswith("weights.pt") for k in keys), keys
    local = (run_dir / "checkpoints" / "ckpt-00000006.pt").read_bytes()
    remote = bucket.get_object(Bucket=BUCKET, Key=f"{prefix}checkpoints/ckpt-00000006.pt")["Body"].read()
    assert hashlib.sha256(remote).hexdigest() == hashlib.sha256(local).hexdigest()
    log = (store_server.root / "server.log").read_text()
    assert "/mlflow-artifacts/mpu/complete/" in log and "checkpoints/ckpt-00000006.pt" in log
    assert not list(store_server.root.rglob("artifacts")) and not (REPO / "s3:").exists()

    # The registered model loads back through the server (its weights.pt out of the bucket), for a teammate.
    grid = tmp_path / "grid.png"
    sample = subprocess.run([sys.executable, "-m", "glow_dist", "sample", "--model", f"models:/{MODEL}/1", "--n", "4",
                             "--out", str(grid)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**env, "MLFLOW_TRACKING_URI": store_server.uri})
    assert sample.returncode == 0 and grid.is_file(), sample.stderr[-3000:]

    # No secret on any command line of the server's processes (`ps` shows them to every user of the machine); the
    # auth config, which holds its database's URI, is readable by its owner only.
    server = psutil.Process(store_server.proc.pid)
    for proc in [server, *server.children(recursive=True)]:
        command_line = " ".join(proc.cmdline())
        for secret in (DB_PASSWORD, ADMIN_KEY[1], ADMIN[1]):
            assert secret not in command_line, command_line
    assert (store_server.root / "basic_auth.ini").stat().st_mode & 0o077 == 0


def test_without_auth_the_same_stores_serve_a_run(postgres_server: PostgresServer,  # noqa: F811
                                                   s3_store: SeaweedS3, tmp_path: Path) -> None:
    """The script's route without AUTH (a network only trusted machines reach): the same two stores, a run and an
    artifact through the server's API."""
    from mlflow.tracking import MlflowClient

    postgres_server.create_database("mlflow_open", "mlflow_open", DB_PASSWORD)
    s3_store.make_bucket("open")
    server = Server(tmp_path / "home", script_env={
        "BACKEND_STORE_URI": postgres_server.uri("mlflow_open", "mlflow_open", DB_PASSWORD),
        "ARTIFACTS_DESTINATION": "s3://open/mlflow", **s3_variables(s3_store)}).start()
    try:
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("open"))
        client.log_metric(run.info.run_id, "bits_per_dim/test_ema", 3.5, step=7)
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run.info.run_id)
        commands = [" ".join(p.cmdline()) for p in [psutil.Process(server.proc.pid),
                                                    *psutil.Process(server.proc.pid).children(recursive=True)]]
    finally:
        server.stop()
    assert postgres_server.query("mlflow_open", "SELECT r.status, m.value, m.step FROM runs r JOIN metrics m ON "
                                 "m.run_uuid = r.run_uuid WHERE r.run_uuid = %s", (run.info.run_id,)) == [
        ("FINISHED", 3.5, 7)]
    key = f"mlflow/{run.info.experiment_id}/{run.info.run_id}/artifacts/note.txt"
    assert s3_store.client().get_object(Bucket="open", Key=key)["Body"].read() == b"hello"
    assert not any(DB_PASSWORD in c or ADMIN_KEY[1] in c for c in commands), commands


def start_script(env: dict[str, str], cwd: Path, timeout: float = 90) -> tuple[int | None, str]:
    """launch/mlflow-server.sh until it exits (or `timeout`: then it is stopped, and the status is None)."""
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err


def script_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "MLFLOW_HOME": str(tmp_path / "home"), "PORT": str(_free_port()), "WORKERS": "1",
            "MLFLOW": str(Path(sys.executable).parent / "mlflow"), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **variables}


@pytest.fixture(scope="module")
def fault_stores(postgres_server: PostgresServer, s3_store: SeaweedS3) -> None:  # noqa: F811
    """A database and a bucket that work, for the faults to break one thing at a time (the bucket's name is this
    module's own: the data suite shares the session's store)."""
    postgres_server.create_database("mlflow_faults", "mlflow_faults", DB_PASSWORD)
    s3_store.make_bucket("server-faults")


@pytest.mark.parametrize("fault", ["wrong database password", "database down", "no such database",
                                   "wrong S3 secret", "read-only S3 key", "no such bucket", "object store down"])
def test_an_unusable_store_stops_the_start_in_one_line(fault: str, fault_stores: None,
                                                        postgres_server: PostgresServer,  # noqa: F811
                                                        s3_store: SeaweedS3, tmp_path: Path) -> None:
    """Each store is reached once before MLflow starts: one line naming the store, where and what to set; exit 2,
    no server left (without the check MLflow retries a refused database for two minutes and ends in a traceback,
    and serves happily on an object store it cannot write to)."""
    database = {"wrong database password": postgres_server.uri("mlflow_faults", "mlflow_faults", "not-it"),
                "database down": f"postgresql://mlflow_faults:{DB_PASSWORD}@127.0.0.1:{_free_port()}/mlflow_faults",
                "no such database": postgres_server.uri("nope", "mlflow_faults", DB_PASSWORD)}.get(
        fault, postgres_server.uri("mlflow_faults", "mlflow_faults", DB_PASSWORD))
    s3 = s3_variables(s3_store, READER_KEY if fault == "read-only S3 key" else ADMIN_KEY)
    if fault == "wrong S3 secret":
        s3["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-key-0123456789"
    if fault == "object store down":
        s3["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_free_port()}"
    bucket = "missing" if fault == "no such bucket" else "server-faults"
    env = script_env(tmp_path, BACKEND_STORE_URI=database, ARTIFACTS_DESTINATION=f"s3://{bucket}/mlflow", **s3)
    start = time.monotonic()
    status, err = start_script(env, tmp_path)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err[-3000:]
    assert time.monotonic() - start < 60 and not (tmp_path / "home").exists()
    for secret in (DB_PASSWORD, "not-it", ADMIN_KEY[1], READER_KEY[1], "not-the-secret-key"):
        assert secret not in err
    port = postgres_server.port
    expected = {
        "wrong database password": f"BACKEND_STORE_URI: cannot connect to the postgresql database 'mlflow_faults' at "
                                   f"127.0.0.1:{port} as user 'mlflow_faults': ",
        "database down": "BACKEND_STORE_URI: cannot connect to the postgresql database 'mlflow_faults' at 127.0.0.1:",
        "no such database": f"BACKEND_STORE_URI: cannot connect to the postgresql database 'nope' at 127.0.0.1:{port}",
        "wrong S3 secret": f"ARTIFACTS_DESTINATION=s3://server-faults/mlflow: the object store at {s3_store.endpoint} "
                           "refused to let the server reach the bucket 'server-faults' (HTTP 403",
        "read-only S3 key": f"ARTIFACTS_DESTINATION=s3://server-faults/mlflow: the object store at {s3_store.endpoint} "
                            "refused to let the server write to the bucket 'server-faults' (HTTP 403",
        "no such bucket": f"ARTIFACTS_DESTINATION=s3://missing/mlflow: the object store at {s3_store.endpoint} has no "
                          "bucket 'missing'",
        "object store down": f"ARTIFACTS_DESTINATION=s3://server-faults/mlflow: cannot reach the object store at "
                             f"{s3['AWS_ENDPOINT_URL']} (from AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL)",
    }[fault]
    assert lines[0].startswith(f"mlflow-server.sh: {expected}"), lines[0]
    detail = {"wrong database password": "password authentication failed", "database down": "refused",
              "no such database": 'database "nope" does not exist', "wrong S3 secret": "credentials from env",
              "read-only S3 key": "credentials from env", "no such bucket": "create it",
              "object store down": "Start it"}[fault]
    assert detail in lines[0], lines[0]


def test_sqlite_runs_with_s3_artifacts_make_no_local_folder(fault_stores: None, s3_store: SeaweedS3,
                                                            tmp_path: Path) -> None:
    """The default sqlite store beside an s3:// artifact destination: the script made a folder named `s3:` in the
    working directory (mkdir -p of the destination whenever the backend was sqlite)."""
    env = script_env(tmp_path, ARTIFACTS_DESTINATION="s3://server-faults/mlflow", MLFLOW="false",
                     PYTHON=sys.executable, **s3_variables(s3_store))
    status, err = start_script(env, tmp_path)
    assert status == 1 and err.strip() == "", err   # the check passed and the script got as far as exec (`false`)
    assert not (tmp_path / "s3:").exists() and (tmp_path / "home").is_dir()

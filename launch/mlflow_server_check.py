"""Checks launch/mlflow-server.sh runs before it starts MLflow on a database or an object store: each store is reached
once, and a store that cannot be used ends the start with one line saying which store, where, what went wrong and
what to set. Without it MLflow retries a refused database for about two minutes and then exits with a traceback, and
an unusable artifact store shows only at the first upload, as an HTTP 500 in a training job's log.

    MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://... MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow \
    AUTH_DATABASE_URI=... python launch/mlflow_server_check.py

The store URIs come from the environment only (they may hold a database password; command lines are public); no
password or key is ever printed. Run with the server's own Python (SQLAlchemy, the database driver and boto3 are
MLflow's and the `server` extra's). Exit status 2 and one line on stderr when a store is unusable, 0 otherwise.
The object store is written to: an empty object `<prefix>/.mlflow-server-check` is put and deleted again, since
MLflow needs to write and delete (checkpoint rotation), and read-only credentials would pass a read check.
"""
from __future__ import annotations

import os
import sys

LOCAL_SCHEMES = ("sqlite:", "file:")
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
PROBE = ".mlflow-server-check"


class StoreError(Exception):
    """A store the server cannot use: the message is the line for the operator."""


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(error).__name__


def check_database(variable: str, uri: str) -> None:
    """Connect once (10 s at most) to a database store; local sqlite files are left to MLflow."""
    if not uri or uri.startswith(LOCAL_SCHEMES) or "://" not in uri:
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    backend = url.get_backend_name()
    where = (f"{backend} database {url.database!r} at {url.host}:{url.port or DEFAULT_PORTS.get(backend, '?')} "
             f"as user {url.username!r}")
    connect_args = {"connect_timeout": 10} if backend in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except ModuleNotFoundError as error:
        raise StoreError(f"{variable}: no driver for {url.drivername} in this Python ({error.name} is not "
                         "installed): pip install 'glow-dist[server]' in the server's environment") from None
    try:
        with engine.connect():
            pass
    except Exception as error:  # noqa: BLE001 - the driver's own error, reported in one line
        raise StoreError(f"{variable}: cannot connect to the {where}: {_first_line(error)}. Check the host, port, "
                         f"user, password and database name in {variable} (the database must exist; MLflow creates "
                         "its tables)") from None
    finally:
        engine.dispose()


def check_object_store(variable: str, uri: str) -> None:
    """Reach the bucket with the server's credentials and write (and delete) an empty object under the prefix."""
    if not uri.startswith("s3://"):
        return
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    session = boto3.Session()
    credentials = session.get_credentials()
    source = f"credentials from {credentials.method}" if credentials else "no credentials"
    client = session.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None,
                            config=Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 2}))
    endpoint = client.meta.endpoint_url
    setting = ("MLFLOW_S3_ENDPOINT_URL" if os.environ.get("MLFLOW_S3_ENDPOINT_URL") else
               "AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL" if endpoint and "amazonaws.com" not in endpoint else
               "AWS_ENDPOINT_URL, or AWS's default")
    probe = f"{prefix.strip('/')}/{PROBE}".lstrip("/")
    step = "reach the bucket"
    try:
        client.head_bucket(Bucket=bucket)
        step = "write to the bucket"
        client.put_object(Bucket=bucket, Key=probe, Body=b"")
        step = "delete from the bucket"
        client.delete_object(Bucket=bucket, Key=probe)
    except NoCredentialsError:
        raise StoreError(f"{variable}={uri}: no S3 credentials in the server's environment: set AWS_ACCESS_KEY_ID "
                         "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the mlflow server") from None
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "?"))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            raise StoreError(f"{variable}={uri}: the object store at {endpoint} has no bucket {bucket!r}: create "
                             f"it, or name an existing one in {variable}") from None
        answer = f"HTTP {status}" + (f" {code}" if code != str(status) else "")
        if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StoreError(f"{variable}={uri}: the object store at {endpoint} refused to let the server {step} "
                             f"{bucket!r} ({answer}; {source}): give the server's AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY read, write and delete rights on it") from None
        raise StoreError(f"{variable}={uri}: the object store at {endpoint} failed to {step} {bucket!r} "
                         f"({answer})") from None
    except BotoCoreError as error:
        raise StoreError(f"{variable}={uri}: cannot reach the object store at {endpoint} (from {setting}): "
                         f"{_first_line(error)}. Start it, or set {setting} to its address in the server's "
                         "environment") from None


def main() -> int:
    try:
        check_database("BACKEND_STORE_URI", os.environ.get("MLFLOW_BACKEND_STORE_URI", ""))
        check_database("AUTH_DATABASE_URI", os.environ.get("AUTH_DATABASE_URI", ""))
        check_object_store("ARTIFACTS_DESTINATION", os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", ""))
    except StoreError as error:
        print(f"mlflow-server.sh: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real PostgreSQL server for the tests: Debian's postgresql (initdb, postgres) in a cluster of its own, in a
temporary folder, on a free port of 127.0.0.1, TCP only (no Unix socket), password (scram-sha-256) authentication.

    db = PostgresServer().start()        # initdb + start: a few seconds
    db.create_database("mlflow", "mlflow", "PASSWORD")
    db.uri("mlflow", "mlflow", "PASSWORD")   # postgresql://mlflow:PASSWORD@127.0.0.1:PORT/mlflow
    db.query("mlflow", "SELECT count(*) FROM runs")
    db.stop()                            # fast shutdown by pid (SIGINT, as `pg_ctl stop -m fast`), folder removed

PostgreSQL refuses to run as root, so as root every server command runs as the `postgres` user (setpriv, which execs:
the pid started is the postmaster's), and the cluster's folder is owned by it. It is a folder of its own under the
system's temporary directory, not pytest's tmp_path, whose parents are root's and closed to other users.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)   # Debian's layout, newest first
SUPERUSER = "postgres"


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, postgres): Debian's versioned folder, else PATH; skips when absent."""
    for folder in BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.superuser_password = secrets.token_hex(16)
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        assert self.folder is not None
        return self.folder / "data"

    @property
    def log(self) -> Path:
        assert self.folder is not None
        return self.folder / "postgres.log"

    def _as_postgres(self, cmd: list[str]) -> list[str]:
        """As root, the command run as the postgres user (setpriv execs it: no extra parent process)."""
        if os.geteuid() != 0:
            return cmd
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user for PostgreSQL (apt-get install postgresql)")
        return ["setpriv", f"--reuid={SUPERUSER}", f"--regid={SUPERUSER}", "--init-groups", "--", *cmd]

    def start(self, timeout: float = 60.0) -> PostgresServer:
        initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
        self.folder = Path(tempfile.mkdtemp(prefix="glow-dist-postgres-"))
        password_file = self.folder / "superuser-password"
        password_file.write_text(self.superuser_password + "\n")
        password_file.chmod(0o600)
        if os.geteuid() == 0:
            account = pwd.getpwnam(SUPERUSER)
            for path in (self.folder, password_file):
                os.chown(path, account.pw_uid, account.pw_gid)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        done = subprocess.run(self._as_postgres([initdb, "-D", str(self.data), "-U", SUPERUSER, "--auth=scram-sha-256",
                                                 f"--pwfile={password_file}", "-E", "UTF8", "--no-sync"]),
                              capture_output=True, text=True, env=env, cwd=self.folder, timeout=120)
        password_file.unlink()
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self._as_postgres([postgres, "-D", str(self.data), "-p", str(self.port), "-c",
                                   "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off"]),
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                text = self.log.read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"postgres exited with {self.process and self.process.returncode}: {text}")
            try:
                self.query("postgres", "SELECT 1")
                return self
            except Exception as error:  # noqa: BLE001 - refused, or "the database system is starting up"
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres not ready within {timeout:.0f} s ({error}); log {self.log}") from None
                time.sleep(0.2)

    def connect(self, database: str, user: str = SUPERUSER, password: str | None = None):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=database, user=user,
                               password=password or self.superuser_password, connect_timeout=5, autocommit=True)

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one statement, as the superuser."""
        with self.connect(database) as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str, owner: str, password: str) -> None:
        """A login role with this password and a database it owns (as a DBA makes them for MLflow)."""
        from psycopg import sql

        with self.connect("postgres") as connection, connection.cursor() as cursor:
            # CREATE ROLE takes no bind parameters: the password is quoted as a literal by psycopg
            cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(owner),
                                                                              sql.Literal(password)))
            cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner)))

    def uri(self, database: str, user: str, password: str) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def stop(self, grace: float = 30.0) -> None:
        """Fast shutdown by pid (SIGINT: what `pg_ctl stop -m fast` sends), KILL after `grace`; folder removed."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGINT)
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL cluster per session (tests make their own databases)."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()

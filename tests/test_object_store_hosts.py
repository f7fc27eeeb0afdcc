"""Two hosts (network namespaces with their own sshd, launch/netns-hosts.sh; root) train from an s3:// root served by
a real S3 server (SeaweedFS) inside hostA on the link address: each host fills its own node-local cache once, and a
second job on both downloads nothing. Marker hosts (`make test-hosts`, under the engines' lock)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from object_store import SeaweedS3
from test_multihost import BIN, REPO, SETUP, in_host, two_hosts  # noqa: F401 - the fixture
from test_object_store_data import upload_folder

pytestmark = [pytest.mark.slow, pytest.mark.hosts]


def test_two_hosts_each_fill_their_own_cache_once(two_hosts: Path, tmp_path: Path,  # noqa: F811
                                                  digits_shards: Path) -> None:
    staging = SeaweedS3(tmp_path / "weed").start()   # on 127.0.0.1 to put the data in, then in hostA, same data
    try:
        staging.make_bucket("hosts")
        upload_folder(staging, digits_shards, "hosts", "digits")
    finally:
        staging.stop()
    store = SeaweedS3(tmp_path / "weed", host="10.200.0.1", wrap=in_host(two_hosts, "hostA"))
    store.master_port, store.volume_port, store.filer_port, store.s3_port = \
        staging.master_port, staging.volume_port, staging.filer_port, staging.s3_port
    store.start()
    try:
        cache = tmp_path / "cache-{host}"   # one home folder, one cache per host (as on separate disks)
        env = {**store.env(), "PATH": f"{BIN}:{os.environ['PATH']}"}
        launcher = [str(BIN / "glow-dist-horovodrun"), "-np", "2", "-H", "hostA:1,hostB:1", "--gloo",
                    "--network-interfaces", "gd0", "-p", "2222", "--ssh-identity-file", str(two_hosts / "id_ed25519"),
                    "--start-timeout", "60", "--disable-cache",
                    sys.executable, "-m", "glow_dist", "train", "--config", "configs/debug.yaml",
                    "data.root=s3://hosts/digits", f"data.cache_dir={cache}", "data.backend=webdataset",
                    f"tracking.local_dir={tmp_path / 'mlflow'}", "train.steps=2",
                    "train.log_every=2", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=0",
                    "train.max_eval_batches=1", "train.progress=false", "train.threads=1"]
        stamps = {}
        for job in (1, 2):
            result = subprocess.run(["bash", str(SETUP), "run", str(two_hosts), *launcher,
                                     f"train.run_dir={tmp_path / f'run{job}'}"], capture_output=True,
                                    text=True, cwd=REPO, env=env, timeout=400)
            output = result.stdout[-4000:] + result.stderr[-4000:]
            assert result.returncode == 0, output
            assert ("10 file(s) downloaded" if job == 1 else "0 file(s) downloaded") in output, output
            for host in ("hostA", "hostB"):
                folder = tmp_path / f"cache-{host}"
                for path in digits_shards.iterdir():
                    assert (folder / path.name).read_bytes() == path.read_bytes(), (host, path.name)
                inodes = {p.name: p.stat().st_ino for p in folder.glob("*.tar")}
                assert stamps.setdefault(host, inodes) == inodes, f"{host} downloaded again in job {job}"
    finally:
        store.stop()

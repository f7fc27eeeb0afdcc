"""Data on object storage: `prepare --out s3://`, the node-local shard cache, streaming on both backends, and the
faults a user meets, against a real S3 server (SeaweedFS, tests/object_store.py), Python's http.server, Debian's
nginx over HTTPS (tests/nginx_server.py: Range requests, so streaming) and real Horovod ranks.
Marker s3 (`make test-s3`)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import BASE, BIN, REPO, assert_identical, env_with_venv, load_ckpt, mounted_tmpfs, wait_for
from nginx_server import Nginx, self_signed
from object_store import ADMIN_KEY, READER_KEY, SeaweedS3

from glow_dist.config import DataConfig, ModelConfig
from glow_dist.data import DataError, make_loader
from glow_dist.data.remote import open_ranged
from glow_dist.data.shard_cache import _open_root, open_root

pytestmark = pytest.mark.s3
MODEL = ModelConfig(image_size=8, channels=1)
LINE = "glow-dist train: data error:"


# --- helpers ---------------------------------------------------------------------------------------------------------

def upload_folder(store: SeaweedS3, folder: Path, bucket: str, prefix: str) -> None:
    client = store.client()
    for path in sorted(folder.iterdir()):
        if path.name != "manifest.json":
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    client.upload_file(str(folder / "manifest.json"), bucket, f"{prefix}/manifest.json")


@functools.cache
def digits_in(store: SeaweedS3, bucket: str, shards: Path) -> str:
    """The session's digits shards under s3://bucket/digits (uploaded once per store and bucket)."""
    with contextlib.suppress(Exception):
        store.make_bucket(bucket)
    upload_folder(store, shards, bucket, "digits")
    return f"s3://{bucket}/digits"


@pytest.fixture()
def aws(s3_store: SeaweedS3, monkeypatch: pytest.MonkeyPatch):
    """This process's environment set for the session's store (as a user's shell would be); the memo of opened roots
    forgotten, so that each test opens its roots itself."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3_store.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    _open_root.cache_clear()
    yield s3_store
    _open_root.cache_clear()


def opened(root: str, cache_dir: Path, **kw) -> object:
    _open_root.cache_clear()
    return open_root(DataConfig(root=root, cache_dir=str(cache_dir), **kw))


def batches(root: str, backend: str, cache: str, cache_dir: Path, rank: int = 0, epoch: int = 1,
            start: int = 2) -> torch.Tensor:
    """Images of `epoch` from batch `start` on (a resumed epoch), for rank `rank` of 2."""
    cfg = DataConfig(root=root, backend=backend, cache=cache, cache_dir=str(cache_dir))
    loader = make_loader(cfg, MODEL, "train", rank, 2, 16, "cpu", seed=3)
    return torch.stack([images for images, _ in loader.epoch(epoch, start_batch=start)])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def big_dataset(folder: Path, shards: int, mib: int) -> Path:
    """A data set of `shards` shards of random bytes (only the cache reads them: files and sha256 must agree)."""
    folder.mkdir(parents=True)
    entries = []
    for i in range(shards):
        tar, idx = folder / f"train-{i:06d}.tar", folder / f"train-{i:06d}.idx"
        tar.write_bytes(os.urandom(mib << 20))
        idx.write_text("v1.2 0\n")
        entries.append({"file": tar.name, "index": idx.name, "num_samples": 0, "sha256": sha(tar)})
    manifest = {"format": "glow-dist-shards", "version": 1, "source": "random", "image_size": 8, "channels": 1,
                "image_ext": "png", "splits": {"train": {"num_samples": 0, "shards": entries}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


FILL = ("import sys; from glow_dist.config import DataConfig; from glow_dist.data.shard_cache import open_root; "
        "print(open_root(DataConfig(root=sys.argv[1], cache_dir=sys.argv[2])).line, flush=True)")


def fill_process(root: str, cache_dir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FILL, root, str(cache_dir)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# --- the test store itself ------------------------------------------------------------------------------------------

def test_the_test_store_takes_writes_to_many_buckets_on_a_small_disk(tmp_path: Path) -> None:
    """SeaweedFS gives each bucket 7 volumes at its first write; with its slots sized by free disk space, a CI machine
    with less free disk failed every write past the fifth bucket (InternalError), failing five tests here."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted_tmpfs(disk, "2g"):
        store = SeaweedS3(disk).start()
        try:
            client = store.client()
            for i in range(12):
                client.create_bucket(Bucket=f"bucket-{i:02d}")
                client.put_object(Bucket=f"bucket-{i:02d}", Key="k", Body=b"x" * 1000)
        finally:
            store.stop()


# --- prepare ---------------------------------------------------------------------------------------------------------

def test_prepare_to_s3_uploads_the_same_files_manifest_last_and_refuses_a_non_empty_prefix(
        s3_store: SeaweedS3, digits_shards: Path) -> None:
    s3_store.make_bucket("prepared")
    cmd = [sys.executable, "-m", "glow_dist", "prepare", "digits", "--out", "s3://prepared/v1", "--shard-size", "500"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=s3_store.env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    client = s3_store.client()
    listed = {o["Key"]: o for o in client.list_objects_v2(Bucket="prepared", Prefix="v1/")["Contents"]}
    assert sorted(k.split("/", 1)[1] for k in listed) == sorted(p.name for p in digits_shards.iterdir())
    for path in digits_shards.iterdir():   # prepare is deterministic: the bytes of a local prepare
        body = client.get_object(Bucket="prepared", Key=f"v1/{path.name}")["Body"].read()
        assert body == path.read_bytes(), path.name
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=s3_store.env(), timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip() == ("glow-dist prepare: --out s3://prepared/v1 is not empty (11 object(s), e.g. "
                                    "manifest.json); pass --overwrite to replace the data set in it")
    denied = subprocess.run([*cmd[:6], "s3://prepared/v2", *cmd[7:]], capture_output=True, text=True, cwd=REPO,
                            env=s3_store.env(READER_KEY), timeout=300)
    assert denied.returncode == 2 and "Traceback" not in denied.stderr, denied.stderr[-3000:]
    assert "writing to bucket 'prepared'" in denied.stderr and f"key id {READER_KEY[0]}" in denied.stderr
    assert READER_KEY[1] not in denied.stderr


def test_publish_uploads_the_manifest_last_and_an_overwrite_deletes_the_old_one_first(aws: SeaweedS3,
                                                                                      digits_shards: Path) -> None:
    from glow_dist.data.prepare import OUR_FILES
    from glow_dist.data.publish import check_target, publish
    from glow_dist.data.s3_store import S3Store

    events: list[tuple[str, str]] = []

    class Recorded(S3Store):   # the real store; the order of its requests noted
        def upload(self, path: str, name: str) -> None:
            super().upload(path, name)
            events.append(("uploaded", name))

        def delete(self, names: list[str]) -> None:
            events.append(("deleting", ",".join(names)))
            super().delete(names)

    aws.make_bucket("order")
    publish(digits_shards, Recorded("s3://order/v1"), [])
    assert len(events) == 11 and events[-1] == ("uploaded", "manifest.json"), events
    events.clear()
    _, old = check_target("s3://order/v1", True, OUR_FILES)
    publish(digits_shards, Recorded("s3://order/v1"), old)
    assert events[0] == ("deleting", "manifest.json") and events[-1] == ("uploaded", "manifest.json"), events


# --- the cache -------------------------------------------------------------------------------------------------------

def test_cache_one_download_per_node_shared_by_two_jobs_and_damaged_copies_fetched_again(
        aws: SeaweedS3, digits_shards: Path, tmp_path: Path) -> None:
    root = digits_in(aws, "cache", digits_shards)
    cache = tmp_path / "cache"
    jobs = [fill_process(root, cache, {**aws.env(), "PATH": os.environ["PATH"]}) for _ in range(2)]
    lines = sorted(job.communicate(timeout=120)[0].strip() for job in jobs)
    assert all(job.returncode == 0 for job in jobs), lines
    assert "10 file(s) downloaded" in lines[1] and "0 file(s) downloaded" in lines[0], lines
    assert "10 already there" in lines[0]
    for path in digits_shards.iterdir():
        assert (cache / path.name).read_bytes() == path.read_bytes()
    assert not list(cache.glob("*.part"))
    # a cached shard flipped in place and an index cut short: both noticed and fetched again, nothing else
    shard = cache / "train-000001.tar"
    with open(shard, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff" * 16)
    (cache / "test-000000.idx").write_text("v1.2 1\n")
    again = opened(root, cache)
    assert "2 file(s) downloaded" in again.line and "8 already there" in again.line, again.line
    assert sha(shard) == sha(digits_shards / shard.name)
    assert batches(root, "webdataset", "auto", cache).equal(batches(str(digits_shards), "webdataset", "auto", cache))


def test_kill_9_in_the_middle_of_a_fill_then_the_same_command_finishes_it(aws: SeaweedS3, tmp_path: Path) -> None:
    data = big_dataset(tmp_path / "big", shards=3, mib=48)
    aws.make_bucket("killed")
    upload_folder(aws, data, "killed", "big")
    cache = tmp_path / "cache"
    env = {**aws.env(), "PATH": os.environ["PATH"]}
    job = fill_process("s3://killed/big", cache, env)
    try:
        wait_for(lambda: any(p.stat().st_size > (4 << 20) for p in cache.glob("*.part")) or job.poll() is not None,
                 60, "a .part file growing")
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(30)
    assert job.returncode == -signal.SIGKILL, "the fill ended before it could be killed"
    assert not (cache / "manifest.json").exists() and list(cache.glob("*.part"))
    rerun = fill_process("s3://killed/big", cache, env)
    line = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, line
    for path in data.iterdir():
        assert sha(cache / path.name) == sha(path), path.name
    assert not list(cache.glob("*.part"))


def test_store_restarted_in_the_middle_of_a_fill_and_of_a_streaming_epoch(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          digits_shards: Path) -> None:
    store = SeaweedS3(tmp_path / "weed").start()
    try:
        for name, value in store.env().items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        data = big_dataset(tmp_path / "big", shards=3, mib=32)
        store.make_bucket("restart")
        upload_folder(store, data, "restart", "big")
        cache = tmp_path / "cache"
        result: dict = {}
        filler = threading.Thread(target=lambda: result.update(o=opened("s3://restart/big", cache)))
        filler.start()
        wait_for(lambda: list(cache.glob("*.part")) or not filler.is_alive(), 60, "the fill to start")
        store.restart(down_for=2.0)
        filler.join(240)
        assert "o" in result, "the fill did not finish after the restart"
        for path in data.iterdir():
            assert sha(cache / path.name) == sha(path)
        # streaming: the store goes away between two batches of an epoch and comes back
        root = digits_in(store, "restart", digits_shards)
        cfg = DataConfig(root=root, backend="webdataset", cache="never", cache_dir=str(tmp_path / "idx"),
                         num_workers=0)
        _open_root.cache_clear()
        loader = make_loader(cfg, MODEL, "train", 0, 2, 16, "cpu", seed=3)
        got = []
        for j, (images, _) in enumerate(loader.epoch(0)):
            got.append(images)
            if j == 3:
                store.restart(down_for=1.0)
        want = batches(str(digits_shards), "webdataset", "auto", tmp_path, epoch=0, start=0)
        assert torch.stack(got).equal(want)
    finally:
        store.stop()
        _open_root.cache_clear()


def test_cache_size_bound_evicts_other_data_sets_never_one_in_use(aws: SeaweedS3, digits_shards: Path,
                                                                 tmp_path: Path) -> None:
    root = digits_in(aws, "evict", digits_shards)
    base = tmp_path / "shards"
    env = {**aws.env(), "PATH": os.environ["PATH"], "XDG_CACHE_HOME": str(tmp_path)}
    old = fill_process(root, base / "old", env)   # another job's data set, finished (its lock released)
    assert old.wait(120) == 0
    assert sum(p.stat().st_size for p in (base / "old").glob("*.tar")) > 5e6
    o = opened(root, base / "new", cache_max_gb=0.008)   # 8 MB: room for one copy of the 5.7 MB digits
    assert "10 file(s) downloaded" in o.line
    assert not (base / "old" / "manifest.json").exists(), "the older data set should have lost shards"
    # the data set this process holds is never evicted: another job asking for room fails with the fix instead
    with pytest.raises(DataError, match="more than data.cache_max_gb=0.001; raise data.cache_max_gb or stream"):
        opened(root, base / "third", cache_max_gb=0.001)
    assert (base / "new" / "manifest.json").exists()


# --- streaming -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["webdataset", "dali"])
def test_streaming_reads_the_same_batches_as_local_shards_with_resume(aws: SeaweedS3, digits_shards: Path,
                                                                      tmp_path: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = digits_in(aws, "stream", digits_shards)
    for rank in (0, 1):
        streamed = batches(root, backend, "never", tmp_path / "idx", rank=rank)
        local = batches(str(digits_shards), backend, "auto", tmp_path, rank=rank)
        assert streamed.equal(local)
    assert not list((tmp_path / "idx").rglob("*.tar")), "streaming must not copy shards"


# --- HTTP ------------------------------------------------------------------------------------------------------------

def test_http_root_is_cached_and_read_like_the_folder(digits_shards: Path, tmp_path: Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = f"http://127.0.0.1:{server.server_port}/{digits_shards.name}"
        o = opened(root, tmp_path / "cache")
        assert "10 file(s) downloaded" in o.line
        assert batches(root, "webdataset", "auto", tmp_path / "cache").equal(
            batches(str(digits_shards), "webdataset", "auto", tmp_path))
        with pytest.raises(DataError, match="has no manifest.json"):
            opened(f"http://127.0.0.1:{server.server_port}/nothing", tmp_path / "c2")
    finally:
        server.shutdown()
        _open_root.cache_clear()


# --- faults ----------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_faults_are_one_line_naming_what_and_how_to_fix(aws: SeaweedS3, digits_shards: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = digits_in(aws, "faults", digits_shards)
    with pytest.raises(DataError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+"):
        opened("s3://no-such-bucket/digits", tmp_path / "a")
    with pytest.raises(DataError, match=r"s3://faults/nothing has no manifest.json: not a prepared data set"):
        opened("s3://faults/nothing", tmp_path / "b")
    # a shard whose bytes differ from the manifest: fetched twice, then named
    client = aws.client()
    damaged = bytearray((digits_shards / "train-000002.tar").read_bytes())
    damaged[3000] ^= 0xFF
    aws.make_bucket("damaged")
    upload_folder(aws, digits_shards, "damaged", "digits")
    client.put_object(Bucket="damaged", Key="digits/train-000002.tar", Body=bytes(damaged))
    with pytest.raises(DataError, match=r"shard s3://damaged/digits/train-000002.tar differs from its manifest.json"):
        opened("s3://damaged/digits", tmp_path / "c")
    client.delete_object(Bucket="damaged", Key="digits/test-000000.idx")
    for cache in ("auto", "never"):
        with pytest.raises(DataError, match=r"s3://damaged/digits/test-000000.idx is listed in s3://damaged/digits/"
                                            r"manifest.json but missing from the store"):
            opened("s3://damaged/digits", tmp_path / f"m-{cache}", cache=cache)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(DataError) as denied:
        opened(root, tmp_path / "d")
    assert (f"access to bucket 'faults' at {aws.endpoint} denied (SignatureDoesNotMatch) for key id "
            f"{ADMIN_KEY[0]} from the variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") in str(denied.value)
    assert "not-the-secret" not in str(denied.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"cannot reach the object store at http://127\.0\.0\.1:\d+ \(from "
                                        r"AWS_ENDPOINT_URL\).*start the store or set AWS_ENDPOINT_URL"):
        opened(root, tmp_path / "e")
    assert time.monotonic() - t0 < 60


# --- 2 ranks ---------------------------------------------------------------------------------------------------------

def train_job(root: str, run: Path, env: dict, *overrides: str) -> tuple[int, str]:
    launcher = BIN / "glow-dist-horovodrun"
    if not launcher.exists():
        pytest.skip("glow-dist-horovodrun is not installed: run `make horovod`")
    cmd = [str(launcher), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "glow_dist", "train",
           "--config", "configs/debug.yaml", *BASE, f"data.root={root}", f"train.run_dir={run / 'run'}",
           f"tracking.local_dir={run / 'mlflow'}", "data.backend=webdataset", "train.deterministic=true", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=400, env=env_with_venv(env))
    return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
def test_two_ranks_from_s3_end_bit_identical_to_the_local_copy(s3_store: SeaweedS3, digits_shards: Path,
                                                               tmp_path: Path) -> None:
    root = digits_in(s3_store, "train", digits_shards)
    env = {**s3_store.env(), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    status, local = train_job(str(digits_shards), tmp_path / "local", env)
    assert status == 0, local[-3000:]
    status, remote = train_job(root, tmp_path / "s3", env)
    assert status == 0, remote[-3000:]
    assert remote.count("10 file(s) downloaded") == 1, remote[-3000:]   # one download for the node's two ranks
    a, b = load_ckpt(tmp_path / "local" / "run", 6), load_ckpt(tmp_path / "s3" / "run", 6)
    assert_identical(a["model"], b["model"])
    assert_identical(a["ema"], b["ema"])
    saved = (tmp_path / "s3" / "run" / "config.yaml").read_text()
    assert root in saved
    assert ADMIN_KEY[1] not in remote
    for path in (tmp_path / "s3").rglob("*"):   # config, checkpoints, MLflow's database and artifacts
        assert not path.is_file() or ADMIN_KEY[1].encode() not in path.read_bytes(), path
    # wrong credentials: one line for the job, from one rank, naming the bucket and where the key came from
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789"}
    status, output = train_job(root, tmp_path / "denied", bad, "data.cache_dir=" + str(tmp_path / "d"))
    assert status == 2, output[-3000:]
    assert output.count(LINE) == 1 and "Traceback" not in output, output[-3000:]
    assert "access to bucket 'train'" in output and "wrong-secret" not in output


def test_plan_and_doctor_take_an_s3_root(aws: SeaweedS3, digits_shards: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from glow_dist.config import Config
    from glow_dist.preflight.doctor import check_data
    from glow_dist.preflight.plan import dataset_size

    root = digits_in(aws, "tools", digits_shards)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = Config()
    cfg.data.root = root
    assert dataset_size(cfg, None) == (1617, f"{root}/manifest.json")
    assert not list(tmp_path.rglob("*.tar")), "plan reads the manifest only"
    _open_root.cache_clear()
    checks = check_data(cfg, root, check_shape=False)
    assert [c.status for c in checks] == ["PASS"] * 5, [c.line("") for c in checks]
    assert len(list(tmp_path.rglob("*.tar"))) == 5   # doctor --data fills this node's cache, as training would
    _open_root.cache_clear()
    (failed,) = check_data(cfg, "s3://no-such-bucket/x", check_shape=False)
    assert failed.status == "FAIL" and "bucket 'no-such-bucket' does not exist" in failed.detail


def test_https_root_trusts_a_certificate_given_by_ssl_cert_file(digits_shards: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    cert, key = self_signed(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"https://127.0.0.1:{server.server_port}/{digits_shards.name}"
    try:
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(DataError, match=r"TLS failed .*trust the server's certificate with SSL_CERT_FILE"):
            opened(root, tmp_path / "cache")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert "10 file(s) downloaded" in opened(root, tmp_path / "cache").line
        for path in digits_shards.iterdir():
            assert (tmp_path / "cache" / path.name).read_bytes() == path.read_bytes()
    finally:
        server.shutdown()
        _open_root.cache_clear()


@pytest.fixture()
def nginx_https(digits_shards: Path, tmp_path: Path):
    """Debian's nginx serving the session's digits shards over HTTPS with a self-signed certificate of this test;
    yields (root URL, certificate); stopped by pid afterwards."""
    cert, key = self_signed(tmp_path)
    server = Nginx(tmp_path / "nginx", root=digits_shards.parent, cert=cert, key=key).start()
    try:
        yield f"{server.url}/{digits_shards.name}", cert
    finally:
        server.stop()
        _open_root.cache_clear()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0, "nginx still answers after stop"


def test_streaming_an_https_root_from_nginx_reads_the_same_batches_and_dali_is_told_the_fix(
        nginx_https: tuple[str, Path], digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cert = nginx_https
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    for rank in (0, 1):   # epoch 1 resumed at batch 2: ranged reads from the index's offsets
        streamed = batches(root, "webdataset", "never", tmp_path / "idx", rank=rank)
        assert streamed.equal(batches(str(digits_shards), "webdataset", "auto", tmp_path, rank=rank))
    assert not list((tmp_path / "idx").rglob("*.tar")), "streaming must not copy shards"
    assert " 206 " in (tmp_path / "nginx" / "access.log").read_text(), "no ranged GET reached nginx"
    # The digits shards fit one 8 MiB read buffer (each read runs to the end): a small buffer makes ranges end mid-file.
    shard = next(digits_shards.glob("*.tar"))
    with open_ranged(f"{root}/{shard.name}", buffer=4096) as f:
        f.seek(1000)
        assert f.read(20000) == shard.read_bytes()[1000:21000]
    with pytest.raises(DataError) as refused:
        batches(root, "dali", "never", tmp_path / "idx")
    assert str(refused.value) == (f"data.backend=dali streams shards from s3:// only, not {root}; set data.cache=auto "
                                  "(the node-local cache) or data.backend=webdataset")

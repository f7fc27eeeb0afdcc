"""A real HTTPS static file server for the tests: Debian's nginx on a free port of 127.0.0.1, with a self-signed
certificate and a configuration of its own, everything (pid file, logs, temporary folders) under one folder.

    cert, key = self_signed(tmp_path)              # openssl: CN and subjectAltName 127.0.0.1
    server = Nginx(tmp_path / "nginx", root=FOLDER, cert=cert, key=key).start()
    server.url                                     # https://127.0.0.1:PORT
    server.stop()                                  # SIGQUIT (graceful), then KILL, by pid (its whole process group)

nginx serves files with Range requests (206), which Python's http.server does not: streaming (data.cache=never)
reads shards through ranged GETs. When nginx is missing it is installed with apt-get as root (nginx-light), without
letting Debian's maintainer scripts start the system's nginx service on port 80 (a policy-rc.d that refuses every
service action for the duration of the install; port 80 checked afterwards); elsewhere the test is skipped with the
reason.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

PACKAGE = "nginx-light"   # Debian 12: the nginx binary with the static-file modules only
POLICY = Path("/usr/sbin/policy-rc.d")
# invoke-rc.d asks this script before any service action; 101 = "action forbidden": the postinst starts nothing.
REFUSE = "#!/bin/sh\n# glow-dist tests: no service starts while nginx is installed\nexit 101\n"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (CN and subjectAltName) and its key, made by openssl in `folder`."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def nginx_binary() -> str:
    """nginx on PATH or in /usr/sbin; installed with apt-get (as root) when missing, else the test is skipped."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip(f"nginx is not installed and installing it needs root (apt-get install {PACKAGE})")
    if shutil.which("apt-get") is None:
        pytest.skip(f"nginx is not installed and there is no apt-get to install it ({PACKAGE})")
    port_80_before = _listening(80)
    with open("/tmp/glow-dist-nginx-install.lock", "w") as lock:   # two sessions installing at once: one does it
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = shutil.which("nginx", path="/usr/sbin")
        if found is None:
            _install()
    if not port_80_before and _listening(80):
        pytest.fail(f"installing {PACKAGE} started a server on port 80: stop it (service nginx stop)")
    found = shutil.which("nginx", path="/usr/sbin")
    if found is None:
        pytest.skip(f"apt-get install {PACKAGE} did not install /usr/sbin/nginx")
    return found


def _install() -> None:
    """apt-get install nginx-light, with service starts refused (our policy-rc.d for the install; one already there
    is put aside and restored afterwards) and RUNLEVEL=1 for scripts that ask the runlevel instead."""
    saved = POLICY.with_name("policy-rc.d.glow-dist-saved")
    had = POLICY.exists()
    if had:
        POLICY.rename(saved)
    POLICY.write_text(REFUSE)
    POLICY.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    try:
        if not list(Path("/var/lib/apt/lists").glob("*Packages*")):
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300",
                               "--no-install-recommends", PACKAGE], env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        POLICY.unlink(missing_ok=True)
        if had:
            saved.rename(POLICY)
    if done.returncode != 0:
        pytest.skip(f"apt-get install {PACKAGE} failed: {(done.stderr or done.stdout).strip()[-300:]}")


CONF = """\
{user}
worker_processes 1;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
    }}
}}
"""


class Nginx:
    """One nginx (a master and one worker) serving `root` over HTTPS; its files under `folder`."""

    def __init__(self, folder: Path, root: Path, cert: Path, key: Path) -> None:
        self.folder, self.root, self.cert, self.key = Path(folder), Path(root), cert, key
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = self.folder / "nginx.conf"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Nginx:
        binary = nginx_binary()
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        # As root the worker reads the files as root too: pytest's tmp_path is closed to other users (www-data).
        self.conf.write_text(CONF.format(user="user root;" if os.geteuid() == 0 else "", prefix=self.folder,
                                         port=self.port, cert=self.cert, key=self.key, root=self.root))
        # -e: the error log before the configuration is read (Debian's default is /var/log/nginx/error.log).
        with open(self.folder / "stderr.log", "wb") as err:
            self.process = subprocess.Popen([binary, "-c", str(self.conf), "-p", str(self.folder),
                                             "-e", str(self.folder / "error.log"), "-g", "daemon off;"],
                                            stdout=err, stderr=err, start_new_session=True)
        context = ssl.create_default_context(cafile=str(self.cert))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = "\n".join(p.read_text()[-2000:] for p in (self.folder / "stderr.log", self.folder / "error.log")
                                if p.exists())
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGQUIT to the master (graceful: it stops its workers), then KILL to its process group if it lingers."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)   # workers orphaned by a master that died stop here too
        self.process.wait(timeout=10)
        self.process = None

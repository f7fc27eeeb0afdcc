"""Data roots that are URLs: `s3://bucket/prefix` (any S3-compatible store) and `http(s)://host/path`.

    store = open_store("s3://shards/celeba256")       # DataError naming endpoint, bucket or credentials on failure
    store.size("manifest.json"); store.read("train-000000.idx")
    store.stream("train-000000.tar", offset)           # an iterator of byte chunks, for whole-file downloads

open_store (remote.py) picks the class: S3Store (s3_store.py) or HttpStore (here). remote.py also reads shards
straight from the store for streaming (webdataset's handlers, ranged reads).

S3 follows the AWS SDK's conventions: the endpoint from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (path-style
addressing then, as S3-compatible stores need), credentials from the standard chain (variables, AWS_PROFILE, the
shared files, instance roles). HTTPS trusts SSL_CERT_FILE, REQUESTS_CA_BUNDLE or AWS_CA_BUNDLE when set. Nothing here
logs or stores a credential; errors name where credentials came from, never what they are.

Every request is retried with exponential backoff while the store is away (a restart, a dropped connection) for up to
`RETRY_S` seconds; the first request of a job gives up after `START_RETRY_S`, so an endpoint that was never there
fails fast with one line.
"""
from __future__ import annotations

import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from glow_dist.data.manifest import DataError

SCHEMES = ("s3", "http", "https")
RETRY_S = float(os.environ.get("GLOW_DIST_STORE_RETRY_S", "180"))   # a store restart took ~19 s here (SeaweedFS)
START_RETRY_S = 10.0
CHUNK = 1 << 20
T = TypeVar("T")


def is_url(root: str | os.PathLike) -> bool:
    return isinstance(root, str) and urllib.parse.urlsplit(root).scheme in SCHEMES


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


class Unavailable(Exception):
    """A transient failure (connection refused or reset, timeout, 5xx): worth another try."""


class Store:
    """One data root on an object store or web server; names are relative to the root."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def retry(self, what: str, call: Callable[[], T], budget: float = RETRY_S) -> T:
        """`call()`, again with backoff (0.5 s doubling to 8 s) while it raises Unavailable, for `budget` seconds."""
        deadline, wait = time.monotonic() + budget, 0.5
        while True:
            try:
                return call()
            except Unavailable as e:
                if time.monotonic() + wait > deadline:
                    raise DataError(f"{what}: {self.unreachable(e)}", everywhere=True) from None
                time.sleep(wait)
                wait = min(wait * 2, 8.0)

    def unreachable(self, error: Exception) -> str:
        return f"cannot reach {self.root} ({error}); check the network and that the server is up"

    # What a backend implements: HEAD, a (ranged) GET as a stream of chunks, a listing, an upload.
    def size(self, name: str) -> int:
        raise NotImplementedError

    def _get(self, name: str, start: int, end: int | None) -> Iterator[bytes]:
        raise NotImplementedError

    def read(self, name: str, start: int = 0, end: int | None = None, budget: float = RETRY_S) -> bytes:
        """Bytes [start, end) of `name` (to its end with end=None), retried as a whole."""
        return self.retry(f"reading {join(self.root, name)}", lambda: b"".join(self._get(name, start, end)), budget)

    def stream(self, name: str, start: int = 0) -> Iterator[bytes]:
        """Chunks of `name` from `start` on; a failure in the middle resumes at the byte it stopped at."""
        pos, deadline = start, time.monotonic() + RETRY_S
        while True:
            try:
                for chunk in self._get(name, pos, None):
                    pos += len(chunk)
                    yield chunk
                return
            except Unavailable as e:
                if time.monotonic() > deadline:
                    raise DataError(f"reading {join(self.root, name)}: {self.unreachable(e)}", everywhere=True) \
                        from None
                time.sleep(2.0)

    def names(self) -> list[str]:
        raise DataError(f"{self.root} cannot be listed (plain HTTP has no listing); write to s3:// or a folder")

    def upload(self, path: str, name: str) -> None:
        raise DataError(f"cannot write to {self.root}: only s3:// roots and folders can be written")

    def delete(self, names: list[str]) -> None:
        raise DataError(f"cannot delete from {self.root}")


def _ssl_context() -> ssl.SSLContext:
    bundle = next((os.environ[v] for v in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE")
                   if os.environ.get(v)), None)
    return ssl.create_default_context(cafile=bundle)


class HttpStore(Store):
    """A data root served over HTTP(S) (any static file server that honours Range requests)."""

    def _open(self, name: str, method: str = "GET", start: int = 0, end: int | None = None) -> Any:
        request = urllib.request.Request(join(self.root, name), method=method)
        if start or end is not None:
            request.add_header("Range", f"bytes={start}-{'' if end is None else end - 1}")
        try:
            return urllib.request.urlopen(request, timeout=30,
                                          context=_ssl_context() if self.root.startswith("https") else None)
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                raise Unavailable(f"HTTP {e.code}") from None
            if e.code == 404:
                raise FileNotFoundError(join(self.root, name)) from None
            raise DataError(f"{join(self.root, name)}: HTTP {e.code} {e.reason}", everywhere=True) from None
        except ssl.SSLError as e:
            raise DataError(f"{join(self.root, name)}: TLS failed ({e}); trust the server's certificate with "
                            "SSL_CERT_FILE=/path/to/ca.pem", everywhere=True) from None
        except (urllib.error.URLError, OSError) as e:
            if isinstance(getattr(e, "reason", None), ssl.SSLError):
                raise DataError(f"{join(self.root, name)}: TLS failed ({e.reason}); trust the server's certificate "
                                "with SSL_CERT_FILE=/path/to/ca.pem", everywhere=True) from None
            raise Unavailable(str(getattr(e, "reason", e))) from None

    def size(self, name: str) -> int:
        def head() -> int:
            with self._open(name, "HEAD") as response:
                return int(response.headers["Content-Length"])
        return self.retry(f"reading {join(self.root, name)}", head)

    def _get(self, name: str, start: int, end: int | None) -> Iterator[bytes]:
        response = self._open(name, start=start, end=end)
        with response:
            if (start or end is not None) and response.status != 206:
                raise DataError(f"{self.root} ignores Range requests; serve it with a server that honours them")
            try:
                while chunk := response.read(CHUNK):
                    yield chunk
            except OSError as e:
                raise Unavailable(str(e)) from None

"""Files that are never seen half-written: atomic replacement, directory fsync, sha256 of a file.

Checkpoints, the MLflow model's weights, cached attribute directions and data shards all use these, so "written"
means the same thing everywhere: a temporary file beside the target, flushed and fsynced, then renamed over it.
The temporary file is named `.tmp-<target>@<host>+<pid>-<random>` and locked (flock) by its writer until the rename,
so a later process can tell a live writer's file from one that a killed write left behind (`live_writer`).

`HashingWriter` is the one-pass writer of large files (checkpoints): the sha256 is computed from the bytes as they
are handed to the disk, on this thread, while a helper thread copies the same bytes into the file and asks the
kernel to start writing them back at once, so hashing, copying and the disk all run at the same time and nothing is
read back.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Event
from typing import BinaryIO

CHUNK = 64 << 20   # the most bytes per OS write (and per writeback request); a larger write is cut into these
GATHER = 1 << 20   # writes smaller than this (headers, small tensors) are gathered into one block first


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside `directory` durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"^\.tmp-(?P<target>.+)@(?P<host>[^@+/]+)\+(?P<pid>\d+)-(?P<random>[a-z0-9_]{8})$")


def _host() -> str:
    return re.sub(r"[@+/]", "_", socket.gethostname())


def temporary_beside(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path` (fd, name), named after its target, this host and this process, and locked
    by this process for as long as the fd is open (writers close it only after the rename)."""
    prefix = f".tmp-{path.name}@{_host()}+{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass   # a filesystem without locks: live_writer falls back to the host and pid in the name
    return fd, tmp


def temporary_target(name: str) -> str | None:
    """The file a temporary file (its name) was to become, or None for a name that is not one of ours. Names of
    earlier versions (`.tmp-<target>-<random>`) count too."""
    if not name.startswith(".tmp-"):
        return None
    match = _TEMPORARY.match(name)
    return match["target"] if match else name[len(".tmp-"):].rsplit("-", 1)[0]


def live_writer(path: Path) -> str | None:
    """Who still writes the temporary file `path` ("pid 123 on this host", "host h"), or None when nobody does: its
    writer's lock is free (a process killed mid-write holds none). Where the filesystem has no locks, the name
    decides: a dead pid on this host is nobody; a writer on another host cannot be checked and counts as live."""
    match = _TEMPORARY.match(path.name)
    try:
        fd = os.open(path, os.O_RDWR)   # NFS turns flock into a POSIX lock, whose exclusive kind needs a writable fd
    except FileNotFoundError:
        return None
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return f"pid {match['pid']} on {match['host']}" if match else "another process"
    except OSError:   # no locks here (ENOLCK, EOPNOTSUPP): the name decides
        if match is None:
            return None
        if match["host"] != _host():
            return f"host {match['host']} (not checkable from here)"
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return f"pid {match['pid']} on this host"
    finally:
        os.close(fd)   # releases the lock taken above


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object],
                 before_rename: Callable[[], None] | None = None) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`: a reader (or a process
    killed at any moment) sees the old file or the new one, never a part. `before_rename` runs between the fsync and
    the rename (a fault drill holds writes there)."""
    path = Path(path)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)   # the lock goes with it, after the rename


def _sync_file_range(flags: int) -> Callable[[int, int, int], None]:
    """Linux's sync_file_range with `flags`: 2 (SYNC_FILE_RANGE_WRITE) starts writing a range back without waiting
    for it, so the disk works while the rest is still being produced (the final fsync then waits only for the tail);
    7 (WAIT_BEFORE | WRITE | WAIT_AFTER) returns once the range is on the disk. A no-op where libc lacks it."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: call(fd, offset, length, flags)


_start_writeback, _wait_writeback = _sync_file_range(2), _sync_file_range(7)
# The read-back reads the disk: each block is written back and dropped from the page cache before it is read (else
# it compares memory with memory). False only in bench/bench_stop.py, which measures what that costs.
READ_BACK_FROM_DISK = True


def _drop_cached(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to forget the cached pages of a range that is already on the disk (clean pages only)."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class Superseded(Exception):
    """A write given up because a newer file replaces it (set by its `cancel` event); its temporary file is
    removed."""


class HashingWriter:
    """A write-only file object over `fd` whose sha256 is that of every byte written (`hexdigest()`).

    Small writes (under GATHER) are gathered into one block; larger ones (a tensor's bytes, handed over without a
    copy) are written in place, in CHUNK-sized blocks. Each block is hashed on the calling thread while a helper
    thread writes it, and a write returns only once both are done, so the caller may reuse its buffer. An OSError of
    the OS write (ENOSPC, EIO) is raised from `write` or `flush`; `cancel` set: Superseded at the next block.

    With `read_back`, a third thread reads each block back from the disk once it is written and hashes what it read
    (`read_back_hexdigest()`), one block behind the writer, so a verified file costs no second pass at the end:
    the block is written back (sync_file_range) and its pages dropped from the cache (posix_fadvise DONTNEED) first,
    so what is compared is what the disk returns, not the memory just written; dropped again once hashed, so a
    multi-GB checkpoint does not push the training's own files out of the cache. (On tmpfs there is no disk: the
    cache is the file. Network filesystems may serve the read from their own client or server caches.)"""

    def __init__(self, fd: int, read_back: bool = False, cancel: Event | None = None) -> None:
        self.fd, self.written, self.cancel = fd, 0, cancel
        self.error: OSError | Superseded | None = None   # why a write failed, whatever the caller made of it
        self._digest = hashlib.sha256()
        self._pending = bytearray()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="glow-dist-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="glow-dist-read-back") if read_back else None
        self._read_back, self._read_buffer, self._reads = hashlib.sha256(), bytearray(), []

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < GATHER:
            self._pending += view   # at most GATHER bytes: copying small writes is cheaper than a block each
            if len(self._pending) >= GATHER:
                self._flush_pending()
            return view.nbytes
        self._flush_pending()
        for start in range(0, view.nbytes, CHUNK):
            self._emit(view[start:start + CHUNK])
        return view.nbytes

    def flush(self) -> None:
        self._flush_pending()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def read_back_hexdigest(self) -> str:
        for read in self._reads:
            read.result()   # an OSError of a read is raised here
        return self._read_back.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._reader is not None:
            self._reader.shutdown(wait=True)

    def _flush_pending(self) -> None:
        if self._pending:
            block, self._pending = self._pending, bytearray()
            self._emit(memoryview(block))

    def _emit(self, view: memoryview) -> None:
        if self.cancel is not None and self.cancel.is_set():
            self.error = Superseded(f"given up after {self.written} bytes: a newer file replaces it")
            raise self.error
        written = self._pool.submit(self._write_all, view, self.written)
        self._digest.update(view)   # releases the GIL: hashing and the OS write run side by side
        try:
            written.result()
        except OSError as e:
            self.error = e
            raise
        if self._reader is not None:
            self._reads.append(self._reader.submit(self._hash_back, self.written, view.nbytes))
        self.written += view.nbytes

    def _hash_back(self, offset: int, length: int) -> None:
        if len(self._read_buffer) < length:
            self._read_buffer = bytearray(length)
        view = memoryview(self._read_buffer)[:length]
        if READ_BACK_FROM_DISK:
            _wait_writeback(self.fd, offset, length)
            _drop_cached(self.fd, offset, length)
        done = 0
        while done < length:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"the file ended {offset + done} bytes in while reading it back")
            done += got
        self._read_back.update(view)
        if READ_BACK_FROM_DISK:
            _drop_cached(self.fd, offset, length)

    def _write_all(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < view.nbytes:
            done += os.write(self.fd, view[done:])
        _start_writeback(self.fd, offset, view.nbytes)


def write_hashed(path: str | Path, write: Callable[[HashingWriter], object],
                 before_rename: Callable[[str], None] | None = None, read_back: bool = False,
                 cancel: Event | None = None) -> str:
    """write_atomic through a HashingWriter: the bytes are hashed as they are written, fsynced, renamed over
    `path`. Returns the hex sha256 of the file. `before_rename(digest)` runs between the fsync and the rename (the
    checkpoint's sidecar is switched there). `read_back`: the file is also read back as it is written, and an
    OSError (EIO) raised unless what was read hashes the same. `cancel` set: Superseded, at the next block or
    before the rename. On any error the temporary file is removed."""
    path = Path(path)
    fd, tmp = temporary_beside(path)
    writer = HashingWriter(fd, read_back, cancel)
    try:
        try:
            write(writer)
            writer.flush()
        finally:
            writer.close()
        if read_back and writer.read_back_hexdigest() != writer.hexdigest():
            raise OSError(errno.EIO, f"{path.name}: the bytes read back from the file differ from those written")
        os.fsync(fd)
        if cancel is not None and cancel.is_set():
            raise Superseded(f"{path.name}: given up before its rename, a newer file replaces it")
        if before_rename is not None:
            before_rename(writer.hexdigest())
        os.replace(tmp, path)
        return writer.hexdigest()
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if writer.error is not None and e is not writer.error:
            raise writer.error from e   # the OS's reason, not what a serializer wrapped it in
        raise
    finally:
        os.close(fd)   # and with it the writer's lock, once the file is renamed or removed

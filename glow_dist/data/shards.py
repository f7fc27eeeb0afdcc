"""Writing WebDataset shards with their DALI index files, deterministically (fixed mtimes, owners and order)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from glow_dist.files import sha256_file


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension rule (also DALI's): the extension starts at the first dot of the basename."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]


def write_index(tar_path: str | Path, index_path: str | Path) -> int:
    """Write the DALI "v1.2" index of a tar (what `wds2idx` writes) and return the number of samples."""
    groups: list[tuple[str, list[str]]] = []
    with tarfile.open(tar_path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if not groups or groups[-1][0] != key:
                groups.append((key, []))
            groups[-1][1].append(f"{ext} {member.offset_data} {member.size} {member.name}")
    lines = [f"v1.2 {len(groups)}"] + [" ".join(parts) for _, parts in groups]
    Path(index_path).write_text("\n".join(lines) + "\n")
    return len(groups)


class ShardWriter:
    """Writes `{prefix}-%06d.tar` shards of at most `shard_size` samples, each followed by its `.idx` file."""

    def __init__(self, out: Path, prefix: str, shard_size: int) -> None:
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.shards: list[dict[str, Any]] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def write(self, files: dict[str, bytes]) -> str:
        """Add one sample, given as {extension: bytes}; returns its key."""
        if self._tar is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(self.out / name, "w", format=tarfile.USTAR_FORMAT)
            self._in_shard = 0
        key = f"{self.count:07d}"
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._close_shard()
        return key

    def _close_shard(self) -> None:
        assert self._tar is not None
        path = Path(self._tar.name)
        self._tar.close()
        self._tar = None
        index = path.with_suffix(".idx")
        n = write_index(path, index)
        self.shards.append({"file": path.name, "index": index.name, "num_samples": n, "sha256": sha256_file(path)})

    def close(self) -> dict[str, Any]:
        """Finish the last shard; returns the split's manifest entry."""
        if self._tar is not None:
            self._close_shard()
        return {"num_samples": self.count, "shards": self.shards}

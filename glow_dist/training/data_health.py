"""The job's view of its data's health: verification before any rank trains, and the bad samples met while
training, decided by all ranks together so that every rank goes on, or stops, the same way.

    bad = BadSampleMonitor(verify_data(cfg, log), cfg.data.max_bad_samples)   # collective; DataError if unusable
    make_loader(..., bad_samples=bad.known)          # each read as its substitute
    bad.announce(report, step)                       # rank 0: names them (log, MLflow metric and table)
    bad.sync([train_data, test_data], report, step)  # collective, at every log step: new finds from every rank

A failure here is a `DataError(everywhere=True)`: every rank raises the same line at the same step, rank 0 alone
prints it (glow_dist/cli.py), every rank exits with status 2, and the trainer ends the MLflow run FAILED with the
line in the `failure.reason` tag.
"""
from __future__ import annotations

from collections.abc import Callable

from glow_dist.config import Config
from glow_dist.data.loader import data_classes
from glow_dist.data.manifest import SPLITS, DataError, read_manifest
from glow_dist.data.shard_cache import open_root
from glow_dist.data.verify import BadSample, Verified, verify_split
from glow_dist.distributed import gateway as dist
from glow_dist.tracking.reporter import NullReporter

SHOWN = 5   # bad samples named in one line; the MLflow table has them all


def verify_data(cfg: Config, log: Callable[[str], None]) -> list[BadSample]:
    """Verify the data set on one local rank per node (the others wait); every rank gets every node's findings
    (elastic jobs: every process on its own, see below).
    Returns the bad samples (the same list on every rank); raises DataError(everywhere=True) naming the first
    unusable shard."""
    if cfg.dist.elastic:
        # A worker that joins a running elastic job builds its Trainer while the others train: no collective may
        # run here. Each process checks on its own (the cache makes that one hash per node once the files are
        # known) and prints its own finding.
        gathered = [_verify_here(cfg)]
    else:
        finding: tuple[list[str], list[BadSample], str] | None = None
        if dist.local_rank() == 0:
            finding = _verify_here(cfg)
        gathered = [f for f in dist.allgather_object(finding, name="data.verify") if f is not None]
    problems = list(dict.fromkeys(p for f in gathered for p in f[0]))  # in order, once (shared disks agree)
    if problems:
        more = f" (and {len(problems) - 1} more shard(s) like it)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}", everywhere=not cfg.dist.elastic)
    bad = sorted({(b.split, b.index): b for f in gathered for b in f[1]}.values())
    log(gathered[0][2])
    return bad


def _verify_here(cfg: Config) -> tuple[list[str], list[BadSample], str]:
    """(problems, bad samples, one summary line) of this node's copy of the data set; never raises DataError (the
    other ranks are waiting for the answer)."""
    try:
        opened = open_root(cfg.data)   # a URL root: this node's cache filled here (the other local ranks wait)
        manifest = read_manifest(opened.root)
        classes = data_classes(manifest, cfg.model, cfg.data.root)
        scan = cfg.data.backend != "webdataset"  # DALI may decode; it must never see a sample that fails the scan
        found = [verify_split(opened.root, manifest, split, cfg.data.verify, classes, scan=scan)
                 for split in SPLITS if manifest["splits"].get(split, {}).get("shards")]
    except DataError as e:
        return [str(e)], [], ""
    except OSError as e:   # unreadable (permissions, I/O error): still one line, and the other ranks hear of it
        return [f"cannot read the data set in {cfg.data.root}: {e}; check the files' permissions and disk"], [], ""
    total = Verified(problems=[p for v in found for p in v.problems], bad=[b for v in found for b in v.bad],
                     hashed_bytes=sum(v.hashed_bytes for v in found), cached_shards=sum(v.cached_shards for v in found),
                     seconds=sum(v.seconds for v in found))
    shards = sum(len(manifest["splits"][split]["shards"]) for split in SPLITS if split in manifest["splits"])
    if cfg.data.verify == "never":
        line = (f"data: data.verify=never: {shards} shard(s) of {cfg.data.root} checked for their files and sample "
                f"counts only" + (f"; sample headers scanned for DALI in {total.seconds:.2f} s" if scan else ""))
    else:
        line = (f"data: {shards} shard(s) of {cfg.data.root} match manifest.json (sha256, sample counts, headers; "
                f"data.verify={cfg.data.verify}): {total.hashed_bytes / 1e6:.1f} MB hashed in {total.seconds:.2f} s, "
                f"{total.cached_shards} shard(s) unchanged since verified on this node")
    return total.problems, total.bad, "\n".join(filter(None, (opened.line, line)))


def listing(bad: list[BadSample]) -> str:
    names = ", ".join(f"{b.split} {b.describe()}" for b in bad[:SHOWN])
    return names + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")


def check_limit(bad: list[BadSample], limit: int) -> None:
    if len(bad) > limit:
        raise DataError(
            f"{len(bad)} bad samples, more than data.max_bad_samples={limit}: {listing(bad)}; copy the shards again "
            "or re-run `glow-dist prepare --overwrite` (or raise data.max_bad_samples to train on substitutes)",
            everywhere=True)


class BadSampleMonitor:
    """Every bad sample of the job, once: those the start-up scan found and those the loaders meet while decoding
    (webdataset, with data.verify=never or damage after the scan). Each is replaced by a substitute in its batch."""

    def __init__(self, known: list[BadSample], limit: int) -> None:
        self.limit, self.known, self._announced = limit, known, False
        self.seen: dict[tuple[str, int], BadSample] = {(b.split, b.index): b for b in known}

    def announce(self, report: NullReporter, step: int) -> None:
        """Rank 0 names the bad samples known at the start; past data.max_bad_samples every rank stops here (they
        all know the same list: no collective), after the MLflow run opened, so that it ends FAILED with the line."""
        if self.seen and not self._announced:   # once: an elastic reset starts the run again
            self._announced = True
            self._report(list(self.seen.values()), report, step)
            check_limit(sorted(self.seen.values()), self.limit)

    def sync(self, loaders: list, report: NullReporter, step: int) -> None:
        """Collective (every rank, same step): gather what each rank's loaders met since the last call, name the new
        ones once, and stop every rank together past data.max_bad_samples."""
        mine = [b for loader in loaders for b in loader.take_bad_samples()]
        new = {}
        for found in dist.allgather_object(mine, name="data.bad_samples"):
            for b in found:
                if (b.split, b.index) not in self.seen:
                    new[(b.split, b.index)] = b
        if not new:
            return
        self.seen.update(new)
        self._report(sorted(new.values()), report, step)
        check_limit(sorted(self.seen.values()), self.limit)

    def _report(self, new: list[BadSample], report: NullReporter, step: int) -> None:
        every = sorted(self.seen.values())
        report.message(f"data: {len(new)} bad sample(s) replaced by a substitute (the nearest good sample of the "
                       f"same shard): {listing(new)}; {len(every)} in all, data.max_bad_samples={self.limit}")
        report.bad_samples([b._asdict() for b in every], step)

"""Blob files no row refers to any more are removed: a crash must not leave bodies on disk for ever.

A blob file is written before the row that points at it commits (a delivery's body larger than an inline
one, a filed document, an S/MIME decrypted copy), and deleted after the transaction that removed its last
row commits (EXPUNGE, a folder's DELETE, the purge of S/MIME copies). A process killed between the write and
the commit, or between the commit and the unlink, leaves a file that nothing reads: still sealed under its
owner's data key (shredding makes it unreadable), but a body its owner deleted should not outlive the
deletion by more than a day. A half-written file in ``tmp/`` (killed during the write) is the same.

``BlobSweep.sweep`` walks the store one first-level shard (``ab/``) at a time and removes the files
older than ``min_age`` whose id no referencing column holds:

- the referencing columns are found, not listed: every column of the gateway's tables named ``blob_id`` or
  ending in ``_blob_id`` (``mail_messages.blob_id``, the record's documents, S/MIME decrypted copies), the
  inline blob table itself excepted. A column that points at blobs under another name would have its files
  swept, so the naming is the rule (tests/storage/test_blob_sweep.py checks every table's blob columns);
- the age is the guard for the writes in flight: a file younger than ``min_age`` (24 hours by default)
  may belong to a row not yet committed, and is never looked at; an unreferenced older one cannot gain a
  reference (ids are random, only the writer ever knew it: a COPY copies the id of a row that still
  refers to it);
- references are read per shard (``blob_id >= 'ab' AND blob_id < 'ac'``): memory bounded by a shard,
  an index range scan where the column has one (``ix_mail_messages_blob``);
- one node at a time (``run_alone``): the blob directory is shared by every node.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Column, MetaData, select
from sqlalchemy.engine import Connection

from gateway.errors import Conflict
from gateway.ops.periodic import PeriodicTask
from gateway.storage.advisory import run_alone
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database

log = logging.getLogger(__name__)

SWEEP_LOCK = "blob-sweep"
INLINE_TABLE = "inline_blobs"       # the store of inline blobs, not a reference to one
HEX = frozenset("0123456789abcdef")


def blob_reference_columns(metadata: MetaData) -> list[Column[str]]:
    """Every column of ``metadata`` that holds blob ids (named ``blob_id`` or ``*_blob_id``), the indexed ones
    first: a shard's files are looked up column by column until all are found, and most are message bodies,
    whose column has an index (the others are read whole)."""
    columns = [column for table in metadata.sorted_tables if table.name != INLINE_TABLE
               for column in table.columns if column.name == "blob_id" or column.name.endswith("_blob_id")]
    return sorted(columns, key=lambda column: not _leads_an_index(column))


def _leads_an_index(column: Column[str]) -> bool:
    return any(next(iter(index.columns), None) is column for index in column.table.indexes)


@dataclass
class SweepCount:
    """What a sweep found and removed (or, in a dry run, would remove)."""

    examined: int = 0           # blob files old enough to be judged
    referenced: int = 0
    young: int = 0              # younger than min_age: not judged
    removed: int = 0            # unreferenced blob files
    removed_bytes: int = 0
    temporary: int = 0          # half-written files of tmp/ older than min_age
    examples: list[str] = field(default_factory=list)   # a few removed ids, for the log and the CLI


@dataclass
class SweepReport:
    dry_run: bool
    older_than: dt.datetime
    count: SweepCount


class BlobSweep:
    """Removes blob files that no row refers to and that are older than ``min_age``."""

    def __init__(self, db: Database, blobs: BlobStore, metadata: MetaData, *,
                 min_age: dt.timedelta = dt.timedelta(hours=24)) -> None:
        self.db = db
        self.blobs = blobs
        self.columns = blob_reference_columns(metadata)
        if not self.columns:
            raise ValueError("no blob reference column known: import gateway.schema before sweeping")
        self.min_age = min_age

    async def sweep(self, *, dry_run: bool = False, clock: Callable[[], float] = time.time) -> SweepReport:
        """One pass; Conflict when another node sweeps now."""
        async with run_alone(self.db, SWEEP_LOCK) as alone:
            if not alone:
                raise Conflict("another node is sweeping the blob store now; try again later")
            cutoff = clock() - self.min_age.total_seconds()
            count = SweepCount()
            for shard in await asyncio.to_thread(_shards, self.blobs.root):
                await self._sweep_shard(shard, cutoff, count, dry_run)
            count.temporary = await asyncio.to_thread(_old_temporary_files, self.blobs.temp_dir, cutoff, dry_run)
        return SweepReport(dry_run, dt.datetime.fromtimestamp(cutoff, dt.timezone.utc), count)

    async def _sweep_shard(self, shard: Path, cutoff: float, count: SweepCount, dry_run: bool) -> None:
        files = await asyncio.to_thread(_blob_files, shard)
        old = {blob_id: (path, size) for blob_id, (path, size, mtime) in files.items() if mtime < cutoff}
        count.young += len(files) - len(old)
        if not old:
            return
        count.examined += len(old)
        prefix = shard.name
        referenced = await self.db.run_in_transaction(lambda c: self._referenced(c, prefix, old.keys()))
        count.referenced += len(referenced)
        orphans = [(blob_id, *old[blob_id]) for blob_id in sorted(old.keys() - referenced)]
        if not orphans:
            return
        if not dry_run:
            await asyncio.to_thread(_unlink_all, [path for _id, path, _size in orphans])
        count.removed += len(orphans)
        count.removed_bytes += sum(size for _id, _path, size in orphans)
        count.examples += [blob_id for blob_id, _path, _size in orphans][:max(0, 5 - len(count.examples))]

    def _referenced(self, connection: Connection, prefix: str, candidates: Iterable[str]) -> set[str]:
        """The ids among ``candidates`` that some column holds (read by the shard's range of ids)."""
        wanted = set(candidates)
        upper = f"{int(prefix, 16) + 1:02x}" if prefix != "ff" else "g"   # 'g' sorts after every hex digit
        found: set[str] = set()
        for column in self.columns:
            rows = connection.execute(select(column).where(column >= prefix, column < upper).distinct())
            found.update(value for (value,) in rows if value in wanted)
            if found >= wanted:
                break
        return found


class BlobSweepTask(PeriodicTask):
    """``gateway serve``'s periodic sweep (one node at a time: the others skip this turn)."""

    name = "blob-sweep"

    def __init__(self, sweep: BlobSweep, *, interval_seconds: float) -> None:
        super().__init__(interval_seconds=interval_seconds)
        self.sweep = sweep

    async def run_once(self) -> SweepReport | None:
        try:
            report = await self.sweep.sweep()
        except Conflict:
            return None
        count = report.count
        if count.removed or count.temporary:
            log.warning("blob sweep: removed %d blob file(s) no row refers to (%d bytes; e.g. %s) and %d "
                        "half-written file(s), all older than %s", count.removed, count.removed_bytes,
                        ", ".join(count.examples) or "-", count.temporary,
                        report.older_than.isoformat(timespec="seconds"))
        return report


def _shards(root: Path) -> list[Path]:
    return sorted(entry for entry in root.iterdir() if entry.is_dir() and _is_hex(entry.name, 2))


def _blob_files(shard: Path) -> dict[str, tuple[Path, int, float]]:
    """blob id -> (path, size, mtime) of every blob file under ``shard`` (``ab/cd/<id>``)."""
    files: dict[str, tuple[Path, int, float]] = {}
    for second in os.scandir(shard):
        if not (second.is_dir(follow_symlinks=False) and _is_hex(second.name, 2)):
            continue
        for entry in os.scandir(second.path):
            name = entry.name
            if _is_hex(name, 32) and name.startswith(shard.name + second.name) and entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                files[name] = (Path(entry.path), stat.st_size, stat.st_mtime)
    return files


def _old_temporary_files(temp_dir: Path, cutoff: float, dry_run: bool) -> int:
    """Half-written blob files (``tmp/<id>.tmp``) older than ``cutoff``: removed unless ``dry_run``."""
    if not temp_dir.is_dir():
        return 0
    old = [Path(entry.path) for entry in os.scandir(temp_dir)
           if entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False)
           and entry.stat(follow_symlinks=False).st_mtime < cutoff]
    if not dry_run:
        _unlink_all(old)
    return len(old)


def _unlink_all(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)      # EXPUNGE's own unlink may have come first


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and HEX.issuperset(name)

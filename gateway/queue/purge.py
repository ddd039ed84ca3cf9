"""Finished work is purged: the queue's rows of messages finished longer ago than they stay listed.

A queued message grows rows that outlive its delivery: the message, one row per recipient, the outbound
worker's attempts and its hold/DKIM row (about 4 KB a message). ``gateway queue list`` keeps showing a
finished message for ``outbound.finished_listed_hours`` (issue 11: ``--state failed`` finds it); past that
window nobody needs them, and ``QueuePurge`` deletes them:

- only messages whose state is ``done``: every recipient delivered or failed, the failure DSNs queued in
  the transaction that settled them (RFC 3464: the DSN is a queued message of its own), the spool file no
  longer read. A message still queued (pending, deferred, in flight, held) is never touched: the WHERE
  clause that deletes says so again, and a message with an open recipient is skipped whatever its state;
- not while a companion still needs the message: the DMP bridge reads the queued message (who deposited
  it) while the filing of one of its deliveries may still run or be run again (``gateway record refile``);
  ``PurgeCompanion.needed`` names those, and they wait for a later pass;
- in bounded batches (``retention.purge_batch_size`` messages per transaction, each a short write
  transaction, the event loop given back between them), so SQLite's one writer is never held for long;
- the audit log is not the queue's: it is append-only and never purged.

Companions (the DMP bridge's filing jobs) purge their own finished rows first, in the same pass. Followers
(the S/MIME verdicts and decrypted copies of a message's deliveries: ``PurgeFollower``) belong to one message
and go with it: their rows in the transaction that deletes it, the files they name once it has committed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from sqlalchemy import Select, Table, delete, func, select
from sqlalchemy.engine import Connection

from gateway.errors import Conflict
from gateway.ops.periodic import PeriodicTask
from gateway.queue.outbound_tables import OutboundAttempt, OutboundMessage
from gateway.queue.spool import Spool
from gateway.queue.store import OPEN_STATES, delivery_key
from gateway.queue.tables import MessageState, QueuedMessage, QueuedRecipient, RouteKind
from gateway.storage.db import Database

log = logging.getLogger("gateway.queue.purge")

PURGE_LOCK = "queue-purge"     # gateway.storage.advisory: one node purges at a time
_IDS_PER_STATEMENT = 1000      # bound parameters per IN list (SQLite allows 32,766)
_MESSAGES: Table = QueuedMessage.__table__          # type: ignore[assignment]
_RECIPIENTS: Table = QueuedRecipient.__table__      # type: ignore[assignment]
_ATTEMPTS: Table = OutboundAttempt.__table__        # type: ignore[assignment]
_OUTBOUND: Table = OutboundMessage.__table__        # type: ignore[assignment]


@dataclass
class PurgeCount:
    """What a purge removed (or, in a dry run, would remove): rows per table, and what it kept."""

    removed: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)      # finished but still needed, per reason

    def add(self, table: str, rows: int) -> None:
        self.removed[table] = self.removed.get(table, 0) + rows

    def keep(self, reason: str, count: int) -> None:
        if count:
            self.kept[reason] = self.kept.get(reason, 0) + count

    def merge(self, other: "PurgeCount") -> None:
        for table, rows in other.removed.items():
            self.add(table, rows)
        for reason, count in other.kept.items():
            self.keep(reason, count)


@dataclass
class PurgeReport:
    """One pass of ``MailQueue.purge``: the cutoffs, whether rows were deleted, and what (per table)."""

    dry_run: bool
    cutoff: dt.datetime
    count: PurgeCount = field(default_factory=PurgeCount)

    @property
    def messages(self) -> int:
        return self.count.removed.get("queue_messages", 0)


class PurgeCompanion(Protocol):
    """Another area's rows that grow with each message (the DMP bridge's filing jobs)."""

    name: str

    async def purge(self, now: dt.datetime, *, dry_run: bool, batch_size: int) -> PurgeCount:
        """Delete (or count, ``dry_run``) its own finished rows past its window, in batches."""
        ...

    def needed(self, connection: Connection, keys: dict[str, str], now: dt.datetime) -> set[str]:
        """Of ``keys`` (delivery key -> queue id), the queue ids it still needs once its own purge at ``now``
        has run (the same answer in a dry run, before that purge)."""
        ...


class PurgeFollower(Protocol):
    """Another area's rows that belong to one queued message (the S/MIME verdicts of its deliveries)."""

    def delete_with(self, connection: Connection, queue_ids: Sequence[str], *,
                    dry_run: bool) -> tuple[dict[str, int], list[str]]:
        """In the transaction deleting the messages ``queue_ids``: delete (or count, ``dry_run``) their rows;
        the rows per table and the files those rows named."""
        ...

    async def remove_files(self, files: Sequence[str]) -> None:
        """Once that transaction has committed: remove the files ``delete_with`` named."""
        ...


@dataclass(frozen=True)
class _Batch:
    scanned: int               # candidates read (fewer than the batch size: the last batch)
    last_id: str | None        # the cursor for the next batch
    purged: list[str]          # queue ids deleted (or that would be)
    count: PurgeCount
    files: dict[int, list[str]] = field(default_factory=dict)    # per follower: its files to remove after commit


class QueuePurge:
    """Deletes the rows of messages finished before a cutoff, in batches; companions first."""

    def __init__(self, db: Database, spool: Spool, *, batch_size: int = 1000) -> None:
        self.db = db
        self.spool = spool
        self.batch_size = batch_size
        self.companions: list[PurgeCompanion] = []
        self.followers: list[PurgeFollower] = []

    async def run(self, cutoff: dt.datetime, *, now: dt.datetime, dry_run: bool = False) -> PurgeReport:
        report = PurgeReport(dry_run=dry_run, cutoff=cutoff)
        for companion in self.companions:
            report.count.merge(await companion.purge(now, dry_run=dry_run, batch_size=self.batch_size))
        after: str | None = None
        while True:
            batch = await self.db.run_in_transaction(partial(self._batch, cutoff=cutoff, now=now, after=after,
                                                             dry_run=dry_run), write=not dry_run)
            report.count.merge(batch.count)
            if not dry_run:
                for queue_id in batch.purged:
                    self.spool.remove(queue_id)   # normally gone when the message finished; a crash may leave it
                for index, files in batch.files.items():
                    await self.followers[index].remove_files(files)
            if batch.scanned < self.batch_size or batch.last_id is None:
                return report
            after = batch.last_id
            await asyncio.sleep(0)                # the next batch is a new transaction: others write in between

    def _batch(self, connection: Connection, cutoff: dt.datetime, now: dt.datetime, after: str | None,
               dry_run: bool) -> _Batch:
        """One transaction: SQLite's BEGIN IMMEDIATE (``write``) holds the write lock from the first read, and
        on PostgreSQL the candidate rows are locked, so what is checked here is what is deleted."""
        count = PurgeCount()
        candidates = self._finished(connection, cutoff, after, lock=not dry_run)
        if not candidates:
            return _Batch(0, None, [], count)
        recipients = connection.execute(select(_RECIPIENTS.c.id, _RECIPIENTS.c.message_id, _RECIPIENTS.c.route,
                                               _RECIPIENTS.c.state).where(_RECIPIENTS.c.message_id.in_(candidates))).all()
        # A finished message has no open recipient; one that does (whatever its state says) is left alone.
        still_open = {queue_id for _id, queue_id, _route, state in recipients if state in OPEN_STATES}
        count.keep("a recipient still open", len(still_open))
        purgeable = {queue_id for queue_id in candidates if queue_id not in still_open}
        keys = {delivery_key(queue_id, recipient_id): queue_id for recipient_id, queue_id, route, _state in recipients
                if route == RouteKind.LOCAL.value and queue_id in purgeable}
        for companion in self.companions:
            needed = companion.needed(connection, keys, now) & purgeable
            count.keep(f"needed by {companion.name}", len(needed))
            purgeable -= needed
        ids = sorted(purgeable)
        recipient_ids = [recipient_id for recipient_id, queue_id, _route, _state in recipients if queue_id in purgeable]
        files: dict[int, list[str]] = {}
        if ids:
            for index, follower in enumerate(self.followers):
                rows_per_table, files[index] = follower.delete_with(connection, ids, dry_run=dry_run)
                for table, rows in rows_per_table.items():
                    count.add(table, rows)
            for table, rows in self._delete(connection, ids, recipient_ids, dry_run).items():
                count.add(table, rows)
        return _Batch(len(candidates), candidates[-1], ids, count, files)

    def _finished(self, connection: Connection, cutoff: dt.datetime, after: str | None, *, lock: bool) -> list[str]:
        query = (select(_MESSAGES.c.id).where(_MESSAGES.c.state == MessageState.DONE.value,
                                              _MESSAGES.c.done_at < cutoff)
                 .order_by(_MESSAGES.c.id).limit(self.batch_size))
        if after is not None:
            query = query.where(_MESSAGES.c.id > after)
        if lock:
            query = query.with_for_update()        # PostgreSQL; SQLite's BEGIN IMMEDIATE already excludes writers
        return [row[0] for row in connection.execute(query)]

    @staticmethod
    def _delete(connection: Connection, ids: Sequence[str], recipient_ids: Sequence[int],
                dry_run: bool) -> dict[str, int]:
        """Children first (explicitly, not by ON DELETE CASCADE alone), then the messages, still finished."""
        chunks = [recipient_ids[start:start + _IDS_PER_STATEMENT]
                  for start in range(0, len(recipient_ids), _IDS_PER_STATEMENT)]
        if dry_run:
            return {
                "outbound_attempts": sum(_count(connection, select(_ATTEMPTS.c.id).where(_ATTEMPTS.c.recipient_id.in_(chunk)))
                                         for chunk in chunks),
                "outbound_messages": _count(connection, select(_OUTBOUND.c.message_id).where(_OUTBOUND.c.message_id.in_(ids))),
                "queue_recipients": len(recipient_ids),
                "queue_messages": len(ids),
            }
        return {
            "outbound_attempts": sum(connection.execute(delete(_ATTEMPTS).where(_ATTEMPTS.c.recipient_id.in_(chunk))).rowcount
                                     for chunk in chunks),
            "outbound_messages": connection.execute(delete(_OUTBOUND).where(_OUTBOUND.c.message_id.in_(ids))).rowcount,
            "queue_recipients": sum(connection.execute(delete(_RECIPIENTS).where(_RECIPIENTS.c.id.in_(chunk))).rowcount
                                    for chunk in chunks),
            "queue_messages": connection.execute(delete(_MESSAGES).where(
                _MESSAGES.c.id.in_(ids), _MESSAGES.c.state == MessageState.DONE.value)).rowcount,
        }


def _count(connection: Connection, query: Select[Any]) -> int:
    subquery = query.subquery()
    return int(connection.execute(select(func.count()).select_from(subquery)).scalar() or 0)


class PurgeTask(PeriodicTask):
    """``gateway serve``'s periodic purge, on one node at a time (the others skip this turn)."""

    name = "queue-purge"

    def __init__(self, purge: Callable[[], Awaitable[PurgeReport]], *, interval_seconds: float) -> None:
        super().__init__(interval_seconds=interval_seconds)
        self.purge = purge
        self.passes = 0

    async def run_once(self) -> PurgeReport | None:
        """One pass, or None when another node runs it now (``MailQueue.purge`` takes the lock)."""
        try:
            report = await self.purge()
        except Conflict:
            return None
        self.passes += 1
        if report.count.removed:
            log.info("queue purge: removed %s (finished before %s)", describe_rows(report.count.removed),
                     report.cutoff.isoformat(timespec="seconds"))
        return report


def describe_rows(rows: dict[str, int]) -> str:
    return ", ".join(f"{count} {table}" for table, count in sorted(rows.items()) if count) or "nothing"

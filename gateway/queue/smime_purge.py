"""The S/MIME verdicts of a message's deliveries go with the message (a follower of the queue's purge).

``SmimeService.record`` writes, after the queue commit, one ``smime_inbound_results`` row per recipient
mailbox of an inbound S/MIME message (the verdict, the signer) and, when the gateway decrypted it with a key
it holds, a blob of the plaintext under the mailbox's key. Both are read by the DMP bridge while the delivery
is filed or refiled, which is exactly while the queue keeps the message (``PurgeCompanion.needed``). So they
are deleted with the message: the rows in the transaction that deletes it (``gateway.queue.purge``), the
plaintext blobs once that transaction has committed (a rolled-back purge keeps rows whose blobs still exist;
a crash in between leaves only unreferenced ciphertext under a mailbox key).

Rows whose message is already gone (purged before verdicts followed their message) are swept by the same
pass as a companion: a verdict older than the queue's window whose queue id has no message any more. A
verdict is only ever written after its message's rows are committed, so a young one is never taken for
an orphan.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from functools import partial

from sqlalchemy import Table, delete, select
from sqlalchemy.engine import Connection

from gateway.queue.purge import PurgeCount
from gateway.queue.tables import QueuedMessage
from gateway.security.smime_policy import InboundResult
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database

TABLE = "smime_inbound_results"
_RESULTS: Table = InboundResult.__table__      # type: ignore[assignment]
_MESSAGES: Table = QueuedMessage.__table__      # type: ignore[assignment]
_IDS_PER_STATEMENT = 1000


class InboundResultsPurge:
    """``PurgeFollower`` of the queue (a message's S/MIME verdicts and decrypted copies go with it) and
    ``PurgeCompanion`` (the verdicts of messages already gone, older than ``kept_hours``)."""

    name = "S/MIME verdicts"

    def __init__(self, db: Database, blobs: BlobStore, *, kept_hours: float) -> None:
        self.db = db
        self.blobs = blobs
        self.kept = dt.timedelta(hours=kept_hours)

    # ------------------------------------------------------------------ follower: with their message

    def delete_with(self, connection: Connection, queue_ids: Sequence[str], *,
                    dry_run: bool) -> tuple[dict[str, int], list[str]]:
        rows = 0
        files: list[str] = []
        for start in range(0, len(queue_ids), _IDS_PER_STATEMENT):
            chunk = list(queue_ids[start:start + _IDS_PER_STATEMENT])
            found = connection.execute(select(_RESULTS.c.id, _RESULTS.c.decrypted_blob_id)
                                       .where(_RESULTS.c.queue_id.in_(chunk))).all()
            files += [blob_id for _id, blob_id in found if blob_id is not None]
            if dry_run:
                rows += len(found)
            else:
                rows += connection.execute(delete(_RESULTS).where(_RESULTS.c.queue_id.in_(chunk))).rowcount
        return {TABLE: rows}, files

    async def remove_files(self, files: Sequence[str]) -> None:
        for blob_id in files:
            await self.blobs.delete(blob_id)

    # ------------------------------------------------------------------ companion: orphans

    async def purge(self, now: dt.datetime, *, dry_run: bool, batch_size: int) -> PurgeCount:
        count = PurgeCount()
        after = 0
        while True:
            scanned, last_id, rows, files = await self.db.run_in_transaction(
                partial(self._orphans, cutoff=now - self.kept, after=after, limit=batch_size, dry_run=dry_run),
                write=not dry_run)
            if rows:
                count.add(f"{TABLE} (message already gone)", rows)
            if not dry_run:
                await self.remove_files(files)
            if scanned < batch_size:
                return count
            after = last_id
            await asyncio.sleep(0)        # each batch its own short transaction

    def _orphans(self, connection: Connection, *, cutoff: dt.datetime, after: int, limit: int,
                 dry_run: bool) -> tuple[int, int, int, list[str]]:
        candidates = connection.execute(
            select(_RESULTS.c.id, _RESULTS.c.queue_id, _RESULTS.c.decrypted_blob_id)
            .where(_RESULTS.c.created_at < cutoff, _RESULTS.c.id > after)
            .order_by(_RESULTS.c.id).limit(limit)).all()
        if not candidates:
            return 0, after, 0, []
        queue_ids = sorted({queue_id for _id, queue_id, _blob in candidates})
        alive = set(connection.execute(select(_MESSAGES.c.id).where(_MESSAGES.c.id.in_(queue_ids))).scalars())
        orphans = [(row_id, blob_id) for row_id, queue_id, blob_id in candidates if queue_id not in alive]
        if orphans and not dry_run:
            connection.execute(delete(_RESULTS).where(_RESULTS.c.id.in_([row_id for row_id, _blob in orphans])))
        return len(candidates), candidates[-1][0], len(orphans), [blob for _row, blob in orphans if blob is not None]

    def needed(self, connection: Connection, keys: dict[str, str], now: dt.datetime) -> set[str]:
        """A verdict never keeps its message: it goes with it."""
        return set()

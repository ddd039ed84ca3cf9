"""The S/MIME verdicts of a message's deliveries go with the message (a follower of the queue's purge).

``SmimeService.record`` writes, after the queue commit, one ``smime_inbound_results`` row per recipient
mailbox of an inbound S/MIME message (the verdict, the signer) and, when the gateway decrypted it with a key
it holds, a blob of the plaintext under the mailbox's key. Both are read by the DMP bridge while the delivery
is filed or refiled, which is exactly while the queue keeps the message (``PurgeCompanion.needed``). So they
are deleted with the message: the rows in the transaction that deletes it (``gateway.queue.purge``), the
plaintext blobs once that transaction has committed (a rolled-back purge keeps rows whose blobs still exist;
a crash in between leaves only unreferenced ciphertext under a mailbox key).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Table, delete, select
from sqlalchemy.engine import Connection

from gateway.security.smime_policy import InboundResult
from gateway.storage.blobs import BlobStore

_RESULTS: Table = InboundResult.__table__      # type: ignore[assignment]
_IDS_PER_STATEMENT = 1000


class InboundResultsPurge:
    """``PurgeFollower`` of the queue: a message's S/MIME verdicts and decrypted copies."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

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
        return {"smime_inbound_results": rows}, files

    async def remove_files(self, files: Sequence[str]) -> None:
        for blob_id in files:
            await self.blobs.delete(blob_id)

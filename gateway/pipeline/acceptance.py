"""Group commit at acceptance: messages whose DATA ends together share one fsync of the queue directory
and one queue transaction.

Each message is made durable in the order of gateway.queue.spool (mox does the same):

1. its spool file's bytes are fsynced, by the message's own task (concurrent fsyncs overlap); a small
   message has no file: its sealed octets go into its queue row (gateway.queue.spool, "in its row");
2. its file is renamed into ``queue/``; then ``queue/`` is fsynced once for every file of the batch (none
   when every message of the batch is in its row);
3. the queue rows of the whole batch, with the contents kept in them, are committed in one transaction
   (SQLite synchronous=FULL and PostgreSQL make a committed transaction durable), written by one
   synchronous function in one hop to a database thread (``Database.run_in_transaction``; BEGIN IMMEDIATE
   on SQLite).

``commit`` returns only once the transaction holding that message's rows has committed, so the 250 that
follows still means "fsynced and committed", exactly as with a transaction of its own. The first caller
starts a committer task; callers arriving while a batch is in flight wait for the next one (at most
``max_batch`` messages per transaction). When the shared transaction fails, every message of the batch is
committed again in a transaction of its own, so each gets the outcome it would have had alone. A caller
cancelled (the client left) while its batch is in flight learns the outcome: ``AcceptCancelled.committed``
says whether its rows exist, in which case its spool file belongs to the queue and must be kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.pipeline.conversations import ConversationChange
from gateway.queue.store import AcceptedRows, QueueStore
from gateway.queue.spool import Spool, SpoolFile, fsync_directory_in_thread

log = logging.getLogger("gateway.pipeline")


class AcceptCancelled(asyncio.CancelledError):
    """The caller was cancelled while its batch was committing; ``committed`` says how that ended."""

    def __init__(self, committed: bool) -> None:
        super().__init__()
        self.committed = committed


@dataclass
class _Acceptance:
    files: Sequence[SpoolFile]
    copies: Sequence[AcceptedRows]
    changes: Sequence[ConversationChange]
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: bool = False


class AcceptanceCommitter:
    def __init__(self, spool: Spool, queue: QueueStore, *, max_batch: int = 64) -> None:
        self.spool = spool
        self.queue = queue
        self.max_batch = max_batch
        self._pending: list[_Acceptance] = []
        self._committer: asyncio.Task[None] | None = None
        self.transactions = 0       # for tests and benchmarks: transactions committed, messages in them
        self.messages = 0

    async def commit(self, files: Sequence[SpoolFile], copies: Sequence[AcceptedRows],
                     changes: Sequence[ConversationChange]) -> None:
        """Make ``files`` durable and commit ``copies`` (one accepted message); returns once both are done."""
        for spool_file in files:
            await spool_file.sync_data(into_row=True)                     # step 1, this message's own
        # A small message has no file: its sealed octets are committed with its rows (step 3's fsync).
        contents = {spool_file.queue_id: spool_file.row_content for spool_file in files}
        for copy in copies:
            copy.message["content"] = contents.get(copy.queue_id)
        acceptance = _Acceptance(files, copies, changes)
        self._pending.append(acceptance)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._drain(), name="acceptance-group-commit")
        try:
            await asyncio.shield(acceptance.future)
        except asyncio.CancelledError:
            if not acceptance.started:
                self._pending.remove(acceptance)                          # never reached the database
                raise
            try:
                await asyncio.shield(acceptance.future)                   # in flight: learn the outcome
            except asyncio.CancelledError:
                raise
            except BaseException:                  # not committed: the caller discards as usual
                raise AcceptCancelled(committed=False) from None
            raise AcceptCancelled(committed=True) from None

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            for acceptance in batch:
                acceptance.started = True
            try:
                await self._commit(batch)
            except BaseException as exc:              # never leave a caller waiting
                for acceptance in batch:
                    if not acceptance.future.done():
                        acceptance.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    for acceptance in self._pending:
                        acceptance.future.set_exception(asyncio.CancelledError())
                    self._pending = []
                    raise

    async def _commit(self, batch: list[_Acceptance]) -> None:
        moved = [acceptance for acceptance in batch if self._move(acceptance)]
        if not moved:
            return
        if any(spool_file.in_queue_directory for acceptance in moved for spool_file in acceptance.files):
            await fsync_directory_in_thread(self.spool.queue)             # step 2: every name of the batch
        if len(moved) == 1:
            await self._alone(moved[0])
            return
        copies = [c for a in moved for c in a.copies]
        changes = [c for a in moved for c in a.changes]
        try:                                                              # step 3: one transaction, one hop
            await self.queue.db.run_in_transaction(lambda c: QueueStore.insert_accepted(c, copies, changes),
                                                   write=True)
        except Exception as exc:                      # each message alone gets its own outcome
            log.debug("acceptance group of %d failed (%s); committing one by one", len(moved), exc)
            for acceptance in moved:
                await self._alone(acceptance)
            return
        self.transactions += 1
        self.messages += len(moved)
        for acceptance in moved:
            acceptance.future.set_result(None)

    @staticmethod
    def _move(acceptance: _Acceptance) -> bool:
        try:
            for spool_file in acceptance.files:
                spool_file.move_into_queue()
        except OSError as exc:
            acceptance.future.set_exception(exc)
            return False
        return True

    async def _alone(self, acceptance: _Acceptance) -> None:
        try:
            await self.queue.db.run_in_transaction(
                lambda c: QueueStore.insert_accepted(c, acceptance.copies, acceptance.changes), write=True)
        except Exception as exc:                      # handed to that caller
            acceptance.future.set_exception(exc)
            return
        self.transactions += 1
        self.messages += 1
        acceptance.future.set_result(None)

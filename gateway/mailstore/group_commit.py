"""Group commit: concurrent writers of the mail store share one SQLite transaction, so one WAL fsync.

SQLite has one writer at a time and, with ``synchronous=FULL``, every commit
waits for an fsync. Deliveries arriving together (several SMTP delivery
workers, several mailboxes) would otherwise take the write lock and fsync one
after the other, each waiting in ``busy_timeout``. Here the first writer starts
a committer task; writers that arrive while a commit is in flight queue up and
are committed together in the next transaction.

Durability is unchanged: ``run`` returns only after the transaction holding
that writer's rows has committed (synchronous=FULL), exactly as a transaction
of its own would. Each writer's ``work`` runs in the shared session one after
the other, in arrival order, as it would have run alone:

- a mail store refusal raised by one writer (``MailStoreError``: quota, folder
  gone, UIDVALIDITY changed...) is raised before that writer adds any row, so
  it goes to that writer alone and the others commit;
- any other error (an ``IntegrityError`` when a concurrent redelivery already
  filed the same delivery key, a database error) rolls the shared transaction
  back and every writer of that batch is run again in a transaction of its
  own, so each gets exactly the outcome it would have had without grouping.

A writer cancelled while its batch is committing waits for the outcome; if its
rows were committed the ``CancelledError`` it then raises has ``committed =
True``, so the caller keeps the blob the committed row points at.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.mailstore.errors import MailStoreError

log = logging.getLogger(__name__)

Work = Callable[[AsyncSession], Awaitable[Any]]
Transaction = Callable[[Work], Awaitable[Any]]


@dataclass
class _Writer:
    work: Work
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: bool = False


class _Refused:
    def __init__(self, error: MailStoreError) -> None:
        self.error = error


class GroupCommit:
    def __init__(self, transaction: Transaction, *, max_batch: int = 64) -> None:
        self._transaction = transaction  # runs one work function in one retried transaction
        self.max_batch = max_batch
        self._pending: list[_Writer] = []
        self._committer: asyncio.Task[None] | None = None
        self.batches = 0  # for tests and benchmarks: transactions committed, writers grouped
        self.grouped = 0

    async def run(self, work: Work) -> Any:
        writer = _Writer(work)
        self._pending.append(writer)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._drain(), name="mailstore-group-commit")
        try:
            return await asyncio.shield(writer.future)
        except asyncio.CancelledError:
            if not writer.started:
                self._pending.remove(writer)  # never ran: nothing of it reaches the database
                raise
            try:
                await asyncio.shield(writer.future)  # in flight: learn whether it was committed
            except asyncio.CancelledError:
                raise
            except BaseException:  # noqa: BLE001  (not committed: the caller cleans up as usual)
                raise asyncio.CancelledError() from None
            cancelled = asyncio.CancelledError()
            cancelled.committed = True  # type: ignore[attr-defined]
            raise cancelled from None

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            for writer in batch:
                writer.started = True
            try:
                await self._commit(batch)
            except BaseException as exc:  # noqa: BLE001  (never leave a writer waiting)
                for writer in batch:
                    if not writer.future.done():
                        writer.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    for writer in self._pending:
                        writer.future.set_exception(asyncio.CancelledError())
                    self._pending = []
                    raise

    async def _commit(self, batch: list[_Writer]) -> None:
        if len(batch) == 1:
            await self._alone(batch[0])
            return

        async def together(session: AsyncSession) -> list[Any]:
            outcomes: list[Any] = []
            for writer in batch:
                try:
                    outcomes.append(await writer.work(session))
                except MailStoreError as refusal:
                    outcomes.append(_Refused(refusal))
            return outcomes

        try:
            outcomes = await self._transaction(together)
        except Exception as exc:  # noqa: BLE001  (each writer alone gets its own outcome)
            log.debug("group commit of %d writers failed (%s); committing them one by one", len(batch), exc)
            for writer in batch:
                await self._alone(writer)
            return
        self.batches += 1
        self.grouped += len(batch)
        for writer, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, _Refused):
                writer.future.set_exception(outcome.error)
            else:
                writer.future.set_result(outcome)

    async def _alone(self, writer: _Writer) -> None:
        try:
            writer.future.set_result(await self._transaction(writer.work))
            self.batches += 1
            self.grouped += 1
        except Exception as exc:  # noqa: BLE001  (handed to that writer)
            writer.future.set_exception(exc)

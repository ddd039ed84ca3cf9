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

Two kinds of writers: ``GroupCommit`` runs async works on an ``AsyncSession``
(the mail store's IMAP writes), ``SyncGroupCommit`` synchronous works on a
``Connection`` (deliveries and APPEND): the whole batch is then one function run
in one hop to a database thread (``Database.run_in_transaction``), instead of a
thread hop and an event-loop wake-up per statement.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.mailstore.errors import MailStoreError

log = logging.getLogger(__name__)

Work = Callable[[AsyncSession], Awaitable[Any]]
Transaction = Callable[[Work], Awaitable[Any]]
SyncWork = Callable[[Connection], Any]
SyncTransaction = Callable[[SyncWork], Awaitable[Any]]
W = TypeVar("W")


@dataclass
class _Writer(Generic[W]):
    work: W
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: bool = False


class _Refused:
    def __init__(self, error: MailStoreError) -> None:
        self.error = error


class _Batcher(ABC, Generic[W]):
    """The committer task, the batches and the outcomes, whatever the writers' kind (see the subclasses)."""

    def __init__(self, transaction: Callable[[W], Awaitable[Any]], *, max_batch: int = 64) -> None:
        self._transaction = transaction  # runs one work function in one retried transaction
        self.max_batch = max_batch
        self._pending: list[_Writer[W]] = []
        self._committer: asyncio.Task[None] | None = None
        self.batches = 0  # for tests and benchmarks: transactions committed, writers grouped
        self.grouped = 0

    @abstractmethod
    def _together(self, works: list[W]) -> W:
        """One work running ``works`` in order; a writer's ``MailStoreError`` becomes its ``_Refused`` outcome."""

    async def run(self, work: W) -> Any:
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

    async def _commit(self, batch: list[_Writer[W]]) -> None:
        if len(batch) == 1:
            await self._alone(batch[0])
            return

        try:
            outcomes = await self._transaction(self._together([writer.work for writer in batch]))
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

    async def _alone(self, writer: _Writer[W]) -> None:
        try:
            writer.future.set_result(await self._transaction(writer.work))
            self.batches += 1
            self.grouped += 1
        except Exception as exc:  # noqa: BLE001  (handed to that writer)
            writer.future.set_exception(exc)


class GroupCommit(_Batcher[Work]):
    """Writers as async functions of an ``AsyncSession``."""

    def _together(self, works: list[Work]) -> Work:
        async def together(session: AsyncSession) -> list[Any]:
            outcomes: list[Any] = []
            for work in works:
                try:
                    outcomes.append(await work(session))
                except MailStoreError as refusal:
                    outcomes.append(_Refused(refusal))
            return outcomes
        return together


class SyncGroupCommit(_Batcher[SyncWork]):
    """Writers as synchronous functions of a ``Connection``: the batch runs whole in one database thread hop."""

    def _together(self, works: list[SyncWork]) -> SyncWork:
        def together(connection: Connection) -> list[Any]:
            outcomes: list[Any] = []
            for work in works:
                try:
                    outcomes.append(work(connection))
                except MailStoreError as refusal:
                    outcomes.append(_Refused(refusal))
            return outcomes
        return together

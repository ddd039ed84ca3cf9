"""The queue in the database: one transaction per accepted message, one row per recipient.

``commit`` is the last step before 250: the spool file is already durable, and
the message row, its recipient rows and the pipeline's companion changes (conversations) are written in
one transaction (SQLite with synchronous=FULL and PostgreSQL both make a
committed transaction durable).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Select, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from gateway.queue.tables import (
    MessageState,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    RouteKind,
)
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, utcnow
from gateway.storage.prepared import Prepared

OPEN_STATES = (RecipientState.PENDING.value, RecipientState.DEFERRED.value)
_MESSAGES: Table = QueuedMessage.__table__          # type: ignore[assignment]  # SQL Core on the accept path
_RECIPIENTS: Table = QueuedRecipient.__table__      # type: ignore[assignment]


def delivery_key(queue_id: str, recipient_id: int) -> str:
    """The key of one local delivery (``<queue id>:<recipient row>``): a redelivery after a crash is a no-op."""
    return f"{queue_id}:{recipient_id}"


@dataclass(frozen=True)
class LocalWork:
    """One local recipient due for delivery (``mailbox_id`` None: its mailbox was deleted since)."""

    recipient_id: int
    queue_id: str
    mailbox_id: int | None
    address: str
    trace_headers: str
    received_at: dt.datetime
    sender: str = ""                  # the reverse-path ("" for <>)
    size: int = 0                     # octets in the spool (before the trace fields)
    mailbox_type: str | None = None   # PER, ORG, APP, CAB, PAT (directory), None when the mailbox is gone


@dataclass(frozen=True)
class AcceptedRows:
    """The rows of one queued copy of an accepted message, as plain column values (SQL Core inserts them:
    no ORM unit of work on the acceptance path)."""

    message: dict[str, object]               # queue_messages columns; "id" is the queue id
    recipients: list[dict[str, object]]      # queue_recipients columns, without message_id
    recipient_ids: list[int] = field(default_factory=list)   # set by ``insert_accepted``, in ``recipients``' order

    @property
    def queue_id(self) -> str:
        return str(self.message["id"])

    def has_route(self, route: RouteKind) -> bool:
        return any(r["route"] == route.value for r in self.recipients)


class QueueRows(Protocol):
    """Rows another component commits with a recipient's outcome (a DSN: ``PreparedMail``)."""

    def add_to(self, session: AsyncSession) -> None: ...


class CompanionChange(Protocol):
    """A change the pipeline commits with the queue rows of a message it accepted (a conversation opened or
    closed: ``gateway.pipeline.conversations.ConversationChange``), in the same transaction: synchronous,
    in the database thread of ``Database.run_in_transaction``."""

    def apply_in(self, connection: Connection) -> None: ...


@dataclass(frozen=True)
class Backlog:
    """Recipients waiting for delivery (pending or deferred): counts by (route, state), and the oldest one's age."""

    counts: dict[tuple[str, str], int]
    oldest_seconds: float | None

    def by_route(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for (route, _state), count in self.counts.items():
            totals[route] = totals.get(route, 0) + count
        return totals


class QueueStore:
    async def backlog(self) -> Backlog:
        """What `gateway status` and the metrics report of the queue, read in one transaction."""
        waiting = QueuedRecipient.state.in_([RecipientState.PENDING.value, RecipientState.DEFERRED.value])
        async with self.db.session() as session:
            rows = (await session.execute(select(QueuedRecipient.route, QueuedRecipient.state, func.count())
                                          .where(waiting).group_by(QueuedRecipient.route, QueuedRecipient.state))).all()
            oldest = (await session.execute(select(func.min(QueuedMessage.received_at)).join(QueuedRecipient)
                                            .where(waiting))).scalar()
        age = None
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=dt.timezone.utc)
            age = max(0.0, (dt.datetime.now(dt.timezone.utc) - oldest).total_seconds())
        return Backlog({(str(route), str(state)): int(count) for route, state, count in rows}, age)

    def __init__(self, db: Database) -> None:
        self.db = db

    async def commit(self, message: QueuedMessage, recipients: Sequence[QueuedRecipient],
                     conversation_changes: Sequence[CompanionChange]) -> None:
        """One message's rows in a transaction of their own (tests, tools; acceptance uses ``insert_accepted``)."""
        await self.commit_all([(message, recipients)], conversation_changes)

    async def commit_all(self, messages: Sequence[tuple[QueuedMessage, Sequence[QueuedRecipient]]],
                         conversation_changes: Sequence[CompanionChange]) -> None:
        """``commit`` for the copies of one accepted message (S/MIME split it), in one transaction."""
        async with self.db.session() as s:
            for message, recipients in messages:
                message.recipients = list(recipients)
                s.add(message)
            await s.flush()
            if conversation_changes:
                def apply(session: Session) -> None:
                    for change in conversation_changes:
                        change.apply_in(session.connection())
                await s.run_sync(apply)

    @staticmethod
    def insert_accepted(connection: Connection, copies: Sequence[AcceptedRows],
                        conversation_changes: Sequence[CompanionChange]) -> None:
        """The rows of accepted messages inside the caller's transaction (the acceptance group commit: one
        synchronous function in one database thread hop, ``Database.run_in_transaction``)."""
        _INSERT_MESSAGES.run_many(connection, [copy.message for copy in copies])
        for copy in copies:
            # Each row's id comes back (RETURNING): local delivery keys are made of them, and acceptance hands
            # the rows over to local delivery without reading them back.
            copy.recipient_ids[:] = [_INSERT_RECIPIENT.run(connection, {**row, "message_id": copy.queue_id}).fetchone()[0]
                                     for row in copy.recipients]
        for change in conversation_changes:
            change.apply_in(connection)

    @staticmethod
    def local_works(copy: AcceptedRows, mailbox_types: dict[int, str]) -> list[LocalWork]:
        """The local recipients of a copy ``insert_accepted`` committed, as ``local_work`` would read them now."""
        message = copy.message
        received_at = message["received_at"]
        assert isinstance(received_at, dt.datetime), "received_at is set by the pipeline"
        works: list[LocalWork] = []
        for recipient_id, row in zip(copy.recipient_ids, copy.recipients, strict=True):
            if row["route"] != RouteKind.LOCAL.value:
                continue
            mailbox_id = row["mailbox_id"]
            assert mailbox_id is None or isinstance(mailbox_id, int)
            works.append(LocalWork(recipient_id, copy.queue_id, mailbox_id, str(row["address"]),
                                   str(message["trace_headers"]), received_at, str(message["sender"] or ""),
                                   int(str(message["size"])),
                                   mailbox_types.get(mailbox_id) if mailbox_id is not None else None))
        return works

    @staticmethod
    def is_open_in(connection: Connection, recipient_id: int) -> bool:
        """Whether a recipient is still pending or deferred, inside the caller's transaction."""
        row = _RECIPIENT_STATE.run(connection, {"recipient": recipient_id}).fetchone()
        return row is not None and row[0] in OPEN_STATES

    async def local_work(self, queue_id: str | None = None, *, limit: int = 500) -> list[LocalWork]:
        """Local recipients that are pending, or deferred and due, oldest message first."""
        now = utcnow()
        return await self.db.run_in_transaction(lambda connection: self.local_work_in(connection, queue_id,
                                                                                      limit=limit, now=now))

    @staticmethod
    def local_work_in(connection: Connection, queue_id: str | None = None, *, limit: int = 500,
                      now: dt.datetime | None = None) -> list[LocalWork]:
        """``local_work`` inside the caller's transaction (synchronous, in the database thread)."""
        stmt = _LOCAL_WORK if queue_id is None else _LOCAL_WORK_OF
        wanted = {"now": now or utcnow(), "limit": limit, "queue_id": queue_id}
        return [LocalWork(*row) for row in stmt.rows(connection, wanted)]

    async def with_local_work(self, queue_ids: Sequence[str]) -> set[str]:
        """Which of ``queue_ids`` have local recipients due now (what ``local_work(queue_id, limit=1)`` finds
        for each), read in one transaction: the recovery pass asks it of every queued message at once."""
        now = utcnow()
        recipients = _RECIPIENTS.c

        def read(connection: Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(queue_ids), 500):
                chunk = list(queue_ids[start:start + 500])
                found.update(connection.execute(
                    select(recipients.message_id).distinct()
                    .join_from(_RECIPIENTS, _MESSAGES, _MESSAGES.c.id == recipients.message_id)
                    .where(recipients.message_id.in_(chunk), recipients.route == RouteKind.LOCAL.value,
                           or_(*(recipients.state == state for state in OPEN_STATES)),
                           recipients.next_attempt_at.is_(None) | (recipients.next_attempt_at <= now))).scalars())
            return found

        return await self.db.run_in_transaction(read)

    async def claim_local_work(self, queue_id: str, lease: dt.timedelta) -> list[LocalWork]:
        """``local_work(queue_id)``, claimed for ``lease`` when several nodes share the database.

        PostgreSQL: the due recipients are locked (``FOR UPDATE SKIP LOCKED``: rows another node is claiming
        at this moment are skipped, not waited for) and their ``next_attempt_at`` moved to the lease's end, so
        no other node takes them until their delivery is recorded (delivered, deferred or failed, each of which
        sets the column again) or, if this node dies, until the lease ends. SQLite has one process, whose
        scheduler never runs a message twice at once: no claim, no extra transaction."""
        if self.db.is_sqlite:
            return await self.local_work(queue_id)
        now = utcnow()
        async with self.db.session() as s:
            rows = (await s.execute(_CLAIM_LOCAL_WORK_OF, {"now": now, "limit": 500, "queue_id": queue_id})).all()
            if rows:
                await s.execute(update(QueuedRecipient).where(QueuedRecipient.id.in_([r.id for r in rows]))
                                .values(next_attempt_at=now + lease).execution_options(synchronize_session=False))
        return [LocalWork(r.id, r.message_id, r.mailbox_id, r.address, r.trace_headers, r.received_at, r.sender,
                          r.size, r.type) for r in rows]

    async def mark_delivered(self, recipient_id: int, queue_id: str) -> bool:
        """Record the delivery and, in the same transaction, finish the message when it was the
        last open recipient; True when the message is done (its spool file may go)."""
        return await self.db.run_in_transaction(lambda c: self.delivered_in(c, recipient_id, queue_id), write=True)

    @staticmethod
    def delivered_in(connection: Connection, recipient_id: int, queue_id: str) -> bool:
        """``mark_delivered`` inside the caller's transaction (the mail store's, which adds the message:
        synchronous, in its database thread)."""
        now = utcnow()
        _DELIVERED.run(connection, {"recipient": recipient_id, "now": now})
        # The message is done with its last open recipient: one statement, no count round trip.
        done = _FINISH_IF_NONE_OPEN.run(connection, {"queue_id": queue_id, "now": now})
        return bool(done.rowcount)

    async def mark_deferred(self, recipient_id: int, error: str, retry_at: dt.datetime) -> None:
        await self._set_state(recipient_id, RecipientState.DEFERRED, last_error=error[:2000], next_attempt_at=retry_at)

    async def mark_failed(self, recipient_id: int, error: str) -> None:
        await self._set_state(recipient_id, RecipientState.FAILED, last_error=error[:2000])

    async def fail(self, recipient_id: int, queue_id: str, error: str, report: QueueRows | None = None) -> bool:
        """A final failure, its DSN (``report``) and, when it was the last open recipient, the end of the
        message, in one transaction: the report is queued exactly when the failure is recorded.
        True when the message is done (its spool file may go)."""
        async with self.db.session() as s:
            await s.execute(update(QueuedRecipient).where(QueuedRecipient.id == recipient_id).values(
                state=RecipientState.FAILED.value, attempts=QueuedRecipient.attempts + 1, updated_at=utcnow(),
                last_error=error[:2000], next_attempt_at=None))
            if report is not None:
                report.add_to(s)
            return await self._finish_if_done(s, queue_id)

    async def _set_state(self, recipient_id: int, state: RecipientState, **values: object) -> None:
        async with self.db.session() as s:
            await s.execute(update(QueuedRecipient).where(QueuedRecipient.id == recipient_id).values(
                state=state.value, attempts=QueuedRecipient.attempts + 1, updated_at=utcnow(), **values))

    async def finish_if_done(self, queue_id: str) -> bool:
        """Mark the message done when no recipient is open; True when it is (its spool file may go)."""
        async with self.db.session() as s:
            return await self._finish_if_done(s, queue_id)

    @staticmethod
    async def _finish_if_done(s: AsyncSession, queue_id: str) -> bool:
        open_count = await s.scalar(select(func.count()).select_from(QueuedRecipient).where(
            QueuedRecipient.message_id == queue_id, QueuedRecipient.state.in_(OPEN_STATES)))
        if open_count:
            return False
        await s.execute(update(QueuedMessage).where(QueuedMessage.id == queue_id, QueuedMessage.state != MessageState.DONE.value)
                        .values(state=MessageState.DONE.value, done_at=utcnow(), content=None)
                        .execution_options(synchronize_session=False))
        return True

    async def queued_message_ids(self) -> set[str]:
        async with self.db.session() as s:
            return set((await s.scalars(select(QueuedMessage.id).where(QueuedMessage.state == MessageState.QUEUED.value))).all())

    async def known_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        async with self.db.session() as s:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                found |= set((await s.scalars(select(QueuedMessage.id).where(QueuedMessage.id.in_(chunk)))).all())
        return found

    async def done_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        async with self.db.session() as s:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                found |= set((await s.scalars(select(QueuedMessage.id).where(
                    QueuedMessage.id.in_(chunk), QueuedMessage.state == MessageState.DONE.value))).all())
        return found

    async def recipients_of(self, queue_id: str) -> list[QueuedRecipient]:
        async with self.db.session() as s:
            return list((await s.scalars(select(QueuedRecipient).where(QueuedRecipient.message_id == queue_id)
                                         .order_by(QueuedRecipient.id))).all())

    async def message(self, queue_id: str) -> QueuedMessage | None:
        async with self.db.session() as s:
            return await s.get(QueuedMessage, queue_id)


def _local_work_statement(one_message: bool) -> Select[Any]:
    """Built once, in SQL Core (tables, not mapped classes): every delivered message runs it."""
    recipients, messages, mailboxes = QueuedRecipient.__table__.c, QueuedMessage.__table__.c, Mailbox.__table__.c
    stmt = (select(recipients.id, recipients.message_id, recipients.mailbox_id, recipients.address,
                   messages.trace_headers, messages.received_at, messages.sender, messages.size, mailboxes.type)
            .join_from(QueuedRecipient.__table__, QueuedMessage.__table__, messages.id == recipients.message_id)
            .outerjoin(Mailbox.__table__, mailboxes.id == recipients.mailbox_id)
            .where(recipients.route == RouteKind.LOCAL.value, or_(*(recipients.state == state for state in OPEN_STATES)),
                   recipients.next_attempt_at.is_(None) | (recipients.next_attempt_at <= bindparam("now")))
            .order_by(recipients.message_id, recipients.id).limit(bindparam("limit")))
    return stmt.where(recipients.message_id == bindparam("queue_id")) if one_message else stmt


# The accept and delivery statements run on SQLite's driver directly (gateway.storage.prepared).
_INSERT_MESSAGES = Prepared(insert(_MESSAGES))
_INSERT_RECIPIENT = Prepared(insert(_RECIPIENTS).returning(_RECIPIENTS.c.id))
_RECIPIENT_STATE = Prepared(select(_RECIPIENTS.c.state).where(_RECIPIENTS.c.id == bindparam("recipient")))
_DELIVERED = Prepared(update(_RECIPIENTS).where(_RECIPIENTS.c.id == bindparam("recipient"))
              .values(state=RecipientState.DELIVERED.value, attempts=_RECIPIENTS.c.attempts + 1,
                      updated_at=bindparam("now"), delivered_at=bindparam("now"), last_error=None))
_FINISH_IF_NONE_OPEN = Prepared(update(_MESSAGES).where(
    _MESSAGES.c.id == bindparam("queue_id"), _MESSAGES.c.state != MessageState.DONE.value,
    ~select(_RECIPIENTS.c.id).where(_RECIPIENTS.c.message_id == bindparam("queue_id"),
                                    or_(*(_RECIPIENTS.c.state == state for state in OPEN_STATES))).exists())
    .values(state=MessageState.DONE.value, done_at=bindparam("now"), content=None))   # as its spool file goes
_LOCAL_WORK = Prepared(_local_work_statement(one_message=False))
_LOCAL_WORK_OF = Prepared(_local_work_statement(one_message=True))    # every delivered message reads it
# PostgreSQL only (see claim_local_work): the recipient rows locked, those another node holds skipped.
_CLAIM_LOCAL_WORK_OF = _local_work_statement(one_message=True).with_for_update(of=QueuedRecipient.__table__,
                                                                               skip_locked=True)

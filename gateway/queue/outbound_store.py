"""The outbound queue's queries over the pipeline's queue tables and our own (revision 0004).

The pipeline owns ``queue_messages``/``queue_recipients``; the outbound worker
reads remote recipients there, claims them with a short lease (so two workers,
or a worker and ``gateway queue retry``, never deliver the same recipient at
once), and settles each attempt in one transaction: the recipient's new state,
its attempt row, and the DSN rows that report on it. Exactly one report per
outcome follows from that single commit.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.queue.generated import PreparedMail
from gateway.queue.outbound_tables import OutboundAttempt, OutboundMessage
from gateway.queue.tables import (
    MessageState,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    RouteKind,
)
from gateway.storage.db import Database
from gateway.storage.models import utcnow

OPEN_STATES = (RecipientState.PENDING.value, RecipientState.DEFERRED.value)


@dataclass(frozen=True)
class RecipientWork:
    id: int
    address: str
    notify: str | None
    orcpt: str | None
    attempts: int


@dataclass(frozen=True)
class MessageWork:
    id: str
    sender: str
    envid: str | None
    ret: str | None
    body_type: str
    smtputf8: bool
    size: int
    trace_headers: str
    received_at: dt.datetime
    message_id_header: str | None

    @classmethod
    def of(cls, row: QueuedMessage) -> "MessageWork":
        """What the worker and the DSN need of a queued message's row."""
        return cls(row.id, row.sender, row.envid, row.ret, row.body_type, row.smtputf8, row.size,
                   row.trace_headers, row.received_at, row.message_id_header)


@dataclass
class DomainBatch:
    """The open recipients of one message at one domain: one SMTP transaction."""

    message: MessageWork
    domain: str
    recipients: list[RecipientWork] = field(default_factory=list)


@dataclass(frozen=True)
class AttemptRecord:
    """What one attempt did for one recipient, as stored and shown by ``gateway queue show``."""

    recipient_id: int
    outcome: RecipientState                # delivered | deferred | failed
    reply: str
    reply_code: int | None = None
    enhanced_code: str | None = None
    mx_host: str | None = None
    ip: str | None = None
    tls_version: str | None = None
    next_attempt_at: dt.datetime | None = None
    attempted_at: dt.datetime = field(default_factory=utcnow)


def _due(now: dt.datetime) -> Any:
    return or_(QueuedRecipient.next_attempt_at.is_(None), QueuedRecipient.next_attempt_at <= now)


def _not_held() -> Any:
    held = select(OutboundMessage.message_id).where(OutboundMessage.held_at.is_not(None))
    return QueuedRecipient.message_id.not_in(held)


class OutboundStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ----------------------------------------------------------------- the worker

    async def claim_due(self, *, lease: dt.timedelta, limit: int = 200) -> list[DomainBatch]:
        """Open remote recipients that are due and not held, grouped by (message, domain), claimed
        for ``lease`` (their next_attempt_at moves to the lease's end until settled)."""
        now = utcnow()
        async with self.db.session() as s:
            rows = (await s.execute(
                select(QueuedRecipient, QueuedMessage)
                .join(QueuedMessage, QueuedMessage.id == QueuedRecipient.message_id)
                .where(QueuedRecipient.route == RouteKind.REMOTE.value, QueuedRecipient.state.in_(OPEN_STATES),
                       QueuedMessage.state == MessageState.QUEUED.value, _due(now), _not_held())
                .order_by(QueuedRecipient.message_id, QueuedRecipient.id).limit(limit)
                # Several nodes: rows another node is claiming now are skipped, not waited for (the claim
                # below re-checks each row under its lock, so a recipient is never claimed twice).
                .with_for_update(of=QueuedRecipient, skip_locked=True))).all()
            claimed = [(r, m) for r, m in rows if await self._claim(s, r.id, now, now + lease)]
        batches: dict[tuple[str, str], DomainBatch] = {}
        for recipient, message in claimed:
            key = (message.id, recipient.domain.lower())
            batch = batches.setdefault(key, DomainBatch(MessageWork.of(message), recipient.domain.lower()))
            batch.recipients.append(RecipientWork(recipient.id, recipient.address, recipient.notify,
                                                  recipient.orcpt, recipient.attempts))
        return list(batches.values())

    @staticmethod
    async def _claim(s: AsyncSession, recipient_id: int, now: dt.datetime, until: dt.datetime) -> bool:
        result = await s.execute(update(QueuedRecipient).where(QueuedRecipient.id == recipient_id, _due(now))
                                 .values(next_attempt_at=until))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def settle(self, records: Sequence[AttemptRecord], reports: Sequence[PreparedMail] = (),
                     delay_reported: str | None = None) -> None:
        """One transaction: recipient states, attempt rows, DSN queue rows, the delay-report mark."""
        async with self.db.session() as s:
            for record in records:
                await self._apply(s, record)
            for report in reports:
                report.add_to(s)
            if delay_reported is not None:
                await self._outbound_row(s, delay_reported)
                await s.execute(update(OutboundMessage).where(OutboundMessage.message_id == delay_reported)
                                .values(delay_reported_at=utcnow()))

    @staticmethod
    async def _apply(s: AsyncSession, record: AttemptRecord) -> None:
        values: dict[str, Any] = {"state": record.outcome.value, "attempts": QueuedRecipient.attempts + 1,
                                  "updated_at": utcnow(), "next_attempt_at": record.next_attempt_at}
        if record.outcome is RecipientState.DELIVERED:
            values.update(delivered_at=record.attempted_at, last_error=None)
        else:
            values["last_error"] = record.reply[:2000]
        await s.execute(update(QueuedRecipient).where(QueuedRecipient.id == record.recipient_id).values(**values))
        s.add(OutboundAttempt(recipient_id=record.recipient_id, attempted_at=record.attempted_at,
                              outcome=record.outcome.value, mx_host=record.mx_host, ip=record.ip,
                              reply_code=record.reply_code, enhanced_code=record.enhanced_code,
                              reply=record.reply[:4000], tls_version=record.tls_version,
                              next_attempt_at=record.next_attempt_at))

    async def add_report(self, report: PreparedMail) -> None:
        async with self.db.session() as s:
            report.add_to(s)

    @staticmethod
    async def _outbound_row(s: AsyncSession, message_id: str) -> OutboundMessage:
        row = await s.get(OutboundMessage, message_id)
        if row is not None:
            return row
        try:
            async with s.begin_nested():                 # two domains of one message may get here at once
                row = OutboundMessage(message_id=message_id)
                s.add(row)
            return row
        except IntegrityError:
            existing = await s.get(OutboundMessage, message_id, populate_existing=True)
            assert existing is not None
            return existing

    async def delay_reported(self, message_id: str) -> bool:
        async with self.db.session() as s:
            row = await s.get(OutboundMessage, message_id)
            return row is not None and row.delay_reported_at is not None

    async def dkim_signature(self, message_id: str) -> str | None:
        async with self.db.session() as s:
            row = await s.get(OutboundMessage, message_id)
            return row.dkim_signature if row is not None else None

    async def save_dkim_signature(self, message_id: str, header: str) -> None:
        """RFC 6376 5: sign once; every later attempt sends the same signature."""
        async with self.db.session() as s:
            row = await self._outbound_row(s, message_id)
            row.dkim_signature = header

    # ----------------------------------------------------------------- the administrator (gateway queue)

    async def list_messages(self, *, state: str | None = None, limit: int = 1000,
                            finished_within: dt.timedelta = dt.timedelta(0)) -> list[dict[str, Any]]:
        """Queued messages, and those finished (every recipient delivered or failed, its DSN sent) less
        than ``finished_within`` ago; each recipient read as ``show`` reads it (``recipient_view``)."""
        now = utcnow()
        listed = or_(QueuedMessage.state == MessageState.QUEUED.value,
                     and_(QueuedMessage.state == MessageState.DONE.value, QueuedMessage.done_at >= now - finished_within))
        async with self.db.session() as s:
            messages = (await s.scalars(select(QueuedMessage).where(listed)
                                        .order_by(QueuedMessage.id).limit(limit))).all()
            recipients = await self._recipients_by_message(s, [m.id for m in messages])
            attempts = await self._attempts(s, [r.id for rows in recipients.values() for r in rows])
            holds = await self._holds(s, [m.id for m in messages])
        rows = [self._summary(m, recipients.get(m.id, []), attempts, holds.get(m.id), now) for m in messages]
        if state == "held":
            return [row for row in rows if row["held"]]
        if state:
            return [row for row in rows if state in row["states"]]
        return rows

    @staticmethod
    async def _recipients_by_message(s: AsyncSession, ids: Sequence[str]) -> dict[str, list[QueuedRecipient]]:
        grouped: dict[str, list[QueuedRecipient]] = defaultdict(list)
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            for row in (await s.scalars(select(QueuedRecipient).where(QueuedRecipient.message_id.in_(chunk))
                                        .order_by(QueuedRecipient.id))).all():
                grouped[row.message_id].append(row)
        return grouped

    @staticmethod
    async def _holds(s: AsyncSession, ids: Sequence[str]) -> dict[str, dt.datetime]:
        found: dict[str, dt.datetime] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            for row in (await s.scalars(select(OutboundMessage).where(OutboundMessage.message_id.in_(chunk),
                                                                      OutboundMessage.held_at.is_not(None)))).all():
                assert row.held_at is not None
                found[row.message_id] = row.held_at
        return found

    @staticmethod
    def _summary(message: QueuedMessage, recipients: Sequence[QueuedRecipient],
                 attempts: dict[int, list[OutboundAttempt]], held_at: dt.datetime | None,
                 now: dt.datetime) -> dict[str, Any]:
        states: dict[str, int] = defaultdict(int)
        upcoming: list[dt.datetime] = []
        for recipient in recipients:
            view = recipient_view(recipient, attempts.get(recipient.id, []), now)
            states[view.state] += 1
            if view.next_attempt_at is not None:
                upcoming.append(view.next_attempt_at)
        return {
            "id": message.id, "state": message.state, "sender": message.sender or "<>",
            "received_at": message.received_at, "done_at": message.done_at, "size": message.size,
            "recipients": len(recipients), "states": dict(states), "held": held_at is not None,
            "next_attempt_at": min(upcoming) if upcoming else None,
        }

    async def show(self, message_id: str) -> dict[str, Any] | None:
        now = utcnow()
        async with self.db.session() as s:
            message = await s.get(QueuedMessage, message_id)
            if message is None:
                return None
            recipients = (await s.scalars(select(QueuedRecipient).where(QueuedRecipient.message_id == message_id)
                                          .order_by(QueuedRecipient.id))).all()
            attempts = await self._attempts(s, [r.id for r in recipients])
            outbound = await s.get(OutboundMessage, message_id)
        return {
            "id": message.id, "state": message.state, "door": message.door, "sender": message.sender or "<>",
            "envid": message.envid, "ret": message.ret, "size": message.size, "received_at": message.received_at,
            "done_at": message.done_at, "message_id": message.message_id_header,
            "held": bool(outbound and outbound.held_at),
            "delay_reported_at": outbound.delay_reported_at if outbound else None,
            "dkim_signed": bool(outbound and outbound.dkim_signature),
            "recipients": [_describe_recipient(r, attempts.get(r.id, []), now) for r in recipients],
        }

    @staticmethod
    async def _attempts(s: AsyncSession, recipient_ids: Sequence[int]) -> dict[int, list[OutboundAttempt]]:
        grouped: dict[int, list[OutboundAttempt]] = defaultdict(list)
        for start in range(0, len(recipient_ids), 500):
            chunk = list(recipient_ids[start:start + 500])
            for row in (await s.scalars(select(OutboundAttempt).where(OutboundAttempt.recipient_id.in_(chunk))
                                        .order_by(OutboundAttempt.id))).all():
                grouped[row.recipient_id].append(row)
        return grouped

    async def retry(self, message_ids: Iterable[str] | None) -> int:
        """Open recipients become due now (``None``: every queued message). Returns how many."""
        conditions = [QueuedRecipient.state.in_(OPEN_STATES)]
        if message_ids is not None:
            conditions.append(QueuedRecipient.message_id.in_(list(message_ids)))
        async with self.db.session() as s:
            result = await s.execute(update(QueuedRecipient).where(and_(*conditions)).values(next_attempt_at=utcnow()))
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def set_held(self, message_id: str, held: bool) -> bool:
        """Hold (the worker skips the message) or release it; False when no such queued message."""
        async with self.db.session() as s:
            message = await s.get(QueuedMessage, message_id)
            if message is None or message.state != MessageState.QUEUED.value:
                return False
            row = await self._outbound_row(s, message_id)
            row.held_at = utcnow() if held else None
            if not held:
                await s.execute(update(QueuedRecipient).where(QueuedRecipient.message_id == message_id,
                                                              QueuedRecipient.state.in_(OPEN_STATES))
                                .values(next_attempt_at=utcnow()))
            return True

    async def open_recipients(self, message_id: str) -> list[QueuedRecipient]:
        async with self.db.session() as s:
            return list((await s.scalars(select(QueuedRecipient).where(
                QueuedRecipient.message_id == message_id, QueuedRecipient.state.in_(OPEN_STATES))
                .order_by(QueuedRecipient.id))).all())

    async def delete(self, message_id: str, report: PreparedMail | None = None) -> bool:
        """Remove a message and its rows (and queue ``report``, its DSN, in the same transaction)."""
        async with self.db.session() as s:
            if await s.get(QueuedMessage, message_id) is None:
                return False
            if report is not None:
                report.add_to(s)
            await s.execute(delete(QueuedMessage).where(QueuedMessage.id == message_id))
            return True

    async def message(self, message_id: str) -> QueuedMessage | None:
        async with self.db.session() as s:
            return await s.get(QueuedMessage, message_id)

    async def count_open_remote(self) -> int:
        async with self.db.session() as s:
            return int(await s.scalar(select(func.count()).select_from(QueuedRecipient).where(
                QueuedRecipient.route == RouteKind.REMOTE.value, QueuedRecipient.state.in_(OPEN_STATES))) or 0)


@dataclass(frozen=True)
class RecipientView:
    """How ``gateway queue list`` and ``show`` both present a recipient."""

    state: str  # pending | deferred | in-flight | delivered | failed
    next_attempt_at: dt.datetime | None  # when it is tried next; None when finished or being tried now
    lease_until: dt.datetime | None = None  # in-flight: tried again then if that delivery never settles


def recipient_view(recipient: QueuedRecipient, attempts: Sequence[OutboundAttempt], now: dt.datetime) -> RecipientView:
    """One reading of a recipient's row for every view.

    A worker claiming a remote recipient moves its ``next_attempt_at`` to the end of
    its lease (``claim_due``) until the attempt settles, when it becomes the attempt's
    own ``next_attempt_at``. So an open remote recipient whose ``next_attempt_at`` is in
    the future and differs from what its last attempt scheduled is being delivered
    now: shown ``in-flight``, not as "pending, next attempt in 30 minutes".
    """
    if recipient.state not in OPEN_STATES:
        return RecipientView(recipient.state, None)
    scheduled = attempts[-1].next_attempt_at if attempts else None
    next_at = recipient.next_attempt_at
    if recipient.route == RouteKind.REMOTE.value and next_at is not None and next_at > now and next_at != scheduled:
        return RecipientView("in-flight", None, next_at)
    return RecipientView(recipient.state, next_at)


def _describe_recipient(recipient: QueuedRecipient, attempts: Sequence[OutboundAttempt], now: dt.datetime) -> dict[str, Any]:
    view = recipient_view(recipient, attempts, now)
    return {
        "address": recipient.address, "route": recipient.route, "state": view.state,
        "attempts": recipient.attempts, "next_attempt_at": view.next_attempt_at, "lease_until": view.lease_until,
        "last_error": recipient.last_error, "notify": recipient.notify, "orcpt": recipient.orcpt,
        "delivered_at": recipient.delivered_at,
        "history": [{
            "at": a.attempted_at, "outcome": a.outcome, "mx": a.mx_host, "ip": a.ip, "code": a.reply_code,
            "enhanced": a.enhanced_code, "reply": a.reply, "tls": a.tls_version, "next_attempt_at": a.next_attempt_at,
        } for a in attempts],
    }

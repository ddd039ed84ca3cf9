"""Conversations between a professional and a patient (Mon espace santé rule, mssante.md 2.1).

A professional's message to a patient mailbox opens (or refreshes) the
conversation; a message from that professional carrying ``X-MSS-MES: FIN``
(Ref#2 ECO.2.2.8) or the subject exactly ``[FIN]`` closes it. A patient may
write to a professional only while a conversation with them is open.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gateway.pipeline.tables import Conversation
from gateway.pipeline.parse import MessageFacts
from gateway.storage.db import Database
from gateway.storage.models import utcnow

FIN_SUBJECT = "[FIN]"


def ends_conversation(facts: MessageFacts) -> bool:
    """True when the message closes the conversation (either mechanism, mssante.md 2.1)."""
    marker = (facts.get("X-MSS-MES") or "").strip().upper()
    return marker == "FIN" or facts.subject == FIN_SUBJECT


@dataclass(frozen=True)
class ConversationChange:
    professional_address: str
    patient_mailbox_id: int
    ending: bool

    def apply_in(self, connection: Connection) -> None:
        """Committed with the queue rows of the message that made it (gateway.queue.store.CompanionChange),
        synchronously in the acceptance transaction's database thread."""
        ConversationBook.apply(connection, self)


class ConversationBook:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def is_open(self, professional_address: str, patient_mailbox_id: int) -> bool:
        async with self.db.session() as s:
            row = await s.scalar(select(Conversation).where(
                Conversation.professional_address == professional_address,
                Conversation.patient_mailbox_id == patient_mailbox_id))
            return row is not None and row.closed_at is None

    @staticmethod
    def apply(connection: Connection, change: ConversationChange) -> None:
        """Open, refresh or close, inside the caller's transaction (the queue commit)."""
        now = utcnow()
        pair = {"professional": change.professional_address, "patient": change.patient_mailbox_id}
        row = connection.execute(_FIND, pair).first()
        if row is None:
            try:
                with connection.begin_nested():   # a concurrent first message may insert the same pair
                    connection.execute(_OPEN, {"professional_address": change.professional_address,
                                               "patient_mailbox_id": change.patient_mailbox_id, "opened_at": now,
                                               "last_message_at": now, "closed_at": now if change.ending else None})
                return
            except IntegrityError:
                row = connection.execute(_FIND, pair).first()
                assert row is not None
        row_id, closed_at = row
        values = {"last_message_at": now, "closed_at": now if change.ending else None}
        if closed_at is not None and not change.ending:
            values["opened_at"] = now
        connection.execute(update(_CONVERSATIONS).where(_CONVERSATIONS.c.id == row_id).values(**values))


_CONVERSATIONS = cast(Table, Conversation.__table__)
_FIND = select(_CONVERSATIONS.c.id, _CONVERSATIONS.c.closed_at).where(
    _CONVERSATIONS.c.professional_address == bindparam("professional"),
    _CONVERSATIONS.c.patient_mailbox_id == bindparam("patient"))
_OPEN = insert(_CONVERSATIONS)

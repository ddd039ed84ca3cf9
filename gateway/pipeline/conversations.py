"""Conversations between a professional and a patient (Mon espace santé rule, mssante.md 2.1).

A professional's message to a patient mailbox opens (or refreshes) the
conversation; a message from that professional carrying ``X-MSS-MES: FIN``
(Ref#2 ECO.2.2.8) or the subject exactly ``[FIN]`` closes it. A patient may
write to a professional only while a conversation with them is open.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

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

    async def apply(self, session: AsyncSession) -> None:
        """Committed with the queue rows of the message that made it (gateway.queue.store.CompanionChange)."""
        await ConversationBook.apply(session, self)


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
    async def apply(s: AsyncSession, change: ConversationChange) -> None:
        """Open, refresh or close, inside the caller's transaction (the queue commit)."""
        now = utcnow()
        row = await s.scalar(select(Conversation).where(
            Conversation.professional_address == change.professional_address,
            Conversation.patient_mailbox_id == change.patient_mailbox_id))
        if row is None:
            try:
                async with s.begin_nested():   # a concurrent first message may insert the same pair
                    row = Conversation(professional_address=change.professional_address,
                                       patient_mailbox_id=change.patient_mailbox_id, opened_at=now)
                    s.add(row)
            except IntegrityError:
                row = await s.scalar(select(Conversation).where(
                    Conversation.professional_address == change.professional_address,
                    Conversation.patient_mailbox_id == change.patient_mailbox_id))
                assert row is not None
        if row.closed_at is not None and not change.ending:
            row.opened_at = now
        row.last_message_at = now
        row.closed_at = now if change.ending else None

"""Tables of the pipeline: conversations.

A conversation records which professional wrote to which patient, so the
patient may answer (MSSanté / Mon espace santé rule, gateway.pipeline.conversations).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime, utcnow


class Conversation(Base):
    """A professional wrote to a patient: the patient may answer until the professional ends it."""

    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("professional_address", "patient_mailbox_id", name="pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    professional_address: Mapped[str] = mapped_column(String(320))
    patient_mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    opened_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    last_message_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

"""Tables of the patient's access notices and notification preferences (revision 0019).

``patient_notice_state`` has one row per patient whose record was read: the
reads not yet told (``pending_reads``, ``pending_emergencies``, since when) and
when the last notice left. A read bumps the counters and ``generation`` in one
statement; the notice task sends a due notice and clears the counters in one
transaction that also queues the mail, and only if ``generation`` is still the
one it read (a read arriving in between waits for the next notice). So a notice
is queued exactly once, survives a restart, and no read is lost.

``patient_notification_preferences`` holds what the patient chose in the
webmail: where notices go (their own mailbox when empty) and how often.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import BigInteger, ForeignKey, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime, utcnow


class NoticeFrequency(str, enum.Enum):
    """How often a patient hears of ordinary reads (emergency accesses: always at once)."""

    DEFAULT = "default"      # the gateway's notices.access_period_hours (one a day unless configured)
    EACH = "each"            # at each read (reads a few seconds apart still share one notice)
    WEEKLY = "weekly"        # at most one a week


class PatientNoticeState(Base):
    __tablename__ = "patient_notice_state"

    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True)
    pending_reads: Mapped[int] = mapped_column(Integer, default=0)
    pending_emergencies: Mapped[int] = mapped_column(Integer, default=0)
    pending_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class PatientNotificationPreferences(Base):
    __tablename__ = "patient_notification_preferences"

    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True)
    address: Mapped[str | None] = mapped_column(String(320))  # None: the patient's own hosted mailbox
    frequency: Mapped[str] = mapped_column(String(16), default=NoticeFrequency.DEFAULT.value)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow,
                                                    server_default=func.now())

"""Tables of the outbound queue (revision 0004), beside the pipeline's queue rows.

- ``outbound_messages``: per queued message, what the outbound worker adds:
  an administrator's hold, the DKIM-Signature computed once (RFC 6376 5), and
  when the one delay DSN was sent (RFC 3464 2.3.3 ``Action: delayed``).
- ``outbound_attempts``: every delivery attempt of every remote recipient
  (time, MX host, IP, the SMTP reply, TLS version, next try), so
  ``gateway queue show ID`` explains why a message waits (stalwart#1066).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime, utcnow


class OutboundMessage(Base):
    __tablename__ = "outbound_messages"

    message_id: Mapped[str] = mapped_column(ForeignKey("queue_messages.id", ondelete="CASCADE"), primary_key=True)
    held_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    dkim_signature: Mapped[str | None] = mapped_column(Text)         # the full header field, CRLF-terminated
    delay_reported_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class OutboundAttempt(Base):
    __tablename__ = "outbound_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recipient_id: Mapped[int] = mapped_column(ForeignKey("queue_recipients.id", ondelete="CASCADE"), index=True)
    attempted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    outcome: Mapped[str] = mapped_column(String(16))                  # delivered | deferred | failed
    mx_host: Mapped[str | None] = mapped_column(String(255))
    ip: Mapped[str | None] = mapped_column(String(64))
    reply_code: Mapped[int | None] = mapped_column(Integer)           # RFC 5321 4.2, None when no reply was read
    enhanced_code: Mapped[str | None] = mapped_column(String(16))     # RFC 3463
    reply: Mapped[str] = mapped_column(Text)                          # the peer's text, or our own diagnosis
    tls_version: Mapped[str | None] = mapped_column(String(16))
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

"""Tables of the queue: one message row, one row per recipient.

A queue row exists only for a message whose spool file is durable; its
recipient rows move ``pending`` -> ``delivered`` | ``failed``, or ``deferred``
with a next attempt time.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from gateway.storage.models import Base, UTCDateTime, utcnow


class MessageState(str, enum.Enum):
    QUEUED = "queued"       # some recipient still pending or deferred
    DONE = "done"           # every recipient delivered or failed; spool file removed (or its row's content)


class RecipientState(str, enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


class RouteKind(str, enum.Enum):
    LOCAL = "local"
    REMOTE = "remote"


class QueuedMessage(Base):
    __tablename__ = "queue_messages"
    __table_args__ = (Index("ix_queue_messages_state", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)      # the queue id, also the spool file name
    door: Mapped[str] = mapped_column(String(16))                      # submission | submissions | relay | webmail
    sender: Mapped[str] = mapped_column(String(320))                   # "" for the null reverse-path
    envid: Mapped[str | None] = mapped_column(String(200))             # RFC 3461 4.4 (decoded)
    ret: Mapped[str | None] = mapped_column(String(4))                 # RFC 3461 4.3: FULL | HDRS
    body_type: Mapped[str] = mapped_column(String(8), default="7BIT")  # RFC 6152
    smtputf8: Mapped[bool] = mapped_column(Boolean, default=False)     # RFC 6531
    size: Mapped[int] = mapped_column(BigInteger)
    message_id_header: Mapped[str | None] = mapped_column(Text)
    trace_headers: Mapped[str] = mapped_column(Text)                   # Return-Path, Received, ... prepended on delivery
    authenticated_as: Mapped[str | None] = mapped_column(String(320))
    client_address: Mapped[str] = mapped_column(String(64))
    client_helo: Mapped[str | None] = mapped_column(String(255))
    tls: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), default=MessageState.QUEUED.value)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # A small message's sealed spool octets, committed with these rows instead of a spool file of its own
    # (gateway.queue.spool: "in its row"); NULL when the message is in a file, and once it is done.
    # Deferred: only the spool reads it (Spool.opener), never a listing.
    content: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)

    recipients: Mapped[list["QueuedRecipient"]] = relationship(back_populates="message", cascade="all, delete-orphan")


class QueuedRecipient(Base):
    __tablename__ = "queue_recipients"
    __table_args__ = (
        UniqueConstraint("message_id", "address", name="message_address"),
        Index("ix_queue_recipients_work", "route", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("queue_messages.id", ondelete="CASCADE"), index=True)
    address: Mapped[str] = mapped_column(String(320))
    orcpt: Mapped[str | None] = mapped_column(String(500))             # RFC 3461 4.2 "addr-type;address"
    notify: Mapped[str | None] = mapped_column(String(32))             # RFC 3461 4.1, comma list
    route: Mapped[str] = mapped_column(String(8))                      # local | remote
    mailbox_id: Mapped[int | None] = mapped_column(ForeignKey("mailboxes.id", ondelete="SET NULL"))
    domain: Mapped[str] = mapped_column(String(253))
    state: Mapped[str] = mapped_column(String(16), default=RecipientState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now())

    message: Mapped[QueuedMessage] = relationship(back_populates="recipients")

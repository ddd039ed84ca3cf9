"""Tables of the patient webmail (revision 0010_webmail): sessions, TOTP second factor, recovery codes.

A session row is keyed by the SHA-256 of the random token held in the cookie,
so a copy of the database does not give anyone a working cookie. The TOTP
secret is sealed under the mailbox owner's data key (FieldSealer); recovery
codes are kept as SHA-256 digests only (each is 50 random bits, shown once).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime, utcnow


class WebmailSession(Base):
    """One browser session of a patient; ``stage`` says how far the sign-in went."""

    __tablename__ = "webmail_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(16))          # second-factor, enrol, signed-in
    method: Mapped[str] = mapped_column(String(32))         # password, password+totp, password+recovery, oidc
    source_ip: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class WebmailTotp(Base):
    """The mailbox's TOTP secret (RFC 6238); ``confirmed_at`` is NULL while enrolment is pending."""

    __tablename__ = "webmail_totp"

    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True)
    secret_sealed: Mapped[str] = mapped_column(Text)
    confirmed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_step: Mapped[int] = mapped_column(Integer, default=0)  # RFC 6238 5.2: a code is accepted once


class WebmailRecoveryCode(Base):
    """A single-use recovery code, stored as its SHA-256 digest."""

    __tablename__ = "webmail_recovery_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

"""Audit log tables (revision 0005).

``audit_entries`` is append-only: the application only ever INSERTs into it.
``audit_chain_head`` has exactly one row (id 1) naming the newest entry; every
append updates it first in its own transaction, which serialises appenders on
both databases (PostgreSQL row lock, SQLite writer lock) so the chain never
forks, and lets ``verify`` notice entries removed from, or added after, the tail.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, CheckConstraint, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime

HASH_HEX_LENGTH = 64  # SHA-256 / HMAC-SHA-256 in hex
GENESIS_HASH = "0" * HASH_HEX_LENGTH


class AuditEntryRow(Base):
    """One entry of the hash-chained log. Columns mirror the hashed canonical JSON."""

    __tablename__ = "audit_entries"
    __table_args__ = (
        Index("ix_audit_entries_patient_seq", "patient_ins", "seq"),
        Index("ix_audit_entries_event_seq", "event", "seq"),
        Index("ix_audit_entries_occurred_at", "occurred_at"),
        CheckConstraint("outcome IN ('success', 'refused', 'error')", name="outcome_known"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    occurred_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    event: Mapped[int] = mapped_column(Integer)
    actor_kind: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(128))
    actor_name: Mapped[str] = mapped_column(String(256))
    actor_role: Mapped[str | None] = mapped_column(String(64))
    patient_ins: Mapped[str | None] = mapped_column(String(15))
    subject_kind: Mapped[str | None] = mapped_column(String(32))
    subject_id: Mapped[str | None] = mapped_column(String(512))
    outcome: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text)
    door: Mapped[str] = mapped_column(String(16))
    source_ip: Mapped[str | None] = mapped_column(String(45))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON, stored byte for byte as hashed
    prev_hash: Mapped[str] = mapped_column(String(HASH_HEX_LENGTH))
    entry_hash: Mapped[str] = mapped_column(String(HASH_HEX_LENGTH), unique=True)
    seal: Mapped[str | None] = mapped_column(String(HASH_HEX_LENGTH))  # HMAC with the audit key, when configured


class AuditChainHead(Base):
    """The newest entry of the chain: one row, id 1, locked by every append."""

    __tablename__ = "audit_chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    entry_hash: Mapped[str] = mapped_column(String(HASH_HEX_LENGTH))
    seal: Mapped[str | None] = mapped_column(String(HASH_HEX_LENGTH))

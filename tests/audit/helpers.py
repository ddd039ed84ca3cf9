"""Shared by the audit tests: sample entries and raw-SQL tampering, as an attacker with database access would do it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, text

from gateway.audit import Actor, AuditEvent, AuditLog, Door, Outcome, Source, Subject
from gateway.audit.chain import GENESIS_HASH, AuditEntry, chain_hash
from gateway.audit.log import _entry_from_row  # the stored form, exactly as verification reads it
from gateway.audit.tables import AuditEntryRow
from gateway.directory.identifiers import add_nir_key
from gateway.storage.db import Database

PATIENT_A = add_nir_key("1850775123456")
PATIENT_B = add_nir_key("2920213098765")
DOCTOR = Actor.professional("810001234567", "Dr Marie Durand", "10")


async def append_sample(log: AuditLog, index: int, *, patient: str = PATIENT_A) -> Any:
    """One plausible entry; the event varies with ``index`` so exports hold a mix."""
    event = (AuditEvent.DOCUMENT_READ, AuditEvent.DOCUMENT_CONTENT_READ, AuditEvent.RECORD_SEARCHED)[index % 3]
    return await log.append(
        event, actor=DOCTOR, patient=patient, subject=Subject.document(f"1.2.250.1.999.{index}"),
        source=Source(Door.FHIR, "192.0.2.10"), details={"index": index, "type": "11488-4"},
    )


async def fill(log: AuditLog, count: int, *, patients: tuple[str, ...] = (PATIENT_A,)) -> None:
    for index in range(count):
        await append_sample(log, index, patient=patients[index % len(patients)])


async def unlock_entries(db: Database) -> None:
    """Remove the append-only triggers, as a database owner can."""
    async with db.engine.begin() as conn:
        if db.is_sqlite:
            await conn.execute(text("DROP TRIGGER IF EXISTS audit_entries_no_update"))
            await conn.execute(text("DROP TRIGGER IF EXISTS audit_entries_no_delete"))
        else:
            await conn.execute(text("ALTER TABLE audit_entries DISABLE TRIGGER USER"))


async def raw(db: Database, *statements: str, **params: Any) -> None:
    """Run tampering statements in one transaction, triggers removed first."""
    await unlock_entries(db)
    async with db.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement), params)


async def swap_seq(db: Database, first: int, second: int) -> None:
    """Exchange the positions of two entries (through a free number: seq is the primary key)."""
    await raw(db,
              "UPDATE audit_entries SET seq = -1 WHERE seq = :first",
              "UPDATE audit_entries SET seq = :first WHERE seq = :second",
              "UPDATE audit_entries SET seq = :second WHERE seq = -1",
              first=first, second=second)


async def refused_entry(log: AuditLog) -> Any:
    return await log.append(AuditEvent.ACCESS_REFUSED, actor=DOCTOR, patient=PATIENT_A,
                            source=Source(Door.FHIR), outcome=Outcome.refused("professional blocked by the patient"))


async def insert_forged_after(database: Database, after: int) -> None:
    """Renumber every entry after ``after`` and slip a well-hashed forged entry in at ``after + 1``."""
    async with database.engine.connect() as conn:
        prev_hash = (await conn.execute(text("SELECT entry_hash FROM audit_entries WHERE seq = :s"), {"s": after})).scalar_one()
    forged = _forged_row(after + 1, prev_hash, sqlite=database.is_sqlite)
    await raw(database,
              "UPDATE audit_entries SET seq = -seq WHERE seq > :after",
              "UPDATE audit_entries SET seq = -seq + 1 WHERE seq < 0",
              _INSERT, after=after, **forged)


async def rewrite_and_rehash(database: Database, *, from_seq: int) -> None:
    """Change one entry and recompute every hash after it with SHA-256, as someone without the key would."""
    await raw(database, "UPDATE audit_entries SET actor_name = 'Rewritten' WHERE seq = :seq", seq=from_seq)
    async with database.session() as session:
        rows = (await session.scalars(select(AuditEntryRow).order_by(AuditEntryRow.seq))).all()
    prev_hash = rows[from_seq - 2].entry_hash if from_seq > 1 else GENESIS_HASH
    statements, new_hash = [], prev_hash
    for row in rows[from_seq - 1:]:
        entry = _entry_from_row(row)
        new_hash = chain_hash(prev_hash, entry.body())
        statements.append((row.seq, prev_hash, new_hash))
        prev_hash = new_hash
    for seq, link, digest in statements:
        await raw(database, "UPDATE audit_entries SET prev_hash = :link, entry_hash = :digest WHERE seq = :seq",
                  seq=seq, link=link, digest=digest)
    await raw(database, "UPDATE audit_chain_head SET entry_hash = :digest", digest=new_hash)


_INSERT = (
    "INSERT INTO audit_entries (seq, occurred_at, event, actor_kind, actor_id, actor_name, actor_role, patient_ins,"
    " subject_kind, subject_id, outcome, reason, door, source_ip, details, prev_hash, entry_hash, seal)"
    " VALUES (:seq, :occurred_at, :event, :actor_kind, :actor_id, :actor_name, :actor_role, :patient_ins,"
    " :subject_kind, :subject_id, :outcome, :reason, :door, :source_ip, :details, :prev_hash, :entry_hash, NULL)"
)


def _forged_row(seq: int, prev_hash: str, *, sqlite: bool) -> dict[str, object]:
    """A forged 'record searched' entry whose SHA-256 is right (the algorithm is public)."""
    occurred_at = dt.datetime(2025, 3, 1, 9, 30, tzinfo=dt.timezone.utc)
    entry = AuditEntry(seq, occurred_at, int(AuditEvent.RECORD_SEARCHED), DOCTOR, PATIENT_A, None, Outcome.success(),
                       Source(Door.FHIR), {}, prev_hash, "")
    return {
        # SQLite stores what it is given: write the timestamp the way SQLAlchemy does
        "seq": seq, "occurred_at": occurred_at.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else occurred_at,
        "event": entry.event_code, "actor_kind": DOCTOR.kind,
        "actor_id": DOCTOR.id, "actor_name": DOCTOR.display_name, "actor_role": DOCTOR.role,
        "patient_ins": PATIENT_A, "subject_kind": None, "subject_id": None, "outcome": "success", "reason": None,
        "door": "fhir", "source_ip": None, "details": "{}", "prev_hash": prev_hash,
        "entry_hash": entry.computed_hash(),
    }

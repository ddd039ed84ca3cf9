"""The audit log service: append, verify, export, and the patient's and admins' views.

Appending claims the next number by updating the one-row chain head *first*
(``UPDATE audit_chain_head SET seq = seq + 1 ... RETURNING``), inserts the entry
chained to the head's hash, then stores the new hash in the head, all in one
transaction. The first statement takes PostgreSQL's row lock (what
``SELECT ... FOR UPDATE`` would take) or SQLite's writer lock, so concurrent
appenders, in this process or others, queue up behind it: numbers have no
gaps and the chain never forks. Inside one process an asyncio lock also keeps
tasks from spinning on SQLite's busy handler.

Callers filing a document pass their own ``session`` so that the document and
its audit entry commit together, or not at all.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import ColumnElement, Select, Table, bindparam, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit.chain import (
    GENESIS_HASH,
    Actor,
    ActorKind,
    AuditEntry,
    AuditKey,
    ChainBreak,
    BreakKind,
    ChainHead,
    ChainWalker,
    Door,
    Outcome,
    OutcomeStatus,
    Source,
    Subject,
    VerifyReport,
    audit_key_path,
    canonical_json,
    chain_hash,
    entry_body,
)
from gateway.audit.events import AuditEvent
from gateway.audit.export import ExportFormat, ExportScope, ExportSummary, ExportWriter, check_format
from gateway.audit.tables import AuditChainHead, AuditEntryRow
from gateway.directory.identifiers import validate_nir
from gateway.errors import UserError
from gateway.storage.db import Database
from gateway.storage.prepared import Prepared
from gateway.storage.models import utcnow

HEAD_ID = 1
READ_BATCH = 500
MAX_PAGE = 1000
MAX_DETAILS_BYTES = 16 * 1024
SUBJECT_KIND = re.compile(r"^[a-z][a-z_]{0,31}$")


_HEADS = cast(Table, AuditChainHead.__table__)
# The chain's statements, on SQLite's driver directly inside a synchronous transaction (storage/prepared.py).
_CLAIM_HEAD = Prepared(update(_HEADS).where(_HEADS.c.id == bindparam("head"))
                       .values(seq=_HEADS.c.seq + bindparam("count")).returning(_HEADS.c.seq, _HEADS.c.entry_hash))
_STORE_HEAD = Prepared(update(_HEADS).where(_HEADS.c.id == bindparam("head"))
                       .values(entry_hash=bindparam("entry_hash"), seal=bindparam("seal")))
_INSERT_ENTRIES = Prepared(insert(cast(Table, AuditEntryRow.__table__)))


class AuditChainConflict(UserError):
    """The next number is already taken: rows were written beside the gateway. Nothing can be appended
    until an operator has looked (``gateway audit verify``); failing closed keeps accesses traceable."""


@dataclass(frozen=True)
class _Checked:
    """An entry's fields after validation, ready to hash."""

    event: AuditEvent
    actor: Actor
    patient: str | None
    subject: Subject | None
    outcome: Outcome
    source: Source
    details: dict[str, Any]


class AuditLog:
    """The hash-chained, append-only log of every access to a patient's record and mailboxes."""

    def __init__(self, db: Database, key: AuditKey | None = None) -> None:
        self.db = db
        self.key = key
        self._append_lock = asyncio.Lock()

    @classmethod
    def for_data_dir(cls, db: Database, data_path: Path) -> AuditLog:
        """The log with its seal key from ``<data_dir>/keys/audit-chain.key`` (created on first use)."""
        return cls(db, AuditKey.load_or_create(audit_key_path(data_path)))

    async def append(
        self,
        event: AuditEvent,
        *,
        actor: Actor,
        patient: str | None,
        source: Source,
        subject: Subject | None = None,
        outcome: Outcome | None = None,
        details: dict[str, Any] | None = None,
        session: AsyncSession | None = None,
    ) -> AuditEntry:
        """Add one entry and return it as stored; UserError names a field the caller got wrong."""
        checked = _check_fields(event, actor, patient, subject, outcome or Outcome.success(), source, details or {})
        if session is not None:
            return await self._append_in(session, checked)
        async with self._append_lock:
            async with self.db.session() as own_session:
                return await self._append_in(own_session, checked)

    def batch(self) -> AuditBatch:
        """Entries collected now and appended together by ``AuditBatch.write`` in the caller's transaction:
        one claim of the head for all of them (the filing worker's batches)."""
        return AuditBatch(self)

    async def head(self) -> ChainHead | None:
        """The newest entry's number and hash (None before the first append)."""
        head, _newest = await self._snapshot()
        return head

    async def verify(self, *, from_seq: int | None = None) -> VerifyReport:
        """Walk the chain (from ``from_seq``, trusting the entry before it) up to the head."""
        start = _check_from_seq(from_seq)
        head, newest = await self._snapshot()
        walker = ChainWalker(key=self.key, hash_known=self._hash_known, expected_seq=start)
        if head is None:
            missing = ChainBreak(1, BreakKind.MODIFIED, "the chain head row is missing") if newest else None
            return walker.report(missing, None)
        if start > head.seq + 1:
            raise UserError(f"the log ends at entry {head.seq}", field="from_seq")
        if start > 1:
            anchor = await self._entry_hash_at(start - 1)
            if anchor is None:
                return walker.report(ChainBreak(start - 1, BreakKind.DELETED, f"entry {start - 1} is missing"), head)
            walker.expected_prev = anchor
        async for entry in self._entries(start, head.seq):
            broken = await walker.feed(entry)
            if broken is not None:
                return walker.report(broken, head)
        return walker.report(walker.finish(head, newest_seq=newest), head)

    async def export(self, target: Path | IO[str], *, format: str = "jsonl", patient: str | None = None,
                     since: dt.datetime | None = None) -> ExportSummary:
        """Write entries with their hashes (and seals) so an auditor can re-verify them offline."""
        fmt = check_format(format)
        scope = await self._export_scope(_check_patient(patient, field="patient"), _check_aware(since, "since"))
        if isinstance(target, Path):
            return await self._export_to_file(target, fmt, scope)
        return await self._write_export(target, fmt, scope)

    async def entries_for_patient(self, ins: str, *, limit: int = 50, before_seq: int | None = None) -> list[AuditEntry]:
        """The patient's own access history, newest first, page by page (``before_seq`` of the last one seen)."""
        patient = validate_nir(ins, field="ins")
        return await self.search(patient=patient, limit=limit, before_seq=before_seq)

    async def search(
        self,
        *,
        patient: str | None = None,
        events: Sequence[AuditEvent] = (),
        actor_id: str | None = None,
        subject_id: str | None = None,
        door: str | None = None,
        outcome: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
        before_seq: int | None = None,
    ) -> list[AuditEntry]:
        """Entries matching every given filter, newest first (for administrators)."""
        query = select(AuditEntryRow).order_by(AuditEntryRow.seq.desc()).limit(_check_limit(limit))
        query = _filtered(query, patient=_check_patient(patient, field="patient"), events=events,
                          actor_id=actor_id, subject_id=subject_id, door=door, outcome=outcome,
                          since=_check_aware(since, "since"), until=_check_aware(until, "until"), before_seq=before_seq)
        async with self.db.session() as session:
            rows = (await session.scalars(query)).all()
        return [_entry_from_row(row) for row in rows]

    async def _append_in(self, session: AsyncSession, checked: _Checked) -> AuditEntry:
        [entry] = await self._append_many_in(session, [(utcnow(), checked)])
        return entry

    async def _append_many_in(self, session: AsyncSession, batch: Sequence[tuple[dt.datetime, _Checked]]) -> list[AuditEntry]:
        """``append_many`` in an async session's transaction (the same statements, run by ``run_sync``)."""
        if not batch:
            return []
        return await session.run_sync(lambda sync_session: self.append_many(sync_session.connection(), batch))

    def append_many(self, connection: Connection, batch: Sequence[tuple[dt.datetime, _Checked]]) -> list[AuditEntry]:
        """``batch`` chained one after the other, in ``connection``'s transaction (synchronous: a whole
        transaction run by ``Database.run_in_transaction``): the head claimed once (``len(batch)`` numbers),
        the rows inserted by one executemany, the head's hash and seal stored once. The same chain as one
        append each; the one implementation of the chain, whichever way the transaction runs."""
        if not batch:
            return []
        last_seq, prev_hash = self._claim_next_seq(connection, len(batch))
        entries: list[AuditEntry] = []
        for seq, (occurred_at, checked) in enumerate(batch, start=last_seq - len(batch) + 1):
            body = entry_body(seq, occurred_at, int(checked.event), checked.actor, checked.patient,
                              checked.subject, checked.outcome, checked.source, checked.details)
            entry_hash = chain_hash(prev_hash, body)
            entries.append(AuditEntry(seq, occurred_at, int(checked.event), checked.actor, checked.patient,
                                      checked.subject, checked.outcome, checked.source, checked.details, prev_hash,
                                      entry_hash, self.key.seal_entry(entry_hash) if self.key else None))
            prev_hash = entry_hash
        try:
            _INSERT_ENTRIES.run_many(connection, [_row_values(entry) for entry in entries])
        except IntegrityError:
            numbers = f"entry {last_seq}" if len(entries) == 1 else f"entries {entries[0].seq}-{last_seq}"
            raise AuditChainConflict(f"audit {numbers} (or its hash) already exists: the log was written outside "
                                     "the gateway; run `gateway audit verify`", field="audit") from None
        _STORE_HEAD.run(connection, {"head": HEAD_ID, "entry_hash": prev_hash,
                                     "seal": self._head_seal(last_seq, prev_hash)})
        return entries

    def _claim_next_seq(self, connection: Connection, count: int = 1) -> tuple[int, str]:
        """Take the writer lock by bumping the head by ``count``; returns (the last number claimed, the hash
        of the entry before the first one)."""
        row = _CLAIM_HEAD.run(connection, {"head": HEAD_ID, "count": count}).fetchone()
        if row is None:  # first append ever: create the genesis head (a concurrent creator is harmless)
            connection.execute(self._genesis_head())
            row = _CLAIM_HEAD.run(connection, {"head": HEAD_ID, "count": count}).fetchone()
        return int(row[0]), str(row[1])

    def _genesis_head(self) -> Any:
        values = {"id": HEAD_ID, "seq": 0, "entry_hash": GENESIS_HASH, "seal": self._head_seal(0, GENESIS_HASH)}
        dialect_insert = sqlite_insert if self.db.is_sqlite else postgresql_insert
        return dialect_insert(AuditChainHead).values(**values).on_conflict_do_nothing(index_elements=["id"])

    def _head_seal(self, seq: int, entry_hash: str) -> str | None:
        return self.key.seal_head(seq, entry_hash) if self.key else None

    async def _snapshot(self) -> tuple[ChainHead | None, int | None]:
        """The head row and the highest stored seq, read by one statement (one consistent snapshot)."""
        newest = select(func.max(AuditEntryRow.seq)).scalar_subquery()
        query = select(AuditChainHead.seq, AuditChainHead.entry_hash, AuditChainHead.seal, newest.label("newest"))
        async with self.db.session() as session:
            row = (await session.execute(query.where(AuditChainHead.id == HEAD_ID))).one_or_none()
            if row is None:
                return None, await session.scalar(select(func.max(AuditEntryRow.seq)))
        return ChainHead(int(row.seq), str(row.entry_hash), row.seal), row.newest

    async def _hash_known(self, entry_hash: str) -> bool:
        async with self.db.session() as session:
            found = await session.scalar(select(AuditEntryRow.seq).where(AuditEntryRow.entry_hash == entry_hash).limit(1))
        return found is not None

    async def _entry_hash_at(self, seq: int) -> str | None:
        async with self.db.session() as session:
            return await session.scalar(select(AuditEntryRow.entry_hash).where(AuditEntryRow.seq == seq))

    async def _entries(self, start: int, stop: int, *, patient: str | None = None) -> AsyncIterator[AuditEntry]:
        """Entries ``start..stop`` in order, read in short batches (no long-lived snapshot)."""
        next_seq = start
        while next_seq <= stop:
            query = (select(AuditEntryRow).where(AuditEntryRow.seq >= next_seq, AuditEntryRow.seq <= stop)
                     .order_by(AuditEntryRow.seq).limit(READ_BATCH))
            if patient is not None:
                query = query.where(AuditEntryRow.patient_ins == patient)
            async with self.db.session() as session:
                rows = (await session.scalars(query)).all()
            if not rows:
                return
            for row in rows:
                yield _entry_from_row(row)
            next_seq = rows[-1].seq + 1

    async def _export_scope(self, patient: str | None, since: dt.datetime | None) -> ExportScope:
        head = await self.head()
        head_seq = head.seq if head else 0
        from_seq = 1
        if since is not None:  # everything from the first entry at or after ``since``: a verifiable suffix
            async with self.db.session() as session:
                first = await session.scalar(select(func.min(AuditEntryRow.seq))
                                             .where(AuditEntryRow.occurred_at >= since, AuditEntryRow.seq <= head_seq))
            from_seq = first if first is not None else head_seq + 1
        return ExportScope(from_seq=from_seq, head=head, patient=patient, since=since)

    async def _write_export(self, stream: IO[str], fmt: ExportFormat, scope: ExportScope) -> ExportSummary:
        writer = ExportWriter(stream, fmt, scope)
        writer.header(utcnow())
        stop = scope.head.seq if scope.head else 0
        async for entry in self._entries(scope.from_seq, stop, patient=scope.patient):
            writer.entry(entry)
        return writer.trailer()

    async def _export_to_file(self, path: Path, fmt: ExportFormat, scope: ExportScope) -> ExportSummary:
        """Write beside the target, fsync, then rename: a reader never sees half an export. Mode 0600: health data."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as stream:
                summary = await self._write_export(stream, fmt, scope)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return summary


class AuditBatch:
    """Entries checked as they are appended (a bad field is refused at once, naming it) and written, in
    order, by ``write`` inside the caller's transaction: they commit with what they record, or not at all."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self._pending: list[tuple[dt.datetime, _Checked]] = []

    def __len__(self) -> int:
        return len(self._pending)

    async def append(
        self,
        event: AuditEvent,
        *,
        actor: Actor,
        patient: str | None,
        source: Source,
        subject: Subject | None = None,
        outcome: Outcome | None = None,
        details: dict[str, Any] | None = None,
        session: AsyncSession | None = None,
    ) -> None:
        """As ``AuditLog.append``, written later by ``write`` (``session`` is ignored: ``write`` gets it)."""
        self.add(event, actor=actor, patient=patient, source=source, subject=subject, outcome=outcome, details=details)

    def add(self, event: AuditEvent, *, actor: Actor, patient: str | None, source: Source,
            subject: Subject | None = None, outcome: Outcome | None = None,
            details: dict[str, Any] | None = None) -> None:
        """``append`` from synchronous code (a transaction run by ``Database.run_in_transaction``)."""
        self._pending.append((utcnow(), _check_fields(event, actor, patient, subject, outcome or Outcome.success(),
                                                      source, details or {})))

    async def write(self, session: AsyncSession) -> list[AuditEntry]:
        """Append every collected entry in ``session``'s transaction; the batch is then empty."""
        pending, self._pending = self._pending, []
        return await self.log._append_many_in(session, pending)

    def write_in(self, connection: Connection) -> list[AuditEntry]:
        """``write`` in a synchronous transaction (``Database.run_in_transaction``): the same chain."""
        pending, self._pending = self._pending, []
        return self.log.append_many(connection, pending)

    def clear(self) -> None:
        """The transaction they belonged to was rolled back: forget them."""
        self._pending.clear()


def _check_fields(event: AuditEvent, actor: Actor, patient: str | None, subject: Subject | None,
                  outcome: Outcome, source: Source, details: dict[str, Any]) -> _Checked:
    if not isinstance(event, AuditEvent):
        raise UserError(f"{event!r} is not an AuditEvent", field="event")
    checked_details = _check_details(details)
    if event.info.needs_justification:
        _check_justification(checked_details)
    return _Checked(event, _check_actor(actor), _check_patient(patient, field="patient"), _check_subject(subject),
                    _check_outcome(outcome), _check_source(source), checked_details)


def _check_actor(actor: Actor) -> Actor:
    kind = _enum_value(ActorKind, actor.kind, "actor.kind")
    actor_id = _text(actor.id, "actor.id", 128, required=True)
    if kind == ActorKind.PATIENT:
        actor_id = validate_nir(actor.id, field="actor.id")
    return Actor(kind.value, str(actor_id), str(_text(actor.display_name, "actor.display_name", 256, required=True)),
                 _text(actor.role, "actor.role", 64))


def _check_patient(patient: str | None, *, field: str) -> str | None:
    return validate_nir(patient, field=field) if patient is not None else None


def _check_subject(subject: Subject | None) -> Subject | None:
    if subject is None:
        return None
    if not isinstance(subject.kind, str) or not SUBJECT_KIND.match(subject.kind):
        raise UserError(f"{subject.kind!r} is not a subject kind (lower-case letters and _, up to 32)", field="subject.kind")
    return Subject(subject.kind, str(_text(subject.id, "subject.id", 512, required=True)))


def _check_outcome(outcome: Outcome) -> Outcome:
    status = _enum_value(OutcomeStatus, outcome.status, "outcome.status")
    reason = _text(outcome.reason, "outcome.reason", 2000)
    if status != OutcomeStatus.SUCCESS and reason is None:
        raise UserError(f"an outcome {status.value!r} must say why", field="outcome.reason")
    return Outcome(status.value, reason)


def _check_source(source: Source) -> Source:
    door = _enum_value(Door, source.door, "source.door")
    if source.ip is None:
        return Source(door.value, None)
    try:
        address = ipaddress.ip_address(source.ip)
    except ValueError:
        raise UserError(f"{source.ip!r} is not an IP address", field="source.ip") from None
    return Source(door.value, str(address))


def _check_details(details: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe and bounded; returned as it will read back from storage (so hashes match)."""
    if not isinstance(details, dict):
        raise UserError("details must be a JSON object", field="details")
    try:
        encoded = canonical_json(details)
    except (TypeError, ValueError) as exc:
        raise UserError(f"details must be plain JSON values ({exc})", field="details") from None
    if len(encoded) > MAX_DETAILS_BYTES:
        raise UserError(f"details take {len(encoded)} bytes, at most {MAX_DETAILS_BYTES}", field="details")
    parsed: dict[str, Any] = json.loads(encoded)
    return parsed


def _check_justification(details: dict[str, Any]) -> None:
    justification = details.get("justification")
    if not isinstance(justification, str) or not justification.strip():
        raise UserError("an emergency access (bris de glace) needs the professional's justification",
                        field="details.justification")


def _text(value: str | None, field: str, max_length: int, *, required: bool = False) -> str | None:
    """A stored string: no NUL (PostgreSQL refuses it), valid UTF-8, bounded; '' means absent."""
    if value is None or value == "":
        if required:
            raise UserError("must not be empty", field=field)
        return None
    if not isinstance(value, str):
        raise UserError(f"must be text, not {type(value).__name__}", field=field)
    if "\x00" in value:
        raise UserError("must not contain NUL characters", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("is not valid Unicode text", field=field) from None
    if len(value) > max_length:
        raise UserError(f"has {len(value)} characters, at most {max_length}", field=field)
    return value


def _enum_value(enum_type: type[Any], value: Any, field: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise UserError(f"{value!r} is not one of {allowed}", field=field) from None


def _check_from_seq(from_seq: int | None) -> int:
    if from_seq is None:
        return 1
    if from_seq < 1:
        raise UserError("entries are numbered from 1", field="from_seq")
    return from_seq


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise UserError(f"must be between 1 and {MAX_PAGE}", field="limit")
    return limit


def _check_aware(value: dt.datetime | None, field: str) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        raise UserError("needs a time zone (e.g. 2025-01-31T00:00:00+00:00)", field=field)
    return value


def _filtered(query: Select[Any], *, patient: str | None, events: Sequence[AuditEvent], actor_id: str | None,
              subject_id: str | None, door: str | None, outcome: str | None, since: dt.datetime | None,
              until: dt.datetime | None, before_seq: int | None) -> Select[Any]:
    conditions: list[ColumnElement[bool]] = []
    if patient is not None:
        conditions.append(AuditEntryRow.patient_ins == patient)
    if events:
        conditions.append(AuditEntryRow.event.in_([int(event) for event in events]))
    if actor_id is not None:
        conditions.append(AuditEntryRow.actor_id == actor_id)
    if subject_id is not None:
        conditions.append(AuditEntryRow.subject_id == subject_id)
    if door is not None:
        conditions.append(AuditEntryRow.door == _enum_value(Door, door, "door").value)
    if outcome is not None:
        conditions.append(AuditEntryRow.outcome == _enum_value(OutcomeStatus, outcome, "outcome").value)
    if since is not None:
        conditions.append(AuditEntryRow.occurred_at >= since)
    if until is not None:
        conditions.append(AuditEntryRow.occurred_at < until)
    if before_seq is not None:
        conditions.append(AuditEntryRow.seq < before_seq)
    return query.where(*conditions)


def _row_values(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq, "occurred_at": entry.occurred_at, "event": entry.event_code,
        "actor_kind": entry.actor.kind, "actor_id": entry.actor.id, "actor_name": entry.actor.display_name,
        "actor_role": entry.actor.role, "patient_ins": entry.patient,
        "subject_kind": entry.subject.kind if entry.subject else None,
        "subject_id": entry.subject.id if entry.subject else None,
        "outcome": entry.outcome.status, "reason": entry.outcome.reason,
        "door": entry.source.door, "source_ip": entry.source.ip,
        "details": canonical_json(entry.details).decode("utf-8"),
        "prev_hash": entry.prev_hash, "entry_hash": entry.entry_hash, "seal": entry.seal,
    }


def _entry_from_row(row: AuditEntryRow) -> AuditEntry:
    """An entry exactly as stored; unreadable details still load, so verification can report them."""
    try:
        details = json.loads(row.details)
    except (TypeError, ValueError):
        details = {"unreadable_details": row.details}
    subject = Subject(row.subject_kind, row.subject_id or "") if row.subject_kind is not None else None
    return AuditEntry(
        seq=row.seq, occurred_at=row.occurred_at, event_code=row.event,
        actor=Actor(row.actor_kind, row.actor_id, row.actor_name, row.actor_role),
        patient=row.patient_ins, subject=subject, outcome=Outcome(row.outcome, row.reason),
        source=Source(row.door, row.source_ip),
        details=details if isinstance(details, dict) else {"unreadable_details": row.details},
        prev_hash=row.prev_hash, entry_hash=row.entry_hash, seal=row.seal,
    )

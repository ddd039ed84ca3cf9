"""The audit log on SQLite and PostgreSQL: appends, concurrency, tamper detection, views, validation."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from gateway.audit import (
    Actor,
    AuditChainConflict,
    AuditEvent,
    AuditKey,
    AuditLog,
    BreakKind,
    Door,
    Outcome,
    Source,
    Subject,
)
from gateway.audit.chain import GENESIS_HASH, chain_hash
from gateway.errors import UserError
from gateway.storage.db import Database
from tests.audit.helpers import (
    DOCTOR,
    PATIENT_A,
    PATIENT_B,
    append_sample,
    fill,
    insert_forged_after,
    raw,
    refused_entry,
    rewrite_and_rehash,
    swap_seq,
)

KEY = AuditKey(bytes(range(32)))


@pytest.fixture
def log(database: Database) -> AuditLog:
    return AuditLog(database, KEY)


async def test_entries_chain_from_genesis(log: AuditLog) -> None:
    first = await append_sample(log, 0)
    second = await append_sample(log, 1)
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.entry_hash
    assert second.entry_hash == chain_hash(first.entry_hash, second.body())
    assert second.seal == KEY.seal_entry(second.entry_hash)
    report = await log.verify()
    assert report.ok and report.checked == 2 and report.seals_checked
    assert report.head is not None and report.head.entry_hash == second.entry_hash


async def test_empty_log_verifies(log: AuditLog) -> None:
    report = await log.verify()
    assert report.ok and report.checked == 0 and report.head is None


async def test_stored_entry_reads_back_identically(log: AuditLog) -> None:
    written = await log.append(
        AuditEvent.EMERGENCY_ACCESS, actor=DOCTOR, patient=PATIENT_A, subject=Subject.document("doc-é"),
        source=Source(Door.FHIR, "2001:db8::1"), details={"justification": "patient inconscient, SAMU", "n": 1.5},
    )
    [read] = await log.entries_for_patient(PATIENT_A)
    assert read == written
    assert read.label_fr == "Accès en urgence (bris de glace)"


async def test_thousand_concurrent_appends_from_two_engines_form_one_gapless_chain(database: Database) -> None:
    """Two engines stand for two gateway processes: each has its own pool and its own in-process lock."""
    other = Database(database.url)
    try:
        logs = [AuditLog(database, KEY), AuditLog(other, KEY)]
        await asyncio.gather(*(append_sample(logs[index % 2], index) for index in range(1000)))
        async with database.session() as session:
            seqs = (await session.execute(text("SELECT seq FROM audit_entries ORDER BY seq"))).scalars().all()
        assert seqs == list(range(1, 1001))
        report = await logs[0].verify()
        assert report.ok, report.summary()
        assert report.checked == 1000
    finally:
        await other.dispose()


async def test_append_inside_callers_transaction_rolls_back_with_it(log: AuditLog, database: Database) -> None:
    await append_sample(log, 0)
    with pytest.raises(RuntimeError):
        async with database.session() as session:
            await log.append(AuditEvent.DOCUMENT_FILED, actor=Actor.system("dmp-bridge"), patient=PATIENT_A,
                             subject=Subject.document("d1"), source=Source(Door.SMTP), session=session)
            raise RuntimeError("filing failed after the audit entry was written")
    after = await append_sample(log, 1)
    assert after.seq == 2
    assert (await log.verify()).ok


async def test_database_refuses_updates_and_deletes(log: AuditLog, database: Database) -> None:
    await append_sample(log, 0)
    for statement in ("UPDATE audit_entries SET actor_name = 'x'", "DELETE FROM audit_entries"):
        with pytest.raises((IntegrityError, DBAPIError)) as refused:
            async with database.engine.begin() as conn:
                await conn.execute(text(statement))
        assert "append-only" in str(refused.value)


async def test_modified_entry_is_found(log: AuditLog, database: Database) -> None:
    await fill(log, 6)
    await raw(database, "UPDATE audit_entries SET actor_name = 'Someone else' WHERE seq = 4")
    report = await log.verify()
    assert not report.ok and report.broken is not None
    assert (report.broken.seq, report.broken.kind) == (4, BreakKind.MODIFIED)


async def test_deleted_entry_is_found(log: AuditLog, database: Database) -> None:
    await fill(log, 6)
    await raw(database, "DELETE FROM audit_entries WHERE seq = 3")
    report = await log.verify()
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (3, BreakKind.DELETED)


async def test_deleted_tail_is_found(log: AuditLog, database: Database) -> None:
    await fill(log, 6)
    await raw(database, "DELETE FROM audit_entries WHERE seq >= 5")
    report = await log.verify()
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (5, BreakKind.DELETED)


async def test_deleted_and_renumbered_entries_are_found(log: AuditLog, database: Database) -> None:
    await fill(log, 6)
    await raw(database, "DELETE FROM audit_entries WHERE seq = 3",
              "UPDATE audit_entries SET seq = -seq WHERE seq > 3",
              "UPDATE audit_entries SET seq = -seq - 1 WHERE seq < 0")
    report = await log.verify()
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (3, BreakKind.DELETED)


async def test_swapped_entries_are_found(log: AuditLog, database: Database) -> None:
    await fill(log, 6)
    await swap_seq(database, 2, 3)
    report = await log.verify()
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (2, BreakKind.REORDERED)


async def test_entry_inserted_in_the_middle_is_found(log: AuditLog, database: Database) -> None:
    await fill(log, 6)
    await insert_forged_after(database, 3)
    report = await log.verify()
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (4, BreakKind.INSERTED)


async def test_entry_appended_after_the_head_is_found(log: AuditLog, database: Database) -> None:
    await fill(log, 4)
    await insert_forged_after(database, 4)
    report = await log.verify()
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (5, BreakKind.INSERTED)
    with pytest.raises(AuditChainConflict, match="entry 5"):  # fail closed: the forged row holds the next number
        await append_sample(log, 9)


async def test_chain_rehashed_without_the_key_is_forged(log: AuditLog, database: Database) -> None:
    await fill(log, 6)
    await rewrite_and_rehash(database, from_seq=3)
    assert (await AuditLog(database).verify()).ok, "without a key the rewritten chain looks consistent"
    report = await log.verify()
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (3, BreakKind.FORGED)


async def test_verify_from_a_later_entry(log: AuditLog, database: Database) -> None:
    await fill(log, 8)
    await raw(database, "UPDATE audit_entries SET door = 'webmail' WHERE seq = 2")
    assert (await log.verify(from_seq=5)).ok
    assert not (await log.verify(from_seq=2)).ok
    with pytest.raises(UserError, match="from_seq"):
        await log.verify(from_seq=20)


async def test_patient_view_holds_only_that_patient(log: AuditLog) -> None:
    await fill(log, 9, patients=(PATIENT_A, PATIENT_B, PATIENT_A))
    await log.append(AuditEvent.SPACE_CLOSED, actor=Actor.patient(PATIENT_B, "Jeanne B."), patient=PATIENT_B,
                     source=Source(Door.WEBMAIL, "198.51.100.7"))
    mine = await log.entries_for_patient(PATIENT_A, limit=4)
    assert [entry.seq for entry in mine] == [9, 7, 6, 4]
    assert all(entry.patient == PATIENT_A for entry in mine)
    rest = await log.entries_for_patient(PATIENT_A, limit=50, before_seq=mine[-1].seq)
    assert [entry.seq for entry in rest] == [3, 1]
    theirs = await log.entries_for_patient(PATIENT_B)
    assert [entry.event for entry in theirs][:1] == [AuditEvent.SPACE_CLOSED]
    assert {entry.patient for entry in theirs} == {PATIENT_B}


async def test_admin_search_filters(log: AuditLog) -> None:
    await fill(log, 6)
    await refused_entry(log)
    refused = await log.search(outcome="refused")
    assert [entry.event for entry in refused] == [AuditEvent.ACCESS_REFUSED]
    reads = await log.search(events=[AuditEvent.DOCUMENT_READ], actor_id=DOCTOR.id)
    assert [entry.seq for entry in reads] == [4, 1]
    assert [entry.seq for entry in await log.search(subject_id="1.2.250.1.999.2")] == [3]
    assert await log.search(since=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)) == []
    with pytest.raises(UserError, match="door"):
        await log.search(door="telnet")


async def test_an_error_is_its_own_outcome(log: AuditLog) -> None:
    """A failure inside the server (a 500, a SERVERBUG) is ``error``, stored and searched apart from refusals
    (the database's CHECK constraint admits it: migration 0023)."""
    await refused_entry(log)
    failed = await log.append(AuditEvent.COMMAND_FAILED, actor=DOCTOR, patient=None, source=Source(Door.FHIR),
                              outcome=Outcome.error("server-error"), details={"status": 500})
    [found] = await log.search(outcome="error")
    assert (found.seq, found.outcome) == (failed.seq, Outcome("error", "server-error"))
    assert [entry.event for entry in await log.search(outcome="refused")] == [AuditEvent.ACCESS_REFUSED]
    assert (await log.verify()).ok


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"event": AuditEvent.EMERGENCY_ACCESS}, "details.justification"),
    ({"outcome": Outcome("refused")}, "outcome.reason"),
    ({"outcome": Outcome("error")}, "outcome.reason"),
    ({"outcome": Outcome("failed", "x")}, "outcome.status"),
    ({"patient": "185077512345699"}, "patient"),
    ({"source": Source("telnet")}, "source.door"),
    ({"source": Source(Door.FHIR, "not-an-ip")}, "source.ip"),
    ({"details": {"when": dt.date(2025, 1, 1)}}, "details"),
    ({"actor": Actor("robot", "r1", "R")}, "actor.kind"),
    ({"actor": Actor.professional("8100", "", "10")}, "actor.display_name"),
    ({"subject": Subject("Document!", "x")}, "subject.kind"),
    ({"subject": Subject.document("a\x00b")}, "subject.id"),
])
async def test_append_names_the_wrong_field(log: AuditLog, kwargs: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"event": AuditEvent.DOCUMENT_READ, "actor": DOCTOR, "patient": PATIENT_A,
                                    "source": Source(Door.FHIR)}
    arguments.update(kwargs)
    event = arguments.pop("event")
    with pytest.raises(UserError) as refused:
        await log.append(event, **arguments)  # type: ignore[arg-type]
    assert refused.value.field == field
    assert (await log.verify()).checked == 0

"""AuditLog.batch(): entries collected, then appended in the caller's transaction by one claim of the head;
the chain is the same chain one append at a time would make, verifiable, and nothing is written on rollback."""

from __future__ import annotations

import pytest

from gateway.audit import AuditEvent, AuditKey, AuditLog, Door, Source, Subject
from gateway.audit.chain import GENESIS_HASH, chain_hash
from gateway.audit.log import AuditBatch
from gateway.errors import UserError
from gateway.storage.db import Database
from tests.audit.helpers import DOCTOR, PATIENT_A, PATIENT_B, append_sample

KEY = AuditKey(bytes(range(32)))


async def _collect(log: AuditLog, count: int, start: int = 0) -> AuditBatch:
    batch = log.batch()
    for index in range(start, start + count):
        await batch.append(AuditEvent.DOCUMENT_READ, actor=DOCTOR, patient=(PATIENT_A, PATIENT_B)[index % 2],
                           subject=Subject.document(f"1.2.250.1.999.{index}"), source=Source(Door.SMTP),
                           details={"index": index})
    return batch


async def test_a_batch_chains_after_single_appends_and_before_the_next(database: Database) -> None:
    log = AuditLog(database, KEY)
    first = await append_sample(log, 0)
    batch = log.batch()
    for index in range(1, 6):
        await batch.append(AuditEvent.DOCUMENT_READ, actor=DOCTOR, patient=PATIENT_A,
                           subject=Subject.document(f"1.2.250.1.999.{index}"), source=Source(Door.SMTP),
                           details={"index": index})
    assert len(batch) == 5
    async with database.session() as session:
        written = await batch.write(session)
    assert [entry.seq for entry in written] == [2, 3, 4, 5, 6] and len(batch) == 0
    previous = first.entry_hash
    for entry in written:
        assert entry.prev_hash == previous and entry.entry_hash == chain_hash(previous, entry.body())
        assert entry.seal == KEY.seal_entry(entry.entry_hash)
        previous = entry.entry_hash
    last = await append_sample(log, 7)
    assert (last.seq, last.prev_hash) == (7, written[-1].entry_hash)
    report = await log.verify()
    assert report.ok and report.checked == 7 and report.seals_checked
    assert [e.seq for e in await log.entries_for_patient(PATIENT_A)][:3] == [7, 6, 5]


async def test_a_first_batch_starts_the_chain_at_genesis(database: Database) -> None:
    log = AuditLog(database, KEY)
    batch = await _collect(log, 3)
    async with database.session() as session:
        written = await batch.write(session)
    assert written[0].seq == 1 and written[0].prev_hash == GENESIS_HASH
    assert (await log.verify()).ok


async def test_a_rolled_back_batch_leaves_no_entry_and_no_gap(database: Database) -> None:
    log = AuditLog(database, KEY)
    await append_sample(log, 0)
    batch = await _collect(log, 4)
    with pytest.raises(RuntimeError):
        async with database.session() as session:
            await batch.write(session)
            raise RuntimeError("the filing transaction failed")
    nxt = await append_sample(log, 9)
    assert nxt.seq == 2
    report = await log.verify()
    assert report.ok and report.checked == 2


async def test_a_bad_field_is_refused_when_appended_to_the_batch(database: Database) -> None:
    batch = AuditLog(database, KEY).batch()
    with pytest.raises(UserError) as refused:
        await batch.append(AuditEvent.DOCUMENT_READ, actor=DOCTOR, patient="123", source=Source(Door.SMTP))
    assert refused.value.field == "patient" and len(batch) == 0


async def test_an_empty_batch_writes_nothing(database: Database) -> None:
    log = AuditLog(database, KEY)
    async with database.session() as session:
        assert await log.batch().write(session) == []
    assert (await log.head()) is None

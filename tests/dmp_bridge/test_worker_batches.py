"""The filing worker's batches: many jobs in one transaction, and a kill -9 between the claim and the
commit: the next worker files every document exactly once, with one audit entry and one acknowledgement each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from gateway.audit.events import AuditEvent
from gateway.audit.log import AuditLog
from gateway.audit.tables import AuditEntryRow
from gateway.config import Settings
from gateway.dmp_bridge.acknowledgement import Acknowledger
from gateway.dmp_bridge.filing import AuditJournal, LoggingJournal
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import FilingJob, FilingNotice, FilingOutcome, RecordDocument
from gateway.dmp_bridge import worker as worker_module
from gateway.dmp_bridge.worker import FilingWorker, WorkerPolicy
from gateway.mailstore.delivery import LocalDelivery as StoreDelivery
from gateway.mailstore.tables import Message
from gateway.queue.generated import GeneratedMailQueue
from gateway.queue.tables import QueuedMessage
from gateway.queue.spool import Spool
from gateway.security.at_rest import SpoolCipher
from gateway.storage.blobs import InlineBlob, is_inline
from gateway.storage.db import Database
from tests.dmp_bridge.filing_world import (BIO_V1, BIO_V2, LAB_ADDRESS, SAMPLES, TEST_INS, World, build_world,
                                           message_with, sample)

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")

COUNT = 6
ROOT = Path(__file__).resolve().parents[2]


def numbered_cda(number: int) -> bytes:
    """The VAC-NOTE sample as a new document: its own id and setId."""
    cda = sample("VAC-NOTE_2023.01.xml")
    cda = cda.replace(b'<id root="1.2.250.1.213.1.1.1.46.2023.1.1"/>', f'<id root="1.2.250.1.999.{number}.1"/>'.encode())
    return cda.replace(b'<setId root="1.2.250.1.213.1.1.1.46.2023.1"/>', f'<setId root="1.2.250.1.999.{number}"/>'.encode())


async def deliver_batch(world: World, count: int) -> None:
    """``count`` messages from the lab to the patient's mailbox, each asking for an MDN."""
    delivery = StoreDelivery(world.mailstore)
    for number in range(count):
        message = message_with((f"CR{number}.xml", numbered_cda(number), "text/xml"), to=world.patient_address,
                               subject=f"CR {number}", mdn_to=LAB_ADDRESS)
        raw = message.as_bytes()
        async with world.db.session() as session:
            session.add(QueuedMessage(id=f"b{number}", door="submission", sender=LAB_ADDRESS, size=len(raw),
                                      trace_headers="", client_address="127.0.0.1", authenticated_as=LAB_ADDRESS))
        await delivery.deliver(world.patient_mailbox_id, raw, delivery_key=f"b{number}:1")


def worker(world: World, spool: Spool, policy: WorkerPolicy = WorkerPolicy()) -> FilingWorker:
    queue = GeneratedMailQueue(world.settings, world.directory, spool, schedule_local=None)
    return FilingWorker(world.db, world.mailstore, world.blobs, hub=world.hub,
                        journal=AuditJournal(AuditLog.for_data_dir(world.db, world.settings.data_path)),
                        acknowledger=Acknowledger(world.db, queue, world.settings), policy=policy)


async def count_rows(db: Database, statement: object) -> int:
    async with db.session() as session:
        return int(await session.scalar(statement) or 0)  # type: ignore[call-overload]


async def assert_filed_once(world: World, count: int) -> None:
    db = world.db
    assert await count_rows(db, select(func.count()).select_from(RecordDocument)) == count
    assert await count_rows(db, select(func.count()).select_from(AuditEntryRow)
                            .where(AuditEntryRow.event == int(AuditEvent.DOCUMENT_FILED))) == count
    # one MDN to the lab and one notice to the patient per message, never two
    assert await count_rows(db, select(func.count()).select_from(FilingNotice)) == 2 * count
    assert await count_rows(db, select(func.count()).select_from(QueuedMessage)
                            .where(QueuedMessage.door == "generated")) == 2 * count
    async with db.session() as session:
        states = (await session.scalars(select(FilingJob.state))).all()
    assert sorted(states) == ["filed"] * count
    assert (await AuditLog.for_data_dir(db, world.settings.data_path).verify()).ok
    assert len(await RecordStore(db, world.blobs).list_for_patient(TEST_INS)) == count
    await assert_no_stray_inline_blob(world)


async def assert_no_stray_inline_blob(world: World) -> None:
    """Every inline blob is a record document's (the delivered messages' aside): none left by a rollback."""
    async with world.db.session() as session:
        inline = set((await session.scalars(select(InlineBlob.blob_id))).all())
        documents = set((await session.scalars(select(RecordDocument.blob_id))).all())
    assert inline - await _message_blobs(world) == {blob_id for blob_id in documents if is_inline(blob_id)}


@pytest.mark.parametrize("processes", [0, 1], ids=["extracting-in-threads", "extracting-in-a-process"])
async def test_a_batch_files_every_job_with_one_chain_of_audit_entries(database: Database, settings: Settings,
                                                                      tmp_path: Path, processes: int) -> None:
    world = await build_world(database, settings)
    await deliver_batch(world, COUNT)
    filing = worker(world, Spool(tmp_path / "spool"), WorkerPolicy(extract_processes=processes))
    try:
        assert await filing.run_once() == COUNT
    finally:
        await filing.stop()
    await assert_filed_once(world, COUNT)
    assert await worker(world, Spool(tmp_path / "spool")).run_once() == 0  # nothing left: nothing twice


async def test_small_documents_and_notices_are_committed_in_their_rows_without_a_file(
        database: Database, settings: Settings, tmp_path: Path) -> None:
    """A document up to ``INLINE_MAX`` is sealed inline and inserted with its record row; a notice is kept
    sealed in its queue row (the spool given the database, as ``open_services`` builds it): the filing
    commit makes both durable, with no blob file and no spool file; both read back as they were."""
    world = await build_world(database, settings)
    await deliver_batch(world, COUNT)
    spool = Spool(tmp_path / "spool", await SpoolCipher.load(world.blobs.keys), db=world.db)
    assert await worker(world, spool).run_once() == COUNT
    await assert_filed_once(world, COUNT)
    store = RecordStore(world.db, world.blobs)
    documents = await store.list_for_patient(TEST_INS)
    assert all(is_inline(document.blob_id) for document in documents)
    assert sorted([await store.read_content(document) for document in documents]) == sorted(
        numbered_cda(number) for number in range(COUNT))
    document_files = {path.name for path in world.blobs.root.rglob("*") if path.is_file()} - await _message_blobs(world)
    assert document_files == set()
    assert [path for path in spool.root.rglob("*") if path.is_file()] == []
    async with world.db.session() as session:
        queued = (await session.scalars(select(QueuedMessage.id).where(QueuedMessage.door == "generated"))).all()
    for queue_id in queued:
        notice = await spool.plaintext_in_row(queue_id)
        assert notice is not None and b"Subject:" in notice
        sealed = await spool.row_content(queue_id)
        assert sealed is not None and notice not in sealed          # sealed in the row, never plaintext


async def test_a_batch_decided_otherwise_than_forecast_rolls_its_inline_documents_back_and_files_them_once(
        database: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's transaction writes every record row with its inline document, then finds it decided
    otherwise than forecast (here: made to, once): nothing is committed, the inline documents roll back with
    their rows, and the next attempt inserts the very same sealed documents again, each filed once."""
    world = await build_world(database, settings)
    await deliver_batch(world, COUNT)
    filing = worker(world, Spool(tmp_path / "spool", await SpoolCipher.load(world.blobs.keys), db=world.db))
    real_shape, real_commit = worker_module._shape, filing._commit
    commits: list[int] = []
    written: list[int] = []
    in_first_commit: list[bool] = []

    def shape_in_first_commit(report: Any) -> Any:
        shape = real_shape(report)
        return (*shape, ("decided otherwise",)) if in_first_commit else shape

    def commit(connection: Any, ready: Any) -> Any:
        commits.append(len(commits) + 1)
        if len(commits) > 1:
            return real_commit(connection, ready)
        in_first_commit.append(True)
        try:
            return real_commit(connection, ready)
        finally:   # what the first attempt had written in its transaction before it found the change
            in_first_commit.clear()
            written.append(connection.execute(select(func.count()).select_from(InlineBlob)).scalar_one())

    monkeypatch.setattr(worker_module, "_shape", shape_in_first_commit)
    filing._commit = commit  # type: ignore[method-assign]
    assert await filing.run_once() == COUNT
    assert len(commits) == 2
    assert written[0] >= 2 * COUNT          # the delivered messages' and the batch's documents, uncommitted
    await assert_filed_once(world, COUNT)


async def test_chunks_are_pipelined_and_each_job_is_filed_once(database: Database, settings: Settings,
                                                                tmp_path: Path) -> None:
    """A chunk's phase 1 (reading, extracting) runs while the chunk before it is in phase 2; phase 2 runs
    one chunk at a time, in order; every job is filed once, as with one chunk."""
    world = await build_world(database, settings)
    await deliver_batch(world, COUNT)
    filing = worker(world, Spool(tmp_path / "spool"), WorkerPolicy(claim_chunk=2))
    events: list[tuple[str, int, str]] = []
    plan_batch, file_batch = filing._plan_batch, filing._file_batch

    async def planning(claimed: dict[int, Any]) -> Any:
        events.append(("plan", min(claimed), "start"))
        planned = await plan_batch(claimed)
        events.append(("plan", min(claimed), "end"))
        return planned

    async def filing_batch(claimed: dict[int, Any], planned: Any) -> int:
        events.append(("file", min(claimed), "start"))
        ran = await file_batch(claimed, planned)
        events.append(("file", min(claimed), "end"))
        return ran

    filing._plan_batch, filing._file_batch = planning, filing_batch  # type: ignore[method-assign]
    assert await filing.run_once() == COUNT
    await assert_filed_once(world, COUNT)
    chunks = sorted({chunk for _step, chunk, _moment in events})
    assert len(chunks) == COUNT // 2
    for earlier, later in zip(chunks, chunks[1:]):
        # the later chunk was planned while the earlier one was being filed, and filed only after it
        assert events.index(("plan", later, "start")) < events.index(("file", earlier, "end"))
        assert events.index(("file", earlier, "end")) < events.index(("file", later, "start"))


KILLER = textwrap.dedent('''
    import asyncio, os, signal, sys
    from pathlib import Path
    from gateway.config import load_settings
    from gateway.directory.service import DirectoryService
    from gateway.dmp_bridge import worker as worker_module
    from gateway.mailstore.notify import ChangeHub
    from gateway.mailstore.sql import SqlMailStore
    from gateway.queue.spool import Spool
    from gateway.security.at_rest import FieldSealer, SpoolCipher
    from gateway.security.keys import KeyManager
    from gateway.security.passwords import PasswordHasher
    from gateway.storage.blobs import BlobStore
    from gateway.storage.db import Database

    from gateway.queue.generated import GeneratedMailQueue

    class Services:
        def __init__(self, url, data_dir, spool_dir):
            self.settings = load_settings(data_dir=data_dir, environ={})
            self.db = Database(url)
            self.directory = DirectoryService(self.db, self.settings, PasswordHasher(time_cost=1, memory_kib=8))
            self.blobs = BlobStore(self.settings.data_path / "blobs", KeyManager(self.db, self.settings.data_path / "keys"))
            self.fields = FieldSealer(self.blobs.keys)
            self.hub = ChangeHub()
            self.mailstore = SqlMailStore(self.db, self.blobs, self.hub)
            self.smime = None
            self.spool_dir = spool_dir
            self.generated = GeneratedMailQueue(self.settings, self.directory, Spool(spool_dir), schedule_local=None)

    async def die_before_commit(db, work, *, attempts=3):
        """Everything of the batch written (blobs and spool files fsynced, every row in the open
        transaction, on the database thread that would commit it), then kill -9 before the commit."""
        def work_then_die(connection):
            work(connection)
            os.kill(os.getpid(), signal.SIGKILL)
        await db.run_in_transaction(work_then_die, write=True)

    async def main():
        services = Services(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
        # as open_services builds it: sealed, small notices in their queue rows
        services.generated.spool = Spool(services.spool_dir, await SpoolCipher.load(services.blobs.keys), db=services.db)
        worker_module.committed = die_before_commit
        worker = worker_module.build_filing_worker(services)
        await worker.run_once()

    asyncio.run(main())
''')


async def test_kill_9_between_claim_and_commit_files_each_document_exactly_once(database: Database, settings: Settings,
                                                                                 tmp_path: Path) -> None:
    world = await build_world(database, settings)
    await deliver_batch(world, COUNT)
    spool_dir = tmp_path / "spool"
    Spool(spool_dir)
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLER, database.url, str(settings.data_path), str(spool_dir)],
                            env=environment, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    # The dead worker's batch left nothing behind but its lease: its documents and notices were in the rows
    # of the transaction it never committed (no inline blob, no queue row, no blob or spool file).
    assert await count_rows(database, select(func.count()).select_from(RecordDocument)) == 0
    assert await count_rows(database, select(func.count()).select_from(FilingNotice)) == 0
    assert await count_rows(database, select(func.count()).select_from(QueuedMessage)
                            .where(QueuedMessage.door == "generated")) == 0
    await assert_no_stray_inline_blob(world)
    assert {path.name for path in world.blobs.root.rglob("*") if path.is_file()} <= await _message_blobs(world)
    assert [path for path in (spool_dir / "queue").rglob("*") if path.is_file()] == []
    async with database.session() as session:
        leased = (await session.scalars(select(FilingJob.attempts).where(FilingJob.lease_until.is_not(None)))).all()
        assert list(leased) == [1] * COUNT
        # the lease runs out (lease_seconds later): the jobs are free for the next worker
        await session.execute(update(FilingJob).values(lease_until=FilingJob.updated_at))
    assert await worker(world, Spool(spool_dir)).run_once() == COUNT
    await assert_filed_once(world, COUNT)


class FailingJournal(LoggingJournal):
    """A journal that fails on one document, as a disk or database fault would."""

    def __init__(self, failing_unique_id: str) -> None:
        self.failing_unique_id = failing_unique_id

    def document_filed(self, document: RecordDocument, replaced: RecordDocument | None) -> None:
        if document.unique_id == self.failing_unique_id:
            raise RuntimeError("the journal could not write")
        super().document_filed(document, replaced)


async def test_one_failing_job_rolls_its_batch_back_and_the_others_are_filed_on_their_own(
        database: Database, settings: Settings, tmp_path: Path) -> None:
    world = await build_world(database, settings)
    await deliver_batch(world, COUNT)
    queue = GeneratedMailQueue(world.settings, world.directory, Spool(tmp_path / "spool"), schedule_local=None)
    failing = FilingWorker(world.db, world.mailstore, world.blobs, hub=world.hub,
                           journal=FailingJournal("1.2.250.1.999.2.1"),
                           acknowledger=Acknowledger(world.db, queue, world.settings), policy=WorkerPolicy())
    assert await failing.run_once() == COUNT
    async with database.session() as session:
        jobs = {job.delivery_key: job for job in (await session.scalars(select(FilingJob))).all()}
    bad = jobs.pop("b2:1")
    assert bad.state == "received" and bad.next_attempt_at is not None and "could not write" in (bad.last_error or "")
    assert {job.state for job in jobs.values()} == {"filed"}
    assert await count_rows(database, select(func.count()).select_from(RecordDocument)) == COUNT - 1
    assert await count_rows(database, select(func.count()).select_from(FilingNotice)) == 2 * (COUNT - 1)
    await assert_no_stray_inline_blob(world)    # the rolled-back batch's inline documents went with it


V1_ID, V2_ID = "1.2.250.1.213.1.1.1.55.2021.6.1", "1.2.250.1.213.1.1.1.55.2021.6.2"


@pytest.mark.parametrize("chunk", [64, 1], ids=["one-batch", "pipelined-chunks-of-one"])
@pytest.mark.parametrize("order", [(BIO_V1, BIO_V2, BIO_V1), (BIO_V2, BIO_V1, BIO_V1)], ids=["v1-v2-v1", "v2-v1-v1"])
async def test_versions_and_copies_of_one_series_in_one_batch_are_decided_as_one_after_the_other(
        database: Database, settings: Settings, tmp_path: Path, order: tuple[str, str, str], chunk: int) -> None:
    """The batch's transaction decides each document on the rows it read once and on the rows it wrote
    itself before: a version filed earlier in the batch is superseded (or supersedes a late older one), and
    a second copy of a document filed earlier in the batch is a duplicate, exactly as one job after another."""
    world = await build_world(database, settings)
    delivery = StoreDelivery(world.mailstore)
    for number, name in enumerate(order):
        raw = message_with((f"bio{number}.xml", sample(name), "text/xml"), to=world.patient_address).as_bytes()
        async with world.db.session() as session:
            session.add(QueuedMessage(id=f"s{number}", door="submission", sender=LAB_ADDRESS, size=len(raw),
                                      trace_headers="", client_address="127.0.0.1", authenticated_as=LAB_ADDRESS))
        await delivery.deliver(world.patient_mailbox_id, raw, delivery_key=f"s{number}:1")
    assert await worker(world, Spool(tmp_path / "spool"), WorkerPolicy(claim_chunk=chunk)).run_once() == 3
    store = RecordStore(world.db, world.blobs)
    v1, v2 = await store.get(V1_ID), await store.get(V2_ID)
    assert (v1.status, v1.superseded_by_unique_id) == ("superseded", V2_ID)
    assert v2.status == "current"
    assert len(await store.list_for_patient(TEST_INS)) == 2
    async with world.db.session() as session:
        outcomes = (await session.execute(select(FilingJob.delivery_key, FilingOutcome.outcome, FilingOutcome.document_unique_id)
                                          .join(FilingOutcome, FilingOutcome.job_id == FilingJob.id)
                                          .order_by(FilingJob.delivery_key))).all()
    ids = {BIO_V1: V1_ID, BIO_V2: V2_ID}
    assert [tuple(row) for row in outcomes] == [("s0:1", "filed", ids[order[0]]), ("s1:1", "filed", ids[order[1]]),
                                                ("s2:1", "duplicate", V1_ID)]
    assert await count_rows(world.db, select(func.count()).select_from(AuditEntryRow)
                            .where(AuditEntryRow.event == int(AuditEvent.DOCUMENT_FILED))) == 2
    assert (await AuditLog.for_data_dir(world.db, world.settings.data_path).verify()).ok


async def test_a_document_whose_blob_cannot_be_written_delays_only_its_job_and_leaves_no_stray_blob(
        database: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's documents are written ahead a group per worker-thread hop (``BlobStore.put_many``): one
    that fails (disk full) fails its batch, which is filed again job by job; the others are filed once, the
    failing job waits for its retry, and no blob is left behind that no row references."""
    monkeypatch.setattr("gateway.dmp_bridge.filing.INLINE_MAX", 0)   # documents above the inline limit: files
    world = await build_world(database, settings)
    await deliver_batch(world, COUNT)
    refused = numbered_cda(2)
    original = world.blobs._put_blocking

    def disk_full_for_one(owner: str, key_id: int, key: bytes, source: Any) -> Any:
        if source == refused:
            raise OSError(28, "No space left on device")
        return original(owner, key_id, key, source)

    monkeypatch.setattr(world.blobs, "_put_blocking", disk_full_for_one)
    assert await worker(world, Spool(tmp_path / "spool")).run_once() == COUNT
    async with database.session() as session:
        jobs = {job.delivery_key: job for job in (await session.scalars(select(FilingJob))).all()}
    bad = jobs.pop("b2:1")
    assert bad.state == "received" and bad.next_attempt_at is not None and "No space" in (bad.last_error or "")
    assert {job.state for job in jobs.values()} == {"filed"}
    async with database.session() as session:
        referenced = set((await session.scalars(select(RecordDocument.blob_id))).all())
    assert len(referenced) == COUNT - 1
    document_blobs = {path.name for path in world.blobs.root.rglob("*") if path.is_file()} - await _message_blobs(world)
    assert document_blobs == referenced
    monkeypatch.setattr(world.blobs, "_put_blocking", original)
    async with database.session() as session:
        await session.execute(update(FilingJob).where(FilingJob.id == bad.id).values(next_attempt_at=None))
    assert await worker(world, Spool(tmp_path / "spool")).run_once() == 1
    await assert_filed_once(world, COUNT)


async def _message_blobs(world: World) -> set[str]:
    async with world.db.session() as session:
        return set((await session.scalars(select(Message.blob_id))).all())


@pytest.mark.parametrize("count", [1, COUNT], ids=["a-batch-of-one", "a-batch"])
async def test_a_failure_after_the_commit_never_deletes_a_committed_document(
        database: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Once the filing transaction has committed, its documents' blob files are the record's: a failure in what
    follows the commit (waking the notices' delivery) is logged; it neither deletes those files (which left
    committed rows pointing at nothing) nor files the jobs again."""
    monkeypatch.setattr("gateway.dmp_bridge.filing.INLINE_MAX", 0)   # documents above the inline limit: files
    world = await build_world(database, settings)
    await deliver_batch(world, count)
    filing = worker(world, Spool(tmp_path / "spool"))
    assert filing.acknowledger is not None

    def dispatch_fails(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the event loop refused the wake-up")

    monkeypatch.setattr(filing.acknowledger, "dispatch", dispatch_fails)
    assert await filing.run_once() == count
    await assert_filed_once(world, count)
    async with database.session() as session:
        referenced = set((await session.scalars(select(RecordDocument.blob_id))).all())
    document_blobs = {path.name for path in world.blobs.root.rglob("*") if path.is_file()} - await _message_blobs(world)
    assert document_blobs == referenced and len(referenced) == count
    for document in await RecordStore(database, world.blobs).list_for_patient(TEST_INS):
        assert (await RecordStore(database, world.blobs).read_content(document)).startswith(b"<?xml")

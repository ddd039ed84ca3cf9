"""FilingWorker with the real mail store, queue and local delivery (SQLite and PostgreSQL):
acknowledgements, patient notifications, idempotence, crash recovery, bounded retries."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from gateway.config import Settings
from gateway.dmp_bridge.acknowledgement import KO_PREFIX, NOTIFICATION_SUBJECT, Acknowledger
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import FilingJob, FilingNotice, JobState
from gateway.dmp_bridge.worker import FilingWorker, WorkerPolicy
from gateway.mailstore.delivery import LocalDelivery as StoreDelivery
from gateway.mailstore.interface import FolderRef, UidSet
from gateway.mailstore.tables import Delivery
from gateway.queue.local_delivery import LocalDeliveryWorker as QueueDelivery
from gateway.queue.generated import GeneratedMailQueue
from gateway.queue.tables import QueuedMessage
from gateway.queue.store import QueueStore
from gateway.queue.spool import Spool
from gateway.security.at_rest import is_sealed
from gateway.storage.blobs import InlineBlob, is_inline
from gateway.storage.db import Database
from gateway.storage.models import Mailbox
from tests.dmp_bridge.filing_world import LAB_ADDRESS, PRO_DOMAIN, SAMPLES, TEST_INS, World, build_world, cda_message

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")


class Bench:
    """The world plus a worker whose generated mail really goes through the queue into mailboxes."""

    def __init__(self, world: World, spool_dir: Path) -> None:
        self.world = world
        self.spool = Spool(spool_dir)
        self.scheduled: list[str] = []
        self.store_delivery = StoreDelivery(world.mailstore)
        self.queue_delivery = QueueDelivery(QueueStore(world.db), self.spool, self.store_delivery,
                                            authserv_id="localhost")
        self.generated = GeneratedMailQueue(world.settings, world.directory, self.spool,
                                            schedule_local=self.scheduled.append)

    def worker(self, **policy: object) -> FilingWorker:
        return FilingWorker(self.world.db, self.world.mailstore, self.world.blobs,
                            acknowledger=Acknowledger(self.world.db, self.generated, self.world.settings),
                            hub=self.world.hub, policy=WorkerPolicy(**policy))  # type: ignore[arg-type]

    async def deliver(self, message: EmailMessage, mailbox_id: int, key: str, *, sender: str = LAB_ADDRESS,
                      login: str | None = None, door: str = "submission") -> None:
        """Deliver as local delivery does, after the queue row the door wrote: ``login`` (default: ``sender``)
        authenticated and sent as ``sender``."""
        queue_id = key.split(":", 1)[0]
        async with self.world.db.session() as session:
            if await session.get(QueuedMessage, queue_id) is None:
                session.add(QueuedMessage(id=queue_id, door=door, sender=sender, size=len(message.as_bytes()),
                                          trace_headers="", client_address="127.0.0.1",
                                          authenticated_as=(login or sender) if door != "relay" else None))
        await self.store_delivery.deliver(mailbox_id, message.as_bytes(), delivery_key=key)

    async def flush_generated(self) -> None:
        while self.scheduled:
            await self.queue_delivery.deliver_message(self.scheduled.pop(0))

    async def inbox(self, address: str) -> list[EmailMessage]:
        async with self.world.db.session() as session:
            mailbox_id = await session.scalar(select(Mailbox.id).where(Mailbox.address == address))
        assert mailbox_id is not None
        folder = FolderRef(mailbox_id, "INBOX")
        if "INBOX" not in {info.name for info in await self.world.mailstore.list_folders(mailbox_id)}:
            return []  # never delivered to: not provisioned yet
        messages = []
        for meta in await self.world.mailstore.fetch(folder, UidSet.of((1, 1_000_000))):
            async with await self.world.mailstore.open_message(folder, meta.uid) as body:
                parsed = email.message_from_bytes(await body.read(), policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            messages.append(parsed)
        return messages

    async def job(self, key: str) -> FilingJob:
        async with self.world.db.session() as session:
            job = await session.scalar(select(FilingJob).where(FilingJob.delivery_key == key))
        assert job is not None
        return job


@pytest.fixture
async def bench(database: Database, settings: Settings, tmp_path: Path) -> Bench:
    world = await build_world(database, settings)
    return Bench(world, tmp_path / "spool")


def _disposition(mdn: EmailMessage) -> str:
    part = next(p for p in mdn.walk() if p.get_content_type() == "message/disposition-notification")
    payload = part.get_payload()
    if isinstance(payload, list):  # the email package parses the fields as header blocks
        return "\n".join(f"{name}: {' '.join(str(value).split())}" for block in payload for name, value in block.items())
    return str(payload)


async def test_requested_mdn_says_processed_and_the_patient_is_notified(bench: Bench) -> None:
    message = cda_message("VAC-NOTE_2023.01.xml", mdn_to=LAB_ADDRESS)
    await bench.deliver(message, bench.world.patient_mailbox_id, "q1:1")
    assert await bench.worker().run_once() == 1
    await bench.flush_generated()
    job = await bench.job("q1:1")
    assert (job.state, job.documents_filed, job.recipient) == ("filed", 1, bench.world.patient_address)
    [mdn] = await bench.inbox(LAB_ADDRESS)
    assert mdn.get_content_type() == "multipart/report" and mdn.get_param("report-type") == "disposition-notification"
    fields = _disposition(mdn)
    assert "Disposition: automatic-action/MDN-sent-automatically; processed" in fields
    assert f"Final-Recipient: rfc822;{bench.world.patient_address}" in fields
    assert f"Original-Message-ID: {message['Message-ID']}" in fields
    assert str(mdn["Subject"]) == "Compte rendu" and mdn["Auto-Submitted"] == "auto-replied"
    [notification] = [m for m in await bench.inbox(bench.world.patient_address)
                      if str(m["Subject"]) == NOTIFICATION_SUBJECT]
    text = notification.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "VACCINATION" not in text.upper() and "Un nouveau document a été ajouté à votre dossier" in text


async def test_requested_mdn_on_failure_carries_the_code_and_the_ko_subject(bench: Bench) -> None:
    await bench.deliver(cda_message("sampleccd.xml", mdn_to=LAB_ADDRESS, subject="XDM/1.0/DDM+CCD DOE John"),
                        bench.world.patient_mailbox_id, "q1:1")
    await bench.worker().run_once()
    await bench.flush_generated()
    [mdn] = await bench.inbox(LAB_ADDRESS)
    assert str(mdn["Subject"]) == f"{KO_PREFIX}[903] XDM/1.0/DDM+CCD DOE John"
    assert "processed/Error: 903^INS absent du document" in _disposition(mdn)
    original = [p for p in mdn.walk() if p.get_content_type() == "message/rfc822"]
    assert len(original) == 1
    job = await bench.job("q1:1")
    assert (job.state, job.result_code) == ("not-filed", 903)
    [entry] = await RecordStore(bench.world.db, bench.world.blobs).quarantine()
    assert (entry.code, entry.attachment, entry.delivery_id) == (903, "sampleccd.xml", job.delivery_id)
    patient_inbox = await bench.inbox(bench.world.patient_address)
    assert [str(m["Subject"]) for m in patient_inbox] == ["XDM/1.0/DDM+CCD DOE John"]  # delivered; nothing filed, no notice


async def test_without_a_request_only_a_failure_is_reported(bench: Bench) -> None:
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml"), bench.world.patient_mailbox_id, "q1:1")
    await bench.deliver(cda_message("sampleccd.xml", subject="CCD"), bench.world.patient_mailbox_id, "q2:1")
    await bench.worker().run_once()
    await bench.flush_generated()
    [report] = await bench.inbox(LAB_ADDRESS)
    assert str(report["Subject"]) == f"{KO_PREFIX}[903] CCD"
    assert report.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in report.iter_attachments()] == ["message/rfc822"]


async def test_an_mdn_to_another_address_than_the_return_path_is_not_sent(bench: Bench) -> None:
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml", mdn_to=bench.world.doctor_address),
                        bench.world.patient_mailbox_id, "q1:1")
    await bench.worker().run_once()
    await bench.flush_generated()
    assert await bench.inbox(LAB_ADDRESS) == []
    assert await bench.inbox(bench.world.doctor_address) == []


async def test_sending_again_and_refiling_never_acknowledge_twice(bench: Bench) -> None:
    message = cda_message("VAC-NOTE_2023.01.xml", mdn_to=LAB_ADDRESS)
    await bench.deliver(message, bench.world.patient_mailbox_id, "q1:1")
    await bench.deliver(message, bench.world.doctor_mailbox_id, "q1:2")  # the doctor's copy: not the record's
    await bench.deliver(message, bench.world.patient_mailbox_id, "q2:1")  # the same message sent again
    worker = bench.worker()
    assert await worker.run_once() == 3
    await worker.refile((await bench.job("q1:1")).delivery_id)
    await bench.flush_generated()
    mdns = await bench.inbox(LAB_ADDRESS)
    final_recipients = sorted(line for m in mdns for line in _disposition(m).splitlines() if line.startswith("Final-Recipient"))
    assert final_recipients == [f"Final-Recipient: rfc822;{bench.world.patient_address}"]
    assert (await bench.job("q1:2")).state == "not-filed"
    patient_inbox = await bench.inbox(bench.world.patient_address)
    assert [str(m["Subject"]) for m in patient_inbox].count(NOTIFICATION_SUBJECT) == 1
    assert len(await RecordStore(bench.world.db, bench.world.blobs).list_for_patient(TEST_INS)) == 1
    async with bench.world.db.session() as session:
        assert len((await session.scalars(select(FilingNotice))).all()) == 2  # one MDN, one notice


async def test_a_job_left_received_or_examined_by_a_crash_is_finished_by_the_next_worker(bench: Bench) -> None:
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml"), bench.world.patient_mailbox_id, "q1:1")
    await bench.deliver(cda_message("LDL-SES_2022.01.xml"), bench.world.patient_mailbox_id, "q2:1")
    await bench.deliver(cda_message(SAMPLE_BIO), bench.world.patient_mailbox_id, "q3:1")
    crashed = bench.worker()
    assert await crashed.enqueue_deliveries() == 3  # the jobs exist; the worker "dies" before running them
    async with bench.world.db.session() as session:  # one was mid-run: examined, leased by the dead worker
        await session.execute(update(FilingJob).where(FilingJob.delivery_key == "q2:1").values(
            state=JobState.EXAMINED.value, attempts=1))
    async with bench.world.db.session() as session:  # and one delivery never got its job row at all
        await session.execute(FilingJob.__table__.delete().where(FilingJob.delivery_key == "q3:1"))
    survivor = bench.worker()
    await survivor.start()
    await survivor.stop()
    for key in ("q1:1", "q2:1", "q3:1"):
        assert (await bench.job(key)).state == "filed"
    assert len(await RecordStore(bench.world.db, bench.world.blobs).list_for_patient(TEST_INS)) == 3


SAMPLE_BIO = "BIO-CR-BIO_2021.01_Microbiologie_V1.xml"


async def test_the_safety_net_looks_at_new_deliveries_and_at_every_one_on_its_full_passes(bench: Bench) -> None:
    """Deliveries without a job (made by a path that does not create it) get one: those above the highest
    delivery the previous pass saw at every pass, any other at the first pass and the periodic full ones."""
    worker = bench.worker()
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml"), bench.world.patient_mailbox_id, "q1:1")
    assert await worker.enqueue_deliveries() == 1  # the first pass is a full one
    async with bench.world.db.session() as session:  # as if delivery 1 had committed late, under a lower id
        await session.execute(FilingJob.__table__.delete().where(FilingJob.delivery_key == "q1:1"))
    await bench.deliver(cda_message("LDL-SES_2022.01.xml"), bench.world.patient_mailbox_id, "q2:1")
    assert await worker.enqueue_deliveries() == 1  # only the new delivery: no scan of the whole table
    assert (await bench.job("q2:1")).state == "received"
    async with bench.world.db.session() as session:
        assert await session.scalar(select(FilingJob.id).where(FilingJob.delivery_key == "q1:1")) is None
    assert await worker.enqueue_deliveries(full=True) == 1  # the full pass finds it
    assert (await bench.job("q1:1")).state == "received"
    assert await worker.run_once() == 2
    assert (await bench.job("q1:1")).state == (await bench.job("q2:1")).state == "filed"


async def _sealed_body(bench: Bench, blob_id: str) -> bytes:
    """A delivered body as stored: an inline blob's row (a small message), else its blob file."""
    if not is_inline(blob_id):
        return bench.world.blobs.path(blob_id).read_bytes()
    async with bench.world.db.session() as session:
        return bytes(await session.scalar(select(InlineBlob.sealed).where(InlineBlob.blob_id == blob_id)))


async def _replace_sealed_body(bench: Bench, blob_id: str, sealed: bytes) -> None:
    if not is_inline(blob_id):
        bench.world.blobs.path(blob_id).write_bytes(sealed)
        return
    async with bench.world.db.session() as session:
        await session.execute(update(InlineBlob).where(InlineBlob.blob_id == blob_id).values(sealed=sealed))


async def test_transient_failures_are_retried_then_failed_and_refile_recovers(bench: Bench) -> None:
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml"), bench.world.patient_mailbox_id, "q1:1")
    async with bench.world.db.session() as session:
        delivery = await session.scalar(select(Delivery).where(Delivery.delivery_key == "q1:1"))
    assert delivery is not None
    folder = FolderRef(delivery.mailbox_id, "INBOX")
    [meta] = await bench.world.mailstore.fetch(folder, UidSet.of(delivery.uid))
    async with bench.world.db.session() as session:
        from gateway.mailstore.tables import Message
        blob_id = await session.scalar(select(Message.blob_id).where(Message.uid == meta.uid))
    intact = await _sealed_body(bench, str(blob_id))
    await _replace_sealed_body(bench, str(blob_id), intact[:-20])  # a damaged disk: the body no longer authenticates
    worker = bench.worker(max_attempts=2, retry_delays=(0,))
    await worker.run_once()
    assert (await bench.job("q1:1")).state == "received"  # deferred: due again at once (delay 0)
    await worker.run_once()
    job = await bench.job("q1:1")
    assert (job.state, job.attempts) == ("failed", 2) and "Blob" in (job.last_error or "")
    [entry] = await RecordStore(bench.world.db, bench.world.blobs).quarantine()
    assert entry.job_state == "failed"
    await _replace_sealed_body(bench, str(blob_id), intact)  # restored from backup
    assert (await worker.refile(job.delivery_id)).state == "filed"


async def test_a_message_expunged_before_filing_is_not_filed_with_the_reason(bench: Bench) -> None:
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml"), bench.world.patient_mailbox_id, "q1:1")
    folder = FolderRef(bench.world.patient_mailbox_id, "INBOX")
    from gateway.mailstore.interface import StoreMode
    await bench.world.mailstore.store_flags(folder, UidSet.of(1), StoreMode.ADD, ["\\Deleted"])
    await bench.world.mailstore.expunge(folder)
    await bench.worker().run_once()
    job = await bench.job("q1:1")
    assert job.state == "not-filed" and "before filing" in (job.last_error or "")


async def test_subject_attachment_names_and_titles_are_sealed_at_rest_and_opened_for_reading(bench: Bench) -> None:
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml", subject="Vaccination grippe"),
                        bench.world.patient_mailbox_id, "q1:1")
    await bench.deliver(cda_message("sampleccd.xml", subject="CCD DOE John"), bench.world.patient_mailbox_id, "q2:1")
    await bench.worker().run_once()
    async with bench.world.db.session() as session:
        stored = (await session.execute(select(FilingJob.subject, FilingJob.delivery_key))).all()
        titles = (await session.execute(text("SELECT title, type_display, event_codes FROM record_documents"))).all()
        attachments = (await session.execute(text("SELECT attachment FROM filing_outcomes"))).scalars().all()
    assert all(is_sealed(subject) for subject, _key in stored)
    assert all(is_sealed(title) and is_sealed(display) for title, display, _codes in titles) and titles
    assert all("VACCINATION" not in str(codes).upper() for _title, _display, codes in titles)
    assert all(is_sealed(name) for name in attachments if name is not None) and attachments
    store = RecordStore(bench.world.db, bench.world.blobs)
    [entry] = await store.quarantine()
    assert (entry.subject, entry.attachment) == ("CCD DOE John", "sampleccd.xml")
    [document] = await store.list_for_patient(TEST_INS)
    assert document.title and not is_sealed(document.title) and not is_sealed(document.type_display)
    assert isinstance(document.event_codes, list)


async def test_a_delegate_deposits_for_the_delegating_owner(bench: Bench) -> None:
    world = bench.world
    shared = await world.directory.create_mailbox(address=f"secretariat@{PRO_DOMAIN}", type="ORG", owner=world.lab_idnst)
    await world.directory.delegate(shared["address"], world.doctor_address, ["read", "send"])
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml"), world.patient_mailbox_id, "q1:1", sender=shared["address"],
                        login=world.doctor_address)
    await bench.worker().run_once()
    [document] = await RecordStore(world.db, world.blobs).list_for_patient(TEST_INS)
    assert (document.depositor_kind, document.depositor_id, document.depositor_organisations) == (
        "organisation", world.lab_idnst, [world.lab_idnst])
    assert (document.source_sender, document.submitted_by, document.source_door) == (
        shared["address"], world.doctor_address, "submission")
    assert document.author_idnps == "801234567897"  # the claimed author stays as metadata


@pytest.mark.parametrize(("door", "sender"), [("relay", LAB_ADDRESS), ("generated", "")])
async def test_nothing_is_filed_without_a_depositor_the_door_established(bench: Bench, door: str, sender: str) -> None:
    """A relay peer sending as one of our own mailboxes, or mail with a null sender, deposits nothing."""
    await bench.deliver(cda_message("VAC-NOTE_2023.01.xml"), bench.world.patient_mailbox_id, "q1:1", sender=sender,
                        door=door)
    await bench.worker().run_once()
    job = await bench.job("q1:1")
    assert (job.state, job.result_code) == ("not-filed", 906)
    assert await RecordStore(bench.world.db, bench.world.blobs).list_for_patient(TEST_INS) == []

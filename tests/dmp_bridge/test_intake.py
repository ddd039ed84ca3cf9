"""The filing job committed with its delivery (gateway.dmp_bridge.intake), through the queue's local delivery:
a plain copy for a professional's mailbox has its job ended at delivery, as the worker would have ended it
(nothing left for the worker, subject sealed); a copy for the patient's mailbox is filed by the worker."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.config import Settings
from gateway.dmp_bridge.intake import FilingIntake
from gateway.dmp_bridge.record import JOB_SUBJECT_COLUMN, RecordSealer
from gateway.dmp_bridge.tables import FilingJob, JobState
from gateway.dmp_bridge.worker import FilingWorker
from gateway.mailstore.delivery import LocalDelivery as StoreDelivery
from gateway.mailstore.notify import ChangeEvent, ChangeKind
from gateway.queue.local_delivery import LocalDeliveryWorker as QueueDelivery
from gateway.queue.tables import QueuedMessage, QueuedRecipient, RecipientState, RouteKind
from gateway.queue.store import QueueStore
from gateway.queue.spool import Spool
from gateway.security.at_rest import FieldSealer, is_sealed
from gateway.storage.db import Database
from tests.dmp_bridge.filing_world import LAB_ADDRESS, SAMPLES, World, build_world, cda_message

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")


async def _queue(world: World, spool: Spool, message: EmailMessage, mailbox_id: int, address: str) -> str:
    """A message as the pipeline leaves it after the 250: spool file durable, queue rows committed."""
    spool_file = spool.new_file()
    spool_file.write(message.as_bytes())
    await spool_file.make_durable()
    row = QueuedMessage(id=spool_file.queue_id, door="submission", sender=LAB_ADDRESS, size=spool_file.size,
                        trace_headers=f"Return-Path: <{LAB_ADDRESS}>\r\n", client_address="127.0.0.1",
                        authenticated_as=LAB_ADDRESS)
    recipient = QueuedRecipient(address=address, route=RouteKind.LOCAL.value, mailbox_id=mailbox_id,
                                domain=address.split("@", 1)[1], state=RecipientState.PENDING.value, attempts=0)
    await QueueStore(world.db).commit(row, [recipient], [])
    spool_file.keep()
    return spool_file.queue_id


async def _job(world: World, queue_id: str) -> FilingJob:
    async with world.db.session() as session:
        job = await session.scalar(select(FilingJob).where(FilingJob.delivery_key.startswith(f"{queue_id}:")))
    assert job is not None
    return job


async def test_jobs_are_committed_with_their_delivery(database: Database, settings: Settings, tmp_path: Path) -> None:
    world = await build_world(database, settings)
    spool = Spool(tmp_path / "spool")
    fields = FieldSealer(world.keys)
    delivery = QueueDelivery(QueueStore(world.db), spool, StoreDelivery(world.mailstore), authserv_id="localhost",
                             follow_up=FilingIntake(fields))
    plain = EmailMessage()
    plain["From"], plain["To"], plain["Subject"] = LAB_ADDRESS, world.doctor_address, "Résultats  de la semaine"
    plain["Message-ID"] = "<plain-1@lab.test>"
    plain.set_content("Bonjour, rien de joint.")
    to_doctor = await _queue(world, spool, plain, world.doctor_mailbox_id, world.doctor_address)
    to_patient = await _queue(world, spool, cda_message("VAC-NOTE_2023.01.xml"), world.patient_mailbox_id,
                              world.patient_address)
    await delivery.deliver_message(to_doctor)
    await delivery.deliver_message(to_patient)

    ended = await _job(world, to_doctor)
    assert (ended.state, ended.documents_filed, ended.finished_at is not None) == (JobState.NOT_FILED.value, 0, True)
    assert (ended.message_id, ended.sender, ended.recipient) == ("<plain-1@lab.test>", LAB_ADDRESS, world.doctor_address)
    assert ended.subject is not None and is_sealed(ended.subject)
    assert await RecordSealer(fields).open_for_mailbox(world.doctor_mailbox_id, JOB_SUBJECT_COLUMN,
                                                      ended.subject) == "Résultats de la semaine"
    assert (await _job(world, to_patient)).state == JobState.RECEIVED.value

    worker = FilingWorker(world.db, world.mailstore, world.blobs, acknowledger=None, hub=world.hub)
    assert await worker.run_once() == 1                    # only the patient's copy is left to examine
    assert (await _job(world, to_patient)).state == JobState.FILED.value
    assert not spool.path_of(to_doctor).exists() and not spool.path_of(to_patient).exists()


async def test_only_a_delivery_whose_job_is_due_wakes_the_filing_worker(database: Database, settings: Settings,
                                                                        tmp_path: Path) -> None:
    """The professional's plain copy (job ended at delivery) publishes no "delivered" change: the filing worker,
    which listens for those, is not woken for nothing; the patient's copy does."""
    world = await build_world(database, settings)
    spool = Spool(tmp_path / "spool")
    delivery = QueueDelivery(QueueStore(world.db), spool, StoreDelivery(world.mailstore), authserv_id="localhost",
                             follow_up=FilingIntake(FieldSealer(world.keys)))
    events: list[ChangeEvent] = []
    world.hub.add_forwarder(events.append)
    plain = EmailMessage()
    plain["From"], plain["To"], plain["Subject"] = LAB_ADDRESS, world.doctor_address, "Rien"
    plain.set_content("Bonjour, rien de joint.")
    await delivery.deliver_message(await _queue(world, spool, plain, world.doctor_mailbox_id, world.doctor_address))
    await delivery.deliver_message(await _queue(world, spool, cda_message("VAC-NOTE_2023.01.xml"),
                                                world.patient_mailbox_id, world.patient_address))
    exists = [(event.mailbox_id, event.delivered) for event in events if event.kind == ChangeKind.EXISTS]
    assert exists == [(world.doctor_mailbox_id, False), (world.patient_mailbox_id, True)]

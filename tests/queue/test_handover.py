"""Acceptance's hand-over to local delivery (gateway.queue.local_delivery.ReadyMessage): the committed rows and
the plaintext in memory are delivered as the spool would have given them, and a recipient closed between the
hand-over and the delivery (an administrator's command) is not delivered: the delivery transaction checks it
before writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, update

from gateway.config import Settings
from gateway.pipeline.acceptance import AcceptanceCommitter
from gateway.mailstore.delivery import LocalDelivery as StoreDelivery
from gateway.mailstore.interface import FolderRef
from gateway.queue.local_delivery import LocalDeliveryWorker, ReadyMessage
from gateway.queue.store import AcceptedRows, QueueStore
from gateway.queue.spool import Spool, SpoolFile
from gateway.queue.tables import QueuedMessage, QueuedRecipient, RecipientState
from gateway.storage.db import Database
from gateway.storage.models import utcnow
from tests.dmp_bridge.filing_world import World, build_world

BODY = b"From: a@lab.example\r\nSubject: handed over\r\nMessage-ID: <h-1@lab.example>\r\n\r\nbonjour\r\n"


def _rows(world: World, spool_file: SpoolFile) -> AcceptedRows:
    """The queue rows acceptance writes for BODY to the doctor."""
    message: dict[str, object] = dict(id=spool_file.queue_id, door="submission", sender="a@lab.example", envid=None,
                                      ret=None, body_type="7BIT", smtputf8=False, size=spool_file.size,
                                      message_id_header="<h-1@lab.example>", received_at=utcnow(),
                                      trace_headers="Return-Path: <a@lab.example>\r\n", authenticated_as=None,
                                      client_address="127.0.0.1", client_helo="lab", tls=None)
    recipient: dict[str, object] = dict(address=world.doctor_address, orcpt=None, notify=None, route="local",
                                        mailbox_id=world.doctor_mailbox_id, domain=world.doctor_address.split("@")[1],
                                        state="pending", attempts=0)
    return AcceptedRows(message, [recipient])


async def _accepted(world: World, spool: Spool) -> tuple[SpoolFile, AcceptedRows]:
    """A message as the pipeline leaves it after its 250: file durable, rows committed (their ids known)."""
    await StoreDelivery(world.mailstore).provision(world.doctor_mailbox_id)
    spool_file = spool.new_file()
    spool_file.write(BODY)
    await spool_file.make_durable()
    spool_file.keep()
    rows = _rows(world, spool_file)
    await world.db.run_in_transaction(lambda c: QueueStore.insert_accepted(c, [rows], []), write=True)
    return spool_file, rows


async def _inbox_count(world: World) -> int:
    status = await world.mailstore.status(FolderRef(world.doctor_mailbox_id, "INBOX"))
    return status.messages


async def test_a_handed_over_message_is_delivered_from_memory_and_its_spool_file_removed(
        database: Database, settings: Settings, tmp_path: Path) -> None:
    world = await build_world(database, settings)
    spool = Spool(tmp_path / "spool")
    delivery = LocalDeliveryWorker(QueueStore(world.db), spool, StoreDelivery(world.mailstore), authserv_id="localhost")
    spool_file, rows = await _accepted(world, spool)
    assert rows.recipient_ids
    before = await _inbox_count(world)
    delivery.schedule(rows.queue_id, ReadyMessage(QueueStore.local_works(rows, {world.doctor_mailbox_id: "PER"}),
                                                  spool_file.plaintext()))
    await delivery.deliver_message(rows.queue_id)
    assert await _inbox_count(world) == before + 1
    assert not spool.path_of(rows.queue_id).exists()
    async with world.db.session() as session:
        state = await session.scalar(select(QueuedRecipient.state).where(QueuedRecipient.id == rows.recipient_ids[0]))
    assert state == RecipientState.DELIVERED.value


async def test_a_recipient_closed_after_the_hand_over_is_not_delivered(database: Database, settings: Settings,
                                                                       tmp_path: Path) -> None:
    world = await build_world(database, settings)
    spool = Spool(tmp_path / "spool")
    delivery = LocalDeliveryWorker(QueueStore(world.db), spool, StoreDelivery(world.mailstore), authserv_id="localhost")
    spool_file, rows = await _accepted(world, spool)
    before = await _inbox_count(world)
    delivery.schedule(rows.queue_id, ReadyMessage(QueueStore.local_works(rows, {world.doctor_mailbox_id: "PER"}),
                                                  spool_file.plaintext()))
    async with world.db.session() as session:          # closed meanwhile (as `gateway queue delete` would)
        await session.execute(update(QueuedRecipient).where(QueuedRecipient.id == rows.recipient_ids[0])
                              .values(state=RecipientState.FAILED.value))
    await delivery.deliver_message(rows.queue_id)
    assert await _inbox_count(world) == before
    async with world.db.session() as session:
        state = await session.scalar(select(QueuedRecipient.state).where(QueuedRecipient.id == rows.recipient_ids[0]))
    assert state == RecipientState.FAILED.value




async def _accepted_in_row(world: World, spool: Spool) -> tuple[SpoolFile, AcceptedRows]:
    """A small message as acceptance commits it (gateway.pipeline.acceptance): sealed in its row, no file."""
    await StoreDelivery(world.mailstore).provision(world.doctor_mailbox_id)
    spool_file = spool.new_file()
    spool_file.write(BODY)
    rows = _rows(world, spool_file)
    await AcceptanceCommitter(spool, QueueStore(world.db)).commit([spool_file], [rows], [])
    spool_file.keep()
    assert spool_file.row_content is not None and not spool.path_of(spool_file.queue_id).exists()
    return spool_file, rows


class _RemovalsSeen:
    def __init__(self, spool: Spool) -> None:
        self.queue_ids: list[str] = []
        original = spool.remove

        def remove(queue_id: str) -> None:
            self.queue_ids.append(queue_id)
            original(queue_id)
        spool.remove = remove  # type: ignore[method-assign]


@pytest.mark.parametrize("handed_over", [True, False], ids=["handed-over", "read-from-its-row"])
async def test_a_message_kept_in_its_row_is_delivered_without_unlinking_a_spool_file(
        database: Database, settings: Settings, tmp_path: Path, handed_over: bool) -> None:
    world = await build_world(database, settings)
    spool = Spool(tmp_path / "spool", db=world.db)
    delivery = LocalDeliveryWorker(QueueStore(world.db), spool, StoreDelivery(world.mailstore), authserv_id="localhost")
    spool_file, rows = await _accepted_in_row(world, spool)
    removals = _RemovalsSeen(spool)
    before = await _inbox_count(world)
    # Handed over by acceptance, or found in its row (a restart, a retry): either way no file to remove.
    ready = ReadyMessage(QueueStore.local_works(rows, {world.doctor_mailbox_id: "PER"}), spool_file.plaintext(),
                         in_row=True) if handed_over else None
    delivery.schedule(rows.queue_id, ready)
    await delivery.deliver_message(rows.queue_id)
    assert await _inbox_count(world) == before + 1
    assert removals.queue_ids == []
    async with world.db.session() as session:
        state = await session.scalar(select(QueuedRecipient.state).where(QueuedRecipient.id == rows.recipient_ids[0]))
        content = await session.scalar(select(QueuedMessage.content).where(QueuedMessage.id == rows.queue_id))
    assert state == RecipientState.DELIVERED.value
    assert content is None                                    # the finishing statement cleared it


async def test_a_handed_over_message_with_a_spool_file_still_has_its_file_unlinked(
        database: Database, settings: Settings, tmp_path: Path) -> None:
    world = await build_world(database, settings)
    spool = Spool(tmp_path / "spool", db=world.db)
    delivery = LocalDeliveryWorker(QueueStore(world.db), spool, StoreDelivery(world.mailstore), authserv_id="localhost")
    spool_file, rows = await _accepted(world, spool)         # made durable as a file
    removals = _RemovalsSeen(spool)
    delivery.schedule(rows.queue_id, ReadyMessage(QueueStore.local_works(rows, {world.doctor_mailbox_id: "PER"}),
                                                  spool_file.plaintext(), in_row=False))
    await delivery.deliver_message(rows.queue_id)
    assert removals.queue_ids == [rows.queue_id]
    assert not spool.path_of(rows.queue_id).exists()

"""Local delivery of a message that was not handed over (recovery after a restart, a message scheduled again,
PostgreSQL): its due recipients and, for a small message, its sealed content in its queue row are read from
the database (on SQLite in one transaction, ``LocalDeliveryWorker._queued``), and it is delivered as accepted."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gateway.config import Settings
from gateway.mailstore.delivery import LocalDelivery as StoreDelivery
from gateway.mailstore.interface import FolderRef
from gateway.pipeline.acceptance import AcceptanceCommitter
from gateway.queue.local_delivery import LocalDeliveryWorker
from gateway.queue.spool import Spool
from gateway.queue.store import AcceptedRows, QueueStore
from gateway.queue.tables import QueuedMessage, QueuedRecipient, RecipientState
from gateway.security.at_rest import SpoolCipher
from gateway.storage.db import Database
from gateway.storage.models import utcnow
from tests.dmp_bridge.filing_world import build_world

BODY = b"From: a@lab.example\r\nSubject: queued in its row\r\nMessage-ID: <q-1@lab.example>\r\n\r\nbonjour\r\n"
TRACE = "Return-Path: <a@lab.example>\r\n"


async def test_a_message_in_its_queue_row_is_delivered_without_a_hand_over(
        database: Database, settings: Settings, tmp_path: Path) -> None:
    world = await build_world(database, settings)
    await StoreDelivery(world.mailstore).provision(world.doctor_mailbox_id)
    spool = Spool(tmp_path / "spool", SpoolCipher(7, os.urandom(32)), db=world.db)
    queue = QueueStore(world.db)
    spool_file = spool.new_file()
    spool_file.write(BODY)
    message: dict[str, object] = dict(id=spool_file.queue_id, door="submission", sender="a@lab.example", envid=None,
                                      ret=None, body_type="7BIT", smtputf8=False, size=spool_file.size,
                                      message_id_header="<q-1@lab.example>", received_at=utcnow(),
                                      trace_headers=TRACE, authenticated_as=None,
                                      client_address="127.0.0.1", client_helo="lab", tls=None)
    recipient: dict[str, object] = dict(address=world.doctor_address, orcpt=None, notify=None, route="local",
                                        mailbox_id=world.doctor_mailbox_id, domain=world.doctor_address.split("@")[1],
                                        state="pending", attempts=0)
    rows = AcceptedRows(message, [recipient])
    await AcceptanceCommitter(spool, queue).commit([spool_file], [rows], [])
    spool_file.keep()
    assert sorted(spool.root.rglob("*.eml")) == []             # in its row, no file

    delivery = LocalDeliveryWorker(queue, spool, StoreDelivery(world.mailstore), authserv_id="localhost")
    await delivery.deliver_message(rows.queue_id)              # nothing handed over: read from the queue

    inbox = FolderRef(world.doctor_mailbox_id, "INBOX")
    status = await world.mailstore.status(inbox)
    assert status.messages == 1
    async with await world.mailstore.open_message(inbox, status.uidnext - 1) as body:
        delivered = await body.read()
    assert delivered.startswith(TRACE.encode())                 # the trace fields, then the message as accepted
    assert delivered.endswith(BODY)
    async with world.db.session() as session:
        state = await session.scalar(select(QueuedRecipient.state).where(QueuedRecipient.id == rows.recipient_ids[0]))
        content = await session.scalar(select(QueuedMessage.content).where(QueuedMessage.id == rows.queue_id))
    assert state == RecipientState.DELIVERED.value
    assert content is None                                      # the finishing statement cleared the row

    await delivery.deliver_message(rows.queue_id)              # scheduled again: nothing due, nothing delivered
    assert (await world.mailstore.status(inbox)).messages == 1


async def test_messages_delivered_together_read_their_queue_rows_in_one_transaction(
        database: Database, settings: Settings, tmp_path: Path) -> None:
    """Messages not handed over whose deliveries start together (a restart's backlog, the workers a group
    commit lets go) read their rows together: in one transaction on SQLite, each exactly as alone, whether
    it is kept in its row or in a file, and one with nothing due is skipped as before."""
    world = await build_world(database, settings)
    await StoreDelivery(world.mailstore).provision(world.doctor_mailbox_id)
    spool = Spool(tmp_path / "spool", SpoolCipher(7, os.urandom(32)), db=world.db)
    queue = QueueStore(world.db)
    bodies = [BODY.replace(b"q-1@", f"q-{number}@".encode()) + b"x" * (70_000 if number == 3 else number)
              for number in range(6)]
    queued: list[AcceptedRows] = []
    for number, body in enumerate(bodies):
        spool_file = spool.new_file()
        spool_file.write(body)
        message: dict[str, object] = dict(id=spool_file.queue_id, door="submission", sender="a@lab.example",
                                          envid=None, ret=None, body_type="7BIT", smtputf8=False,
                                          size=spool_file.size, message_id_header=f"<q-{number}@lab.example>",
                                          received_at=utcnow(), trace_headers=TRACE, authenticated_as=None,
                                          client_address="127.0.0.1", client_helo="lab", tls=None)
        recipient: dict[str, object] = dict(address=world.doctor_address, orcpt=None, notify=None, route="local",
                                            mailbox_id=world.doctor_mailbox_id,
                                            domain=world.doctor_address.split("@")[1],
                                            state="delivered" if number == 5 else "pending", attempts=0)
        rows = AcceptedRows(message, [recipient])
        await AcceptanceCommitter(spool, queue).commit([spool_file], [rows], [])
        spool_file.keep()
        queued.append(rows)
    assert len(sorted(spool.root.rglob("*.eml"))) == 1         # the 70 kB one has a file, the others rows

    transactions = 0
    run = world.db.run_in_transaction

    async def counted(work: Any, *, write: bool = False) -> Any:
        nonlocal transactions
        transactions += 0 if write else 1
        return await run(work, write=write)

    world.db.run_in_transaction = counted                       # type: ignore[method-assign]
    delivery = LocalDeliveryWorker(queue, spool, StoreDelivery(world.mailstore), authserv_id="localhost")
    await asyncio.gather(*(delivery.deliver_message(rows.queue_id) for rows in queued))
    if world.db.is_sqlite:
        assert transactions == 1                                # six messages' rows, one read

    inbox = FolderRef(world.doctor_mailbox_id, "INBOX")
    status = await world.mailstore.status(inbox)
    assert status.messages == 5                                 # not the one with nothing due
    delivered = []
    for uid in range(status.uidnext - 5, status.uidnext):
        async with await world.mailstore.open_message(inbox, uid) as stored:
            delivered.append(await stored.read())
    assert sorted(delivered) == sorted(TRACE.encode() + body for body in bodies[:5])

"""Back-pressure from local delivery to acceptance (gateway.queue.local_delivery.LocalDeliveryWorker.wait_for_room).

A mail store that holds every delivery until the test lets it go stands for a
delivery side that has fallen behind: once ``backlog_limit`` messages wait, an
accepting session waits for room; it gets room as soon as one is delivered,
and 451 4.3.2 when none is delivered within ``backlog_wait_seconds``. Nothing
here depends on how fast the machine is: each step waits for the event it needs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import pytest

from gateway.mailstore.headers import CachedHeaders
from gateway.queue.local_delivery import AfterDelivery, LocalDeliveryWorker as LocalDelivery
from gateway.queue.store import LocalWork
from gateway.queue.spool import Spool
from gateway.mail.codes import MailRefusal
from gateway.storage.models import utcnow


class HeldStore:
    """Delivers a message only when the test releases its queue id."""

    shares_commits = False

    def __init__(self) -> None:
        self.released: dict[str, asyncio.Event] = {}
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.delivered: list[str] = []

    def release(self, queue_id: str) -> None:
        self.released.setdefault(queue_id, asyncio.Event()).set()

    async def deliver(self, mailbox_id: int, message: bytes | BinaryIO, *, delivery_key: str, folder: str = "INBOX",
                      headers: CachedHeaders | None = None, after: AfterDelivery | None = None) -> Any:
        queue_id = delivery_key.split(":", 1)[0]
        self.started.put_nowait(queue_id)
        await self.released.setdefault(queue_id, asyncio.Event()).wait()
        if after is not None:
            after(None, 1)  # type: ignore[arg-type]  # the fake queue ignores the connection
        self.delivered.append(queue_id)
        return type("Result", (), {"duplicate": False})()


class FakeQueue:
    """The queue rows of one local recipient per message."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.done: set[str] = set()
        # Local delivery reads a message not handed over through the claim (PostgreSQL's way) unless the
        # queue's database is SQLite (one transaction): this queue has no database, so the claim it is.
        self.db = SimpleNamespace(is_sqlite=False)

    async def local_work(self, queue_id: str | None = None, *, limit: int = 500) -> list[LocalWork]:
        if queue_id is None or queue_id in self.done:
            return []
        size = self.spool.path_of(queue_id).stat().st_size
        return [LocalWork(1, queue_id, 7, "claire@example.test", "Return-Path: <a@example.test>\r\n",
                          utcnow() - dt.timedelta(seconds=1), "a@example.test", size, "PER")]

    async def claim_local_work(self, queue_id: str, lease: dt.timedelta) -> list[LocalWork]:
        return await self.local_work(queue_id)          # one process: nothing to claim (as on SQLite)

    def delivered_in(self, connection: Any, recipient_id: int, queue_id: str) -> bool:
        self.done.add(queue_id)
        return True

    async def finish_if_done(self, queue_id: str) -> bool:
        return queue_id in self.done

    async def known_ids(self, ids: list[str]) -> set[str]:
        return set(ids)

    async def done_ids(self, ids: list[str]) -> set[str]:
        return set()

    async def queued_message_ids(self) -> set[str]:
        return set()


async def _spooled(spool: Spool) -> str:
    spool_file = spool.new_file()
    spool_file.write(b"Subject: hello\r\n\r\nbody\r\n")
    await spool_file.make_durable()
    spool_file.keep()
    return spool_file.queue_id


@pytest.fixture
async def held(tmp_path: Path) -> Any:
    spool = Spool(tmp_path / "spool")
    store = HeldStore()
    delivery = LocalDelivery(FakeQueue(spool), spool, store, authserv_id="gw.example.test",  # type: ignore[arg-type]
                             workers=4, backlog_limit=2, backlog_wait_seconds=30)
    await delivery.start()
    yield delivery, store, spool
    for queue_id in list(store.released) + [q for q in delivery._scheduled]:
        store.release(queue_id)
    await delivery.stop()


async def test_acceptance_waits_while_the_backlog_is_full_and_resumes_when_one_is_delivered(held: Any) -> None:
    delivery, store, spool = held
    first, second = await _spooled(spool), await _spooled(spool)
    delivery.schedule(first)
    await delivery.wait_for_room()                    # one waiting: below the bound, no wait
    delivery.schedule(second)
    assert {await store.started.get(), await store.started.get()} == {first, second}   # both held in the store
    assert delivery.backlog == 2

    waiter = asyncio.create_task(delivery.wait_for_room())
    await asyncio.sleep(0)
    assert not waiter.done()                          # the bound is reached: the session waits
    store.release(first)
    await asyncio.wait_for(waiter, 30)                # room as soon as one message is in its mailbox
    assert store.delivered == [first]
    assert not spool.path_of(first).exists()          # delivered: its spool file is gone
    assert delivery.backlog == 1


async def test_a_session_that_waits_too_long_is_answered_451_4_3_2(held: Any) -> None:
    delivery, store, spool = held
    delivery.backlog_wait = 0.05
    for _ in range(2):
        delivery.schedule(await _spooled(spool))
    await store.started.get()
    await store.started.get()
    with pytest.raises(MailRefusal) as refusal:
        await delivery.wait_for_room()
    assert (refusal.value.reply.code, refusal.value.reply.enhanced) == (451, "4.3.2")


async def test_no_bound_no_wait(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    store = HeldStore()
    delivery = LocalDelivery(FakeQueue(spool), spool, store, authserv_id="gw.example.test",  # type: ignore[arg-type]
                             backlog_limit=0)
    await delivery.start()
    try:
        for _ in range(5):
            delivery.schedule(await _spooled(spool))
        await delivery.wait_for_room()                # returns at once: 0 means no back-pressure
        assert delivery.backlog == 5
    finally:
        for queue_id in list(delivery._scheduled):
            store.release(queue_id)
        await delivery.stop()

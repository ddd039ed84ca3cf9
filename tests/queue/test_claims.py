"""Queue work claimed by one node at a time when several share a PostgreSQL database (row locks with
SKIP LOCKED and a lease another node takes over once it ends), and SQLite's one process unchanged."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from tests.harness import wait_until_async
from sqlalchemy import update

from gateway.queue.local_delivery import LocalDeliveryWorker
from gateway.queue.outbound_store import OutboundStore
from gateway.queue.spool import Spool
from gateway.queue.store import QueueStore
from gateway.queue.tables import QueuedMessage, QueuedRecipient, RouteKind
from gateway.queue.wake import QueueAnnouncer, QueueListener
from gateway.storage.db import Database
from gateway.storage.models import utcnow

LEASE = dt.timedelta(seconds=60)


async def _queue(db: Database, queue_id: str, route: RouteKind, recipients: int) -> None:
    async with db.session() as session:
        session.add(QueuedMessage(id=queue_id, door="submission", sender="a@example.org", size=10,
                                  trace_headers="", client_address="127.0.0.1"))
        for n in range(recipients):
            session.add(QueuedRecipient(message_id=queue_id, address=f"r{n}@example.org", route=route.value,
                                        domain="example.org"))


async def _expire_leases(db: Database) -> None:
    async with db.session() as session:
        await session.execute(update(QueuedRecipient).values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_message_is_claimed_by_one_node_until_its_lease_ends(database: Database) -> None:
    await _queue(database, "m1", RouteKind.LOCAL, 3)
    other_node = Database(database.url)
    try:
        nodes = [QueueStore(database), QueueStore(other_node)] * 4
        claims = await asyncio.gather(*(node.claim_local_work("m1", LEASE) for node in nodes))
        assert sorted(len(claim) for claim in claims) == [0] * 7 + [3]    # one node has the three, no other any
        assert await QueueStore(database).claim_local_work("m1", LEASE) == []
        assert await QueueStore(database).local_work() == []               # not due for the retry loop either
        await _expire_leases(database)                                     # the claiming node died: lease over
        taken_over = await QueueStore(other_node).claim_local_work("m1", LEASE)
        assert [work.address for work in taken_over] == ["r0@example.org", "r1@example.org", "r2@example.org"]
    finally:
        await other_node.dispose()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_sqlite_has_one_process_and_no_claim(database: Database) -> None:
    await _queue(database, "m1", RouteKind.LOCAL, 2)
    store = QueueStore(database)
    assert len(await store.claim_local_work("m1", LEASE)) == 2
    assert len(await store.claim_local_work("m1", LEASE)) == 2       # nothing moved: the scheduler dedups


async def test_outbound_recipients_are_claimed_once_across_nodes(database: Database) -> None:
    for n in range(5):
        await _queue(database, f"o{n}", RouteKind.REMOTE, 4)
    other_node = Database(database.url)
    try:
        nodes = [OutboundStore(database), OutboundStore(other_node)] * 3
        batches = await asyncio.gather(*(node.claim_due(lease=LEASE) for node in nodes))
        claimed = [r.id for node_batches in batches for batch in node_batches for r in batch.recipients]
        assert len(claimed) == 20 and len(set(claimed)) == 20
    finally:
        await other_node.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_node_without_workers_announces_what_it_queued(database: Database, tmp_path: Path) -> None:
    """``gateway serve --only smtp``: its local delivery schedules nothing itself, and the queue id reaches
    the listening (delivering) node at once instead of at its next look."""
    received: list[str] = []
    listener, announcer = QueueListener(database.url, received.append), QueueAnnouncer(database.url)
    await listener.start()
    await announcer.start()
    try:
        accepting = LocalDeliveryWorker(QueueStore(database), Spool(tmp_path / "spool"), None, authserv_id="localhost")
        accepting.delivers_here = False
        accepting.elsewhere = announcer.announce
        accepting.schedule("0193f2a4c1d2e3f4a5b6c7d8")
        await wait_until_async(lambda: True if received else None, timeout=10, what="the announcement received")
        assert received == ["0193f2a4c1d2e3f4a5b6c7d8"] and accepting.backlog == 0
    finally:
        await announcer.stop()
        await listener.stop()

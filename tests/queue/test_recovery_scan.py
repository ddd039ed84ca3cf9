"""The recovery pass finds the queued messages with local work due in one read (``QueueStore.with_local_work``):
exactly the messages ``local_work(queue_id, limit=1)`` finds work for, and the pass schedules those, in order."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from gateway.queue.local_delivery import LocalDeliveryWorker
from gateway.queue.spool import Spool
from gateway.queue.store import QueueStore
from gateway.queue.tables import QueuedMessage, QueuedRecipient, RecipientState, RouteKind
from gateway.storage.db import Database
from gateway.storage.models import utcnow

# (queue id, [(route, state, next attempt in seconds from now or None)])
CASES: list[tuple[str, list[tuple[RouteKind, RecipientState, int | None]]]] = [
    ("m01-pending", [(RouteKind.LOCAL, RecipientState.PENDING, None)]),
    ("m02-deferred-due", [(RouteKind.LOCAL, RecipientState.DEFERRED, -5)]),
    ("m03-deferred-later", [(RouteKind.LOCAL, RecipientState.DEFERRED, 600)]),
    ("m04-remote-only", [(RouteKind.REMOTE, RecipientState.PENDING, None)]),
    ("m05-delivered", [(RouteKind.LOCAL, RecipientState.DELIVERED, None)]),
    ("m06-failed-and-pending", [(RouteKind.LOCAL, RecipientState.FAILED, None),
                                (RouteKind.LOCAL, RecipientState.PENDING, -1)]),
    ("m07-no-recipient", []),
    ("m08-remote-and-later", [(RouteKind.REMOTE, RecipientState.PENDING, None),
                              (RouteKind.LOCAL, RecipientState.PENDING, 30)]),
]


async def _queued(database: Database) -> None:
    now = utcnow()
    async with database.session() as session:
        for queue_id, recipients in CASES:
            session.add(QueuedMessage(id=queue_id, door="submission", sender="a@example.org", size=10,
                                      trace_headers="", client_address="127.0.0.1"))
            for number, (route, state, after) in enumerate(recipients):
                session.add(QueuedRecipient(
                    message_id=queue_id, address=f"r{number}@example.org", route=route.value, state=state.value,
                    domain="example.org",
                    next_attempt_at=None if after is None else now + dt.timedelta(seconds=after)))


async def test_with_local_work_is_local_work_of_each_message(database: Database) -> None:
    await _queued(database)
    queue = QueueStore(database)
    ids = [queue_id for queue_id, _recipients in CASES] + ["m99-unknown"]
    one_by_one = {queue_id for queue_id in ids if await queue.local_work(queue_id, limit=1)}
    assert one_by_one == {"m01-pending", "m02-deferred-due", "m06-failed-and-pending"}
    assert await queue.with_local_work(ids) == one_by_one
    assert await queue.with_local_work([]) == set()


async def test_recovery_schedules_the_messages_with_local_work_in_order(database: Database, tmp_path: Path) -> None:
    await _queued(database)
    queue = QueueStore(database)
    scheduled: list[str] = []

    class Recording(LocalDeliveryWorker):
        def schedule(self, queue_id: str, ready: object = None) -> None:
            scheduled.append(queue_id)

    worker = Recording(queue, Spool(tmp_path / "spool"), None, authserv_id="gw.example")
    report = await worker.recover()
    assert scheduled == ["m01-pending", "m02-deferred-due", "m06-failed-and-pending"]
    assert report.scheduled == 3

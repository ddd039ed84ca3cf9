"""What claiming local work costs on PostgreSQL (several nodes) against reading it unclaimed (one node).

    PYTHONPATH=. python bench/queue_claims.py [messages]

Queues ``messages`` one-recipient local messages in a throwaway PostgreSQL cluster (tests/pg.py), then times
``QueueStore.local_work(queue_id)`` (what one node did before) and ``claim_local_work(queue_id, lease)`` (the
locked read plus the lease update, one more statement in the same transaction) for each, printing wall-clock
and this process's CPU per message. The server's own CPU is not counted: it runs in the cluster's processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time

from gateway.queue.store import QueueStore
from gateway.queue.tables import QueuedMessage, QueuedRecipient, RouteKind
from gateway.storage.db import Database
from tests.pg import start_cluster


async def main(count: int) -> None:
    cluster = start_cluster()
    url = await cluster.create_database()
    db = Database(url)
    try:
        await db.migrate()
        async with db.session() as session:
            for n in range(count):
                session.add(QueuedMessage(id=f"m{n:06d}", door="submission", sender="a@example.org", size=10,
                                          trace_headers="", client_address="127.0.0.1"))
                session.add(QueuedRecipient(message_id=f"m{n:06d}", address="r@example.org",
                                            route=RouteKind.LOCAL.value, domain="example.org"))
        store = QueueStore(db)
        for name, read in (("local_work (one node)", lambda q: store.local_work(q)),
                           ("claim_local_work (several)", lambda q: store.claim_local_work(q, dt.timedelta(seconds=1)))):
            wall, cpu = time.perf_counter(), time.process_time()
            for n in range(count):
                assert await read(f"m{n:06d}")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{name:28s} {wall / count * 1000:6.2f} ms wall, {cpu / count * 1000:6.2f} ms CPU per message")
    finally:
        await db.dispose()
        await cluster.drop_database(url)
        cluster.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))

"""How long the purge holds SQLite's write lock: N finished messages (one remote recipient, one attempt, one
outbound row each) purged in batches; prints the pass's wall and CPU time and the longest batch transaction.

    PYTHONPATH=. python bench/queue_purge.py --messages 20000 [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from gateway.app import open_services
from gateway.config import load_settings
from gateway.queue.outbound_tables import OutboundAttempt, OutboundMessage
from gateway.queue.tables import QueuedMessage, QueuedRecipient
from gateway.storage.models import utcnow


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _fill(db: Any, count: int) -> None:
    done_at = utcnow() - dt.timedelta(days=30)
    for start in range(0, count, 5000):
        ids = [f"bench{n:08d}" for n in range(start, min(count, start + 5000))]
        async with db.session() as s:
            await s.execute(insert(QueuedMessage), [
                {"id": i, "door": "submission", "sender": "a@b.test", "size": 4096, "trace_headers": "",
                 "client_address": "127.0.0.1", "state": "done", "done_at": done_at} for i in ids])
            await s.execute(insert(QueuedRecipient), [
                {"message_id": i, "address": "x@c.test", "route": "remote", "domain": "c.test", "state": "delivered"}
                for i in ids])
            await s.execute(insert(OutboundMessage), [{"message_id": i, "dkim_signature": "x" * 600} for i in ids])
        async with db.session() as s:
            from sqlalchemy import select
            rows = (await s.execute(select(QueuedRecipient.id).where(QueuedRecipient.message_id.in_(ids)))).all()
            await s.execute(insert(OutboundAttempt), [
                {"recipient_id": r[0], "outcome": "delivered", "reply": "250 2.0.0 ok " + "y" * 200} for r in rows])


async def main(count: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp), environ={},
                                 overrides={"retention": {"purge_batch_size": batch}})
        async with open_services(settings) as services:
            await _fill(services.db, count)
            durations: list[float] = []
            original = services.db.run_in_transaction

            async def timed(work: Any, *, write: bool = False) -> Any:
                began = time.perf_counter()
                try:
                    return await original(work, write=write)
                finally:
                    durations.append(time.perf_counter() - began)

            services.db.run_in_transaction = timed  # type: ignore[method-assign]
            cpu, wall = _cpu(), time.perf_counter()
            report = await services.queue.purge()
            cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    print(f"purged {report.messages} messages ({sum(report.count.removed.values())} rows) in {wall:.2f} s wall, "
          f"{cpu:.2f} s CPU ({cpu / max(report.messages, 1) * 1e3:.3f} ms CPU per message); "
          f"batch of {batch}: {len(durations)} transactions, median {sorted(durations)[len(durations) // 2] * 1e3:.0f} ms, "
          f"longest {max(durations) * 1e3:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.batch))

"""Deliveries per second into SQLite with and without the mail store's group commit.

Same work as bench/mailstore_append.py (4 KB messages, encrypted blob fsynced,
row committed with synchronous=FULL), run with concurrent deliverers, once with
``SqlMailStore.group`` (concurrent writers share one transaction and one WAL
fsync) and once with it switched off (one transaction per delivery, the
behaviour before group commit), alternating, in one process.

    .venv/bin/python bench/group_commit.py [--count 400] [--concurrency 4 16] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mailstore_append import make_mailbox, sample  # noqa: E402

from gateway.mailstore.delivery import LocalDelivery  # noqa: E402
from gateway.mailstore.sql import SqlMailStore  # noqa: E402
from gateway.security.keys import KeyManager  # noqa: E402
from gateway.storage.blobs import BlobStore  # noqa: E402
from gateway.storage.db import Database  # noqa: E402


async def run(count: int, concurrency: int, grouped: bool, directory: Path) -> dict[str, float]:
    database = Database(f"sqlite+aiosqlite:///{directory / 'bench.db'}")
    await database.migrate()
    store = SqlMailStore(database, BlobStore(directory / "blobs", KeyManager(database, directory / "keys")))
    if not grouped:
        store.group = None
    delivery = LocalDelivery(store)
    mailbox_id = await make_mailbox(database)
    await delivery.provision(mailbox_id)
    await delivery.deliver(mailbox_id, sample(0), delivery_key="warm-up")
    queue = iter(range(1, count + 1))

    async def worker() -> None:
        for number in queue:
            await delivery.deliver(mailbox_id, sample(number), delivery_key=f"bench-{number}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    per_commit = store.group.grouped / store.group.batches if store.group and store.group.batches else 1.0
    await database.dispose()
    return {"deliveries_per_s": round(count / elapsed, 1), "deliveries_per_commit": round(per_commit, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    results = []
    for concurrency in args.concurrency:
        for attempt in range(args.repeat):
            for grouped in (False, True):
                with tempfile.TemporaryDirectory() as scratch:
                    figures = asyncio.run(run(args.count, concurrency, grouped, Path(scratch)))
                results.append({"concurrency": concurrency, "group_commit": grouped, "attempt": attempt + 1, **figures})
                print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

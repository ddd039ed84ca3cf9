"""Deliveries per second of 4 KB messages into one mailbox, on SQLite with fsync on (synchronous=FULL).

Each delivery writes an encrypted blob (fsync of file and directory) and commits
its row (fsync of the WAL). Run: .venv/bin/python bench/mailstore_append.py [--count N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.sql import SqlMailStore
from gateway.security.keys import KeyManager
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Professional

BODY = b"Compte rendu de consultation. " * 140  # ~4 KB with headers


def sample(number: int) -> bytes:
    headers = (f"From: lab@demo.mssante.localhost\r\nTo: doc@demo.mssante.localhost\r\n"
               f"Subject: Resultat {number}\r\nMessage-ID: <{number}@bench>\r\n\r\n").encode()
    return headers + BODY


async def make_mailbox(database: Database) -> int:
    async with database.session() as session:
        professional = Professional(idnps="810000000001", id_type="RPPS", id_value="10000000001",
                                    family_name="Bench", profession_code="10", profession_label="Médecin")
        session.add(professional)
        await session.flush()
        mailbox = Mailbox(address="doc@demo.mssante.localhost", domain="demo.mssante.localhost", type="PER",
                          professional=professional, quota_bytes=0)
        session.add(mailbox)
        await session.flush()
        return mailbox.id


async def run(count: int, concurrency: int, directory: Path) -> float:
    database = Database(f"sqlite+aiosqlite:///{directory / 'bench.db'}")
    await database.migrate()
    delivery = LocalDelivery(SqlMailStore(database, BlobStore(directory / "blobs",
                                                             KeyManager(database, directory / "keys"))))
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
    await database.dispose()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="data directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.dir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        rate = asyncio.run(run(args.count, args.concurrency, directory))
    print(f"{args.count} deliveries of {len(sample(1))} octets, concurrency {args.concurrency}: {rate:.0f}/s")


if __name__ == "__main__":
    main()

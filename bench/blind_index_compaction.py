"""CPU of one blind-index compaction transaction (the time it holds the write lock), bounded by octets of
posting lists (``blind_index.COMPACT_BYTES``) against the earlier bound by tokens alone (``COMPACT_TOKENS``).

Synthetic: one mailbox whose TOKENS tokens each hold SEGMENTS small segments of IDS ids (what many folds of
a big mailbox leave before a compaction). Run: ``python bench/blind_index_compaction.py [DIR]``; prints the
process CPU of the first compaction transaction of each kind and how many segments it merged away.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

from gateway.mailstore import blind_index
from gateway.mailstore.tables import TokenPostings
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Professional

TOKENS, SEGMENTS, IDS = 256, 40, 1000


async def setup(path: Path) -> tuple[Database, int]:
    database = Database(f"sqlite+aiosqlite:///{path}")
    await database.migrate()
    async with database.session() as session:
        professional = Professional(idnps="80000000001", id_type="RPPS", id_value="00000000001", family_name="Bench",
                                    profession_code="10", profession_label="Médecin")
        session.add(professional)
        await session.flush()
        mailbox = Mailbox(address="bench@demo.mssante.localhost", domain="demo.mssante.localhost", type="PER",
                          professional=professional, quota_bytes=0)
        session.add(mailbox)
        await session.commit()
        mailbox_id = mailbox.id
    rows = [{"mailbox_id": mailbox_id, "token": token, "size": IDS,
             "ids": blind_index.pack(range(segment * IDS, (segment + 1) * IDS))}
            for token in range(TOKENS) for segment in range(SEGMENTS)]
    await database.run_in_transaction(lambda connection: blind_index._INSERT_POSTINGS.run_many(connection, rows),
                                      write=True)
    return database, mailbox_id


async def one_compaction(database: Database, mailbox_id: int, max_bytes: int | None) -> tuple[float, int]:
    async def total() -> int:
        async with database.session() as session:
            return int(await session.scalar(select(func.count()).select_from(TokenPostings)) or 0)
    before = await total()
    started = time.process_time()
    await database.run_in_transaction(lambda connection: blind_index.compact(
        connection, mailbox_id, max_segments=blind_index.MAX_SEGMENTS, limit=blind_index.COMPACT_TOKENS,
        max_bytes=max_bytes), write=True)
    spent = time.process_time() - started
    merged_rows = before - await total()
    return spent, merged_rows


async def main(directory: Path) -> None:
    for label, bound in (("tokens only (before)", None), ("COMPACT_BYTES (after)", blind_index.COMPACT_BYTES)):
        database, mailbox_id = await setup(directory / f"{label.split()[0]}.db")
        spent, merged = await one_compaction(database, mailbox_id, bound)
        print(f"{label}: {spent * 1000:.1f} ms CPU in the transaction, {merged} segments fewer "
              f"(each {IDS * blind_index.TOKEN_BYTES // 1024} KiB of ids)")
        await database.dispose()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(scratch)))

"""One node at a time: PostgreSQL advisory locks for the periodic jobs of ``gateway serve``.

Several nodes share one PostgreSQL database and each runs the same timers (crypto-shredding passes, ...).
A pass that must not run twice at once takes ``run_alone(db, name)`` first: a session-level
``pg_try_advisory_lock`` on a connection of its own, held for the pass and released after it, so one node
runs it and the others skip this turn (their next turn comes at their next tick). A node that dies while
holding it loses its connection, and PostgreSQL releases the lock with it. SQLite is one process: the lock
is always granted, with no statement run.

Schema migrations, which every node runs at start, wait for their lock instead (``migration_lock``): two
nodes starting together must not both create the same tables.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection

from gateway.storage.db import Database

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (advisory locks are keyed by bigint)."""
    return int.from_bytes(hashlib.blake2b(f"gateway:{name}".encode(), digest_size=8).digest(), "big", signed=True)


@asynccontextmanager
async def run_alone(db: Database, name: str) -> AsyncIterator[bool]:
    """True inside when this node holds the lock ``name`` (run the job), False when another node does."""
    if db.is_sqlite:
        yield True
        return
    key = lock_key(name)
    async with db.engine.connect() as conn:
        held = bool((await conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})).scalar())
        await conn.commit()                  # hold the lock, not a transaction, for the job's length
        try:
            yield held
        finally:
            if held:
                await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                await conn.commit()
    if not held:
        log.debug("%s: another node runs it now; skipped here", name)


def migration_lock(connection: Connection) -> None:
    """Inside the migrations' transaction on PostgreSQL: wait until no other node migrates (released at
    commit)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key("migrations")})

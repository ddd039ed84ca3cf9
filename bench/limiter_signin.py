"""Benchmark: the sign-in limiter's cost per attempt (issue 13: its counts in the database, shared by every node).

Three kinds of attempt, each ``--attempts`` times on one ``AuthLimiter`` built as ``gateway serve`` builds it
(a database, no audit sink: the audit log's cost is ``audit_append.py``'s):

- ``success``: ``check`` + ``succeeded`` of a clean login from a clean source (the IMAP/SMTP LOGIN hot path);
- ``failure``: ``check`` + ``failed`` of a wrong password (distinct logins and sources: never throttled);
- ``refused``: ``check`` of a (login, source) this node knows is waiting.

On a fresh SQLite file (the gateway's pragmas: WAL, synchronous=FULL) or on ``--database-url`` (an empty
PostgreSQL database). Prints, per kind, wall-clock µs and this process's CPU µs per attempt (all threads:
SQLite's statements run on a database thread), and the SQL statements run per attempt. Runs against whichever
tree is first on the path: ``PYTHONPATH=/path/to/tree python bench/limiter_signin.py`` for a before/after.

    .venv/bin/python bench/limiter_signin.py [--attempts N] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

from gateway.security.auth_limiter import AuthLimiter, AuthThrottled, LimiterPolicy
from gateway.storage.db import Database

POLICY = LimiterPolicy(failures_before_delay=3, source_failures_before_delay=1_000_000, first_delay=600,
                       max_delay=600, forget_after=3600)


def _count_statements(db: Database) -> list[int]:
    """Statements run, BEGIN/COMMIT aside: SQLAlchemy's events, and SQLite's trace callback on the one-hop
    engine's connections (``Prepared`` statements bypass SQLAlchemy there)."""
    counter = [0]

    def seen(statement: str) -> None:
        if statement.split(None, 1)[0].upper() not in {"BEGIN", "COMMIT", "ROLLBACK", "PRAGMA"}:
            counter[0] += 1

    event.listen(db.engine.sync_engine, "before_cursor_execute", lambda _c, _k, statement, *_: seen(statement))
    sync_engine = getattr(db, "_sync_engine", None)
    if sync_engine is not None:
        event.listen(sync_engine.pool, "checkout", lambda driver, *_: driver.set_trace_callback(seen))
        event.listen(sync_engine.pool, "checkin", lambda driver, *_: driver.set_trace_callback(None))
    return counter


async def _measure(name: str, attempts: int, attempt: Callable[[int], Awaitable[None]],
                   statements: list[int]) -> dict[str, Any]:
    before_statements = statements[0]
    wall, cpu = time.perf_counter(), time.process_time()
    for number in range(attempts):
        await attempt(number)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"kind": name, "attempts": attempts, "wall_us": round(wall / attempts * 1e6, 1),
            "cpu_us": round(cpu / attempts * 1e6, 1),
            "statements_per_attempt": round((statements[0] - before_statements) / attempts, 2)}


async def run(attempts: int, url: str | None) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}")
        await db.migrate()
        limiter = AuthLimiter(POLICY, db=db)
        load = getattr(limiter, "load", None)
        if load is not None:                       # the tree before issue 13's change read the counts at start
            await load()
        statements = _count_statements(db)

        async def success(number: int) -> None:
            login, source = f"doctor{number % 10}@x", f"198.51.100.{number % 10}"
            await limiter.check("imap", login, source)
            await limiter.succeeded("imap", login, source)

        async def failure(number: int) -> None:
            login, source = f"guess{number}@x", f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}"
            await limiter.check("imap", login, source)
            await limiter.failed("imap", login, source)

        for _ in range(3):
            await limiter.check("imap", "locked@x", "192.0.2.1")
            await limiter.failed("imap", "locked@x", "192.0.2.1")

        async def refused(_number: int) -> None:
            try:
                await limiter.check("imap", "locked@x", "192.0.2.1")
            except AuthThrottled:
                return
            raise AssertionError("the locked login went through")

        await success(0)                           # the pool's first connections
        results = [await _measure("success", attempts, success, statements),
                   await _measure("failure", attempts, failure, statements),
                   await _measure("refused", attempts, refused, statements)]
        await db.dispose()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    logging.getLogger("gateway.auth").setLevel(logging.ERROR)      # one warning per failure otherwise
    for line in asyncio.run(run(args.attempts, args.database_url)):
        print(json.dumps(line))


if __name__ == "__main__":
    main()

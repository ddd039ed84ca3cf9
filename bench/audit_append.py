"""Benchmark: audit log appends per second, then verification and export speed.

Runs on a fresh SQLite file in a temporary directory with the gateway's own
pragmas (WAL, synchronous=FULL: every append is one fsynced commit), or on
``--database-url`` (an empty database). Appends come from one task, then from
``--tasks`` concurrent tasks (they queue behind the chain head, so this shows
the cost of serialising, not parallel speed-up). Prints result lines and a
Markdown table row for docs/PERFORMANCE.md.

    .venv/bin/python bench/audit_append.py [--appends N] [--tasks N] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.audit import Actor, AuditEvent, AuditKey, AuditLog, Door, Source, Subject  # noqa: E402
from gateway.directory.identifiers import add_nir_key  # noqa: E402
from gateway.storage.db import Database  # noqa: E402

PATIENT = add_nir_key("1850775123456")
DOCTOR = Actor.professional("810001234567", "Dr Marie Durand", "10")


async def append_one(log: AuditLog, index: int) -> None:
    await log.append(AuditEvent.DOCUMENT_READ, actor=DOCTOR, patient=PATIENT,
                     subject=Subject.document(f"1.2.250.1.999.{index}"), source=Source(Door.FHIR, "192.0.2.10"),
                     details={"type": "11488-4", "index": index})


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def sequential(log: AuditLog, count: int, offset: int) -> None:
    for index in range(count):
        await append_one(log, offset + index)


async def concurrent(log: AuditLog, count: int, tasks: int, offset: int) -> None:
    async def worker(first: int) -> None:
        for index in range(first, count, tasks):
            await append_one(log, offset + index)

    await asyncio.gather(*(worker(first) for first in range(tasks)))


async def run(url: str, appends: int, tasks: int) -> None:
    db = Database(url)
    await db.migrate()
    log = AuditLog(db, AuditKey(b"b" * 32))
    try:
        one = await timed(lambda: sequential(log, appends, 0))
        many = await timed(lambda: concurrent(log, appends, tasks, appends))
        report_holder: list[object] = []
        verify = await timed(lambda: _collect(log.verify(), report_holder))
        export = await timed(lambda: log.export(io.StringIO()))
        total = 2 * appends
        print(f"database: {'SQLite (WAL, synchronous=FULL)' if db.is_sqlite else 'PostgreSQL'}; {platform.platform()}")
        print(f"sequential appends: {appends / one:,.0f}/s ({appends} in {one:.2f} s)")
        print(f"{tasks} concurrent tasks: {appends / many:,.0f}/s ({appends} in {many:.2f} s)")
        print(f"verify: {total / verify:,.0f} entries/s ({report_holder[0]})")
        print(f"export jsonl: {total / export:,.0f} entries/s")
        print(f"| audit append | {appends / one:,.0f}/s sequential, {appends / many:,.0f}/s with {tasks} tasks "
              f"| verify {total / verify:,.0f}/s | export {total / export:,.0f}/s |")
    finally:
        await db.dispose()


async def _collect(awaitable: Awaitable[object], holder: list[object]) -> None:
    report = await awaitable
    holder.append(getattr(report, "summary")())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=2000, help="appends per phase (default 2000)")
    parser.add_argument("--tasks", type=int, default=8, help="concurrent tasks in the second phase (default 8)")
    parser.add_argument("--database-url", help="an empty database (default: a temporary SQLite file)")
    args = parser.parse_args()
    if args.database_url:
        asyncio.run(run(args.database_url, args.appends, args.tasks))
        return
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}", args.appends, args.tasks))


if __name__ == "__main__":
    main()

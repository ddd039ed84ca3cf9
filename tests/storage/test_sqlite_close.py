"""A SQLite connection closed while it is being terminated ends, even when its close is cancelled.

What hung ``gateway serve`` for 40 minutes after SIGTERM: SQLAlchemy closes a connection invalidated by a
cancellation with ``shield(close())`` and, when that wait is cancelled, force-stops aiosqlite's worker thread.
The shielded ``close()`` then had its own wait cancelled and, in its ``finally``, queued a second stop
behind the first and awaited it: the thread had already left on the first, so that future was never
resolved and the task, its one cancellation spent, waited for ever (asyncio.run waits on it at exit).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite
from sqlalchemy import text

from gateway.storage.db import Database, SqliteConnection, sqlite_connector


async def _close_cancelled_after_terminate(connection: aiosqlite.Connection, wait: float) -> asyncio.Task[None]:
    closing = asyncio.create_task(connection.close())
    await asyncio.sleep(0)          # close() has queued the sqlite close and waits for the thread
    connection.stop()               # SQLAlchemy's force close (terminate) after a cancelled graceful close
    closing.cancel()                # asyncio.run cancels every task left at exit: once
    await asyncio.wait({closing}, timeout=wait)
    return closing


async def test_stock_aiosqlite_close_cancelled_after_stop_never_ends(tmp_path: Path) -> None:
    """The race itself, on aiosqlite's own connection: documents why ours exists (fails if aiosqlite fixes it)."""
    connection = aiosqlite.connect(tmp_path / "stock.db")
    connection._thread.daemon = True                 # do not hold the test run's exit
    await connection
    closing = await _close_cancelled_after_terminate(connection, 3)
    still_running = not closing.done()
    closing.cancel()                                  # free it (a second cancel reaches the stranded wait)
    await asyncio.wait({closing}, timeout=5)
    assert still_running, "aiosqlite no longer strands close(): SqliteConnection.stop may be removed"


async def test_our_connection_close_cancelled_after_stop_ends(tmp_path: Path) -> None:
    connection = await sqlite_connector(tmp_path / "ours.db")()
    assert isinstance(connection, SqliteConnection)
    closing = await _close_cancelled_after_terminate(connection, 30)
    assert closing.done(), "close() still waiting after its cancellation"
    assert not connection._thread.is_alive() or await _thread_ends(connection)


async def _thread_ends(connection: aiosqlite.Connection) -> bool:
    for _ in range(200):
        if not connection._thread.is_alive():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_database_uses_it_and_still_works(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    try:
        async with database.session() as session:
            assert (await session.execute(text("PRAGMA synchronous"))).scalar() == 2     # FULL, from the pragmas
            raw = await session.connection()
            driver = (await raw.get_raw_connection()).driver_connection
            assert isinstance(driver, SqliteConnection)
    finally:
        await database.dispose()

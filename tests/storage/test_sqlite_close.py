"""A SQLite connection closed while it is being terminated ends, even when its close is cancelled.

What hung ``gateway serve`` for 40 minutes after SIGTERM: SQLAlchemy closes a connection invalidated by a
cancellation with ``shield(close())`` and, when that wait is cancelled, force-stops aiosqlite's worker thread.
The shielded ``close()`` then had its own wait cancelled and, in its ``finally``, queued a second stop
behind the first and awaited it: the thread had already left on the first, so that future was never
resolved and the task, its one cancellation spent, waited for ever (asyncio.run waits on it at exit).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import traceback
from pathlib import Path

import aiosqlite
import pytest
from sqlalchemy import text

from gateway.storage.db import Database, RollbackOnClose, SqliteConnection, sqlite_connector


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
    """Whether the worker thread ends (a bound, not a timing: a loaded CI machine once took over 10 s);
    if it does not, where it is, so that a failure says why."""
    await asyncio.to_thread(connection._thread.join, 120)
    if connection._thread.is_alive():
        frame = sys._current_frames().get(connection._thread.ident or -1)
        raise AssertionError("worker thread still running:\n" + "".join(traceback.format_stack(frame)))
    return True


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


# A write transaction whose SELECT was executed but not fetched: what a statement cancelled between
# aiosqlite's execute and its fetch leaves behind (SQLAlchemy then invalidates and closes the connection).
# sqlite3_close_v2 made such a connection a zombie that kept the transaction, and the write lock, until the
# cursor was garbage-collected: after SIGTERM every writer waited out busy_timeout until the collector ran.

def _write_lock_is_free(path: Path) -> bool:
    other = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


async def _open_write_with_pending_select(path: Path) -> tuple[aiosqlite.Connection, aiosqlite.Cursor]:
    connection = await sqlite_connector(path)()
    await connection.execute("PRAGMA journal_mode=WAL")
    await connection.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    await connection.commit()
    await connection.execute("INSERT INTO t VALUES (1), (2)")      # the driver's implicit BEGIN: a write
    pending = await connection.execute("SELECT x FROM t")             # stepped once, never fetched
    assert not _write_lock_is_free(path)
    return connection, pending


@pytest.mark.parametrize("how", ["close", "stop"])
async def test_closing_a_connection_with_a_pending_statement_frees_the_write_lock(tmp_path: Path, how: str) -> None:
    path = tmp_path / "zombie.db"
    connection, pending = await _open_write_with_pending_select(path)
    if how == "close":
        await connection.close()                   # SQLAlchemy's graceful close of an invalidated connection
    else:
        stopped = connection.stop()                # its force close (terminate) when that close is cancelled
        assert stopped is not None
        await stopped
    assert _write_lock_is_free(path), "the closed connection still holds SQLite's write lock"
    assert pending is not None                    # still referenced, as in a cancelled task's traceback
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM t").fetchone() == (0,)   # rolled back, not committed
    check.close()


def test_the_one_hop_engine_connection_frees_the_write_lock_when_closed(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    try:
        assert database._sync_engine is not None
        raw = database._sync_engine.raw_connection()
        driver = raw.driver_connection
        assert isinstance(driver, RollbackOnClose)
        driver.execute("CREATE TABLE t (x INTEGER)")
        driver.execute("BEGIN IMMEDIATE")
        driver.execute("INSERT INTO t VALUES (1), (2)")
        pending = driver.execute("SELECT x FROM t")       # stepped once, never fetched
        driver.close()
        assert pending is not None
        assert _write_lock_is_free(tmp_path / "gateway.db")
        raw.invalidate()
    finally:
        asyncio.run(database.dispose())


async def test_closing_twice_in_the_worker_thread_still_ends_it(tmp_path: Path) -> None:
    """The race behind a CI failure: aiosqlite's close() queues the driver's close, its force stop() queues a
    second one; when the worker thread runs both before the event loop has forgotten the first, the second
    closes a closed connection. That must not raise, or the thread never leaves (it waited on its queue for
    ever, and the test above failed on a loaded machine)."""
    connection = await sqlite_connector(tmp_path / "twice.db")()
    driver = connection._conn
    done = asyncio.get_running_loop().create_future()
    connection._tx.put_nowait((done, driver.close))     # close()'s own close, not yet seen by the event loop
    stopping = connection.stop()                         # close_and_stop: the driver still set, closed again
    assert stopping is not None
    await asyncio.wait_for(stopping, 30)
    assert await _thread_ends(connection)
    driver.close()                                       # and once more, from here: a no-op

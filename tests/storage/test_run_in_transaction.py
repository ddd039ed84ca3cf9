"""``Database.run_in_transaction``: one synchronous transaction, in one hop (SQLite) or run_sync (PostgreSQL).

The same tests on both databases: a transaction commits when its work returns
and leaves nothing when it raises; concurrent writers that read then write
are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: the row lock they ask
for), so no increment is lost and none fails with "database is locked"; what
one engine commits, the other (the async sessions) reads; and a caller
cancelled while its transaction runs does not tear it in half.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from gateway.storage import db as db_module
from gateway.storage.db import Database, after_commit

pytestmark = pytest.mark.asyncio

_meta = MetaData()
COUNTERS = Table("rit_counters", _meta, Column("name", String(20), primary_key=True), Column("n", Integer, nullable=False))


async def _with_counter(database: Database) -> None:
    def create(conn: Connection) -> None:
        _meta.create_all(conn)
        conn.execute(COUNTERS.insert(), [{"name": "c", "n": 0}])
    await database.run_in_transaction(create, write=True)


def _read(conn: Connection) -> int:
    return int(conn.execute(select(COUNTERS.c.n).where(COUNTERS.c.name == "c")).scalar_one())


def _increment(conn: Connection) -> None:
    conn.execute(update(COUNTERS).where(COUNTERS.c.name == "c").values(n=COUNTERS.c.n + 1))


async def test_work_that_returns_is_committed_and_work_that_raises_leaves_nothing(database: Database) -> None:
    await _with_counter(database)

    def set_to(value: int) -> Callable[[Connection], None]:
        def work(conn: Connection) -> None:
            conn.execute(update(COUNTERS).values(n=value))
            if value < 0:
                raise ValueError("refused half-way")
        return work

    await database.run_in_transaction(set_to(7), write=True)
    with pytest.raises(ValueError, match="half-way"):
        await database.run_in_transaction(set_to(-1), write=True)
    assert await database.run_in_transaction(_read) == 7
    async with database.session() as session:  # the async engine sees what the other one committed
        assert (await session.execute(text("SELECT n FROM rit_counters"))).scalar_one() == 7


async def test_concurrent_read_then_write_transactions_lose_no_increment(database: Database) -> None:
    await _with_counter(database)

    def increment(conn: Connection) -> None:
        # Read, then write what was read plus one: without a write lock taken up
        # front, two of these interleave and one increment is lost (or SQLite
        # refuses the second writer's upgrade with SQLITE_BUSY).
        current = int(conn.execute(select(COUNTERS.c.n).where(COUNTERS.c.name == "c").with_for_update()).scalar_one())
        conn.execute(update(COUNTERS).where(COUNTERS.c.name == "c").values(n=current + 1))

    await asyncio.gather(*(database.run_in_transaction(increment, write=True) for _ in range(40)))
    assert await database.run_in_transaction(_read) == 40


async def test_a_cancelled_caller_leaves_its_transaction_whole(database: Database) -> None:
    await _with_counter(database)
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_pair(conn: Connection) -> None:
        conn.execute(update(COUNTERS).values(n=COUNTERS.c.n + 1))
        loop.call_soon_threadsafe(started.set)
        conn.execute(text("SELECT 1"))   # the second half, after the caller is cancelled
        conn.execute(update(COUNTERS).values(n=COUNTERS.c.n + 1))

    task = asyncio.create_task(database.run_in_transaction(slow_pair, write=True))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Either both increments or neither, never one: read until the thread's commit shows (SQLite) or for at most
    # two seconds (PostgreSQL rolls the cancelled transaction back: 0 throughout).
    deadline = time.monotonic() + 2
    while (value := await database.run_in_transaction(_read)) != 2 and time.monotonic() < deadline:
        assert value == 0
        await asyncio.sleep(0.01)
    assert value in (0, 2)


async def test_after_commit_actions_run_once_committed_and_never_after_a_rollback(database: Database) -> None:
    """``after_commit``: an action registered in a transaction runs after its commit (the committed rows are
    there to see); one registered in a transaction that raises never runs; outside a transaction: False."""
    await _with_counter(database)
    seen: list[str] = []
    committed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def note_committed() -> None:
        seen.append("committed")
        loop.call_soon_threadsafe(committed.set)

    def bump_then_note(conn: Connection) -> None:
        conn.execute(update(COUNTERS).where(COUNTERS.c.name == "c").values(n=COUNTERS.c.n + 1))
        assert after_commit(conn, note_committed)

    def note_then_fail(conn: Connection) -> None:
        conn.execute(update(COUNTERS).where(COUNTERS.c.name == "c").values(n=COUNTERS.c.n + 1))
        assert after_commit(conn, lambda: seen.append("rolled back"))
        raise RuntimeError("refused")

    await database.run_in_transaction(bump_then_note, write=True)
    await asyncio.wait_for(committed.wait(), 10)     # SQLite: right after the caller's answer, in its thread
    with pytest.raises(RuntimeError):
        await database.run_in_transaction(note_then_fail, write=True)
    assert await database.run_in_transaction(_read) == 1
    assert seen == ["committed"]
    assert after_commit(None, lambda: seen.append("nowhere")) is False  # type: ignore[arg-type]


async def test_a_failure_before_the_transaction_reaches_the_caller(database: Database,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever fails in the database thread before the transaction could report (here a wrapper of the
    wrong shape, as an outdated benchmark had) is raised to the caller, never a wait for ever."""
    if database._sync_threads is None:
        pytest.skip("PostgreSQL runs the work through run_sync: no database thread of ours")

    def wrong_shape(engine: object, work: object, write: bool) -> None:   # one argument short
        raise AssertionError("never called")

    monkeypatch.setattr(db_module, "_run_sync_transaction", wrong_shape)
    with pytest.raises(TypeError):
        await asyncio.wait_for(database.run_in_transaction(_read), timeout=30)


async def test_a_database_thread_keeps_its_connection_clean_between_transactions_and_dispose_closes_it(
        tmp_path: Path) -> None:
    """SQLite: a database thread keeps one connection from a transaction to the next (no pool checkout each
    time), holding no transaction in between: another process's writer gets the lock at once, our next
    transaction sees what it committed, and our writer waits for its lock (busy_timeout) instead of failing.
    A transaction that raises leaves it clean too; ``dispose`` closes it."""
    path = tmp_path / "kept.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await _with_counter(database)
        seen: list[Connection] = []             # the connection of each transaction

        def note(conn: Connection) -> int:
            seen.append(conn)
            return _read(conn)

        for _ in range(12):                     # one at a time: each may run on any of the threads
            await database.run_in_transaction(note)
        assert len({id(kept) for kept in seen}) <= db_module._SQLITE_THREADS
        assert len(seen) > db_module._SQLITE_THREADS   # so some connection served more than one transaction
        with pytest.raises(RuntimeError):
            await database.run_in_transaction(_bump_then_fail, write=True)

        other = sqlite3.connect(path, timeout=0)       # another process: a writer, never waiting
        other.execute("BEGIN IMMEDIATE")               # the lock is free: nothing of ours holds it
        other.execute("UPDATE rit_counters SET n = 41")
        writing = asyncio.ensure_future(database.run_in_transaction(_bump, write=True))
        await asyncio.sleep(0.3)
        assert not writing.done()                      # waits for the other writer's lock
        other.commit()
        await asyncio.wait_for(writing, 30)
        assert await database.run_in_transaction(_read) == 42
        other.close()
    finally:
        kept = list(database._thread_connections._open) if database._thread_connections else []
        await database.dispose()
    assert kept and all(connection.closed for connection in kept)


def _bump(conn: Connection) -> None:
    conn.execute(update(COUNTERS).where(COUNTERS.c.name == "c").values(n=COUNTERS.c.n + 1))


def _bump_then_fail(conn: Connection) -> None:
    _bump(conn)
    raise RuntimeError("refused")


async def test_a_begin_that_waits_out_the_lock_raises_sqlalchemys_operational_error(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE is said on the driver connection: a writer that waited out busy_timeout behind another
    process's writer still gets SQLAlchemy's OperationalError ("database is locked"), which the mail store's
    retries recognise (a DBAPIError), not the driver's own."""
    path = tmp_path / "locked.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    other = sqlite3.connect(path, timeout=0)
    try:
        assert database._sync_engine is not None
        with database._sync_engine.connect() as conn:
            conn.connection.driver_connection.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
            other.execute("BEGIN IMMEDIATE")
            conn.execution_options(sqlite_begin="IMMEDIATE")
            with pytest.raises(OperationalError, match="database is locked") as raised:
                conn.begin()
            assert isinstance(raised.value, DBAPIError) and isinstance(raised.value.orig, sqlite3.OperationalError)
            other.rollback()
            with conn.begin():                         # free again: the same connection begins
                conn.execute(text("SELECT 1"))
    finally:
        other.close()
        await database.dispose()


async def test_write_transactions_queue_at_the_writer_gate_and_go_the_moment_it_opens(tmp_path: Path) -> None:
    """SQLite: a write transaction takes the ``<database>-writer`` flock before its BEGIN IMMEDIATE, so writers
    of every process queue in the kernel and one goes as soon as the other lets go, instead of SQLite's busy
    handler sleeping 1, 2, 5 ... 100 ms between tries (and missing the lock to a writer committing batch after
    batch). Another process holding the gate (here another open file of it, as another process would have):
    our writer waits though SQLite's own lock is free; it commits once the gate is released. Reads never wait."""
    import fcntl
    import os

    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'gate.db'}")
    try:
        await database.migrate()
        await _with_counter(database)
        other = os.open(tmp_path / "gate.db-writer", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(other, fcntl.LOCK_EX)
        try:
            writing = asyncio.ensure_future(database.run_in_transaction(_increment, write=True))
            assert await asyncio.wait_for(database.run_in_transaction(_read), timeout=30) == 0  # a read goes by
            done, _ = await asyncio.wait({writing}, timeout=1.0)
            assert not done, "the write went through while another writer held the gate"
        finally:
            fcntl.flock(other, fcntl.LOCK_UN)
            os.close(other)
        await asyncio.wait_for(writing, timeout=30)
        assert await database.run_in_transaction(_read) == 1
    finally:
        await database.dispose()

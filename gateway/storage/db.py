"""The database handle: async engine, sessions, migrations.

SQLite is the embedded default (one file under the data directory, WAL,
synchronous=FULL so a committed transaction survives a power cut); PostgreSQL
is used by URL. Both run the same Alembic migrations and the same tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from gateway.storage.private import create_private_file, private_dir

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

T = TypeVar("T")

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; FULL fsyncs every commit (a 250
    # after DATA promises durability); busy_timeout turns lock contention into
    # a bounded wait instead of an immediate "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_sync_connect(dbapi_connection: Any, record: Any) -> None:
    # pysqlite's own implicit BEGIN is turned off: the "begin" listener below
    # says BEGIN or BEGIN IMMEDIATE itself, so a writer takes the write lock
    # first and waits on busy_timeout instead of failing with SQLITE_BUSY when
    # it upgrades a read snapshot another writer has moved past.
    dbapi_connection.isolation_level = None
    _sqlite_pragmas(dbapi_connection, record)


_BEGIN = {"DEFERRED": "BEGIN DEFERRED", "IMMEDIATE": "BEGIN IMMEDIATE"}


def _sqlite_sync_begin(connection: Connection) -> None:
    # Said on the driver connection itself: through ``exec_driver_sql`` (an execution context, a cursor
    # wrapped and closed, its events) the BEGIN cost more than the one-hop transaction's other plumbing.
    # Its errors raised as SQLAlchemy's (a BEGIN IMMEDIATE that waited out busy_timeout: OperationalError
    # "database is locked", which the mail store's retries look for), as ``exec_driver_sql`` raised them.
    mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
    statement = _BEGIN.get(mode) or f"BEGIN {mode}"
    driver: Any = connection.connection.driver_connection
    try:
        driver.execute(statement)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc


class RollbackOnClose(sqlite3.Connection):
    """SQLite's driver connection, rolling back an open transaction before it closes.

    ``sqlite3_close_v2`` leaves a connection that still has an unfinalized statement as a "zombie" that keeps
    its transaction, and with it SQLite's write lock, until the last statement is finalized: in Python, until
    the cursor holding it is garbage-collected. A statement cancelled between its execute and its fetch (an
    SMTP client hanging up) leaves such a cursor in the cancelled task's traceback, a reference cycle that
    only the cycle collector frees; SQLAlchemy closes that invalidated connection, and every writer after it
    then waited out busy_timeout, over and over, until some allocation ran the collector: ``gateway serve``
    did not end within 60 s of SIGTERM. A rollback first ends the transaction whatever is left pending.
    """

    def close(self) -> None:
        try:
            if self.in_transaction:
                self.rollback()
        except sqlite3.ProgrammingError:
            # Closed already: aiosqlite's close() and its force stop() may both close it, the second in the
            # worker thread before the event loop forgets the first. Raising here kept that thread from ever
            # leaving (its stop ends it only when the close returns), so closing again must be a no-op.
            pass
        finally:
            super().close()


class SqliteConnection(aiosqlite.Connection):
    """aiosqlite's connection with a ``stop()`` that queues its worker thread's exit once.

    SQLAlchemy closes a connection invalidated by a cancellation with ``shield(close())`` and, when that
    wait is cancelled, force-stops the worker thread (``stop()``). The shielded ``close()`` then had its wait
    cancelled too and, in its ``finally``, called ``stop()`` again and awaited it: queued behind the first
    stop, which the thread had already left on, that future was never resolved, and the task, its one
    cancellation spent, waited for ever; asyncio.run waits for every task at exit, so ``gateway serve`` hung
    after SIGTERM. A second ``stop()`` now returns the first one's future, which the thread does resolve.
    """

    _stopping: asyncio.Future[Any] | None = None
    _stop_queued = False

    def stop(self) -> asyncio.Future[Any] | None:
        if not self._stop_queued:
            self._stop_queued = True
            self._stopping = super().stop()
        return self._stopping


def sqlite_connector(path: Path) -> Callable[[], SqliteConnection]:
    """What SQLAlchemy's ``async_creator`` calls: our connection, as ``aiosqlite.connect`` would build it."""
    def connect() -> SqliteConnection:
        connection = SqliteConnection(
            lambda: sqlite3.connect(str(path), check_same_thread=False, factory=RollbackOnClose), iter_chunk_size=64)
        connection._thread.daemon = True    # as SQLAlchemy's dialect sets it: an unclosed one never holds exit
        return connection
    return connect


async def _end_session(session: AsyncSession, *, commit: bool) -> None:
    try:
        if commit:
            await session.commit()
        else:
            await session.rollback()
    finally:
        await session.close()


async def _run_to_its_end(step: Awaitable[None]) -> None:
    """Await ``step`` in a task of its own: if the caller is cancelled meanwhile, the caller sees the
    cancellation and the step still runs to its end (``gateway serve`` waits for such tasks at exit)."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_failure_of_abandoned)
        raise


def _log_failure_of_abandoned(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("ending the database session of a cancelled task failed: %r", task.exception())


class Database:
    """Owns the engine; hands out sessions; runs migrations."""

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        path = url.split("///", 1)[1] if self.is_sqlite and "///" in url else ""
        self.sqlite_file: str | None = path if path and path != ":memory:" else None   # a SQLite file's path
        if self.is_sqlite:
            if path and path != ":memory:":
                # The database file 0600 before SQLite opens it: its -wal and -shm take the file's mode.
                private_dir(Path(path).parent)
                create_private_file(Path(path))
            on_disk = bool(path) and path != ":memory:"
            # A file database keeps its connections open: the default pool (5, overflow 10) closed every
            # connection beyond the fifth when it came back, and each new one cost a thread, an open, four
            # PRAGMAs and a parse of the schema (0.6 per message accepted and delivered under load).
            pooling: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size} if on_disk else {}
            self.engine: AsyncEngine = create_async_engine(
                url, echo=echo, async_creator=sqlite_connector(Path(path)) if on_disk else None, **pooling)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(url, echo=echo, pool_size=pool_size, pool_pre_ping=True)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite on a file: a synchronous engine beside the async one, whose
        # transactions run whole in one hop to a worker thread (run_in_transaction).
        self._sync_engine: Engine | None = None
        self._sync_threads: ThreadPoolExecutor | None = None
        self._thread_connections: _ThreadConnections | None = None
        self._writer_gate: WriterGate | None = None       # write transactions queue for SQLite's lock here
        if self.is_sqlite and path and path != ":memory:":
            self._sync_engine = create_engine(
                f"sqlite:///{path}", echo=echo, poolclass=QueuePool, pool_size=_SQLITE_THREADS,
                max_overflow=0, connect_args={"check_same_thread": False, "factory": RollbackOnClose})
            event.listen(self._sync_engine, "connect", _sqlite_sync_connect)
            event.listen(self._sync_engine, "begin", _sqlite_sync_begin)
            self._sync_threads = ThreadPoolExecutor(_SQLITE_THREADS, thread_name_prefix="sqlite")
            self._thread_connections = _ThreadConnections(self._sync_engine)
            self._writer_gate = WriterGate(Path(path))

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error.

        The commit or rollback, and the return of the connection, run in a task of their own that a
        cancellation of the caller does not interrupt (as ``run_in_transaction``'s thread): a task cancelled
        mid-transaction (an SMTP client hanging up is cancelled twice, at its EOF and at the connection's
        loss) had its rollback cut short, which logged a traceback and, on SQLite, could leave the write lock
        held by a connection back in the pool."""
        session = self.sessions()
        succeeded = False
        try:
            await session.begin()
            yield session
            succeeded = True
        finally:
            await _run_to_its_end(_end_session(session, commit=succeeded))

    async def run_in_transaction(self, work: Callable[[Connection], T], *, write: bool = False) -> T:
        """Run ``work`` as one transaction: committed if it returns, rolled back if it raises.

        On a SQLite file the whole of ``work`` runs in one hop to a database
        thread over a synchronous connection, instead of one thread hop (and
        event-loop wake-up) per statement through aiosqlite; ``write=True``
        starts it with BEGIN IMMEDIATE, so it queues for SQLite's one write
        lock up front. ``work`` must not touch the event loop: build its inputs
        before, publish its results after. On PostgreSQL (and in-memory
        SQLite) it runs through ``AsyncConnection.run_sync`` on the async
        engine, with the same synchronous ``Connection`` interface.

        A cancelled caller does not cancel the thread: the transaction still
        commits or rolls back as a whole, as a client that went away after its
        DATA was sent would leave it.
        """
        if self._sync_engine is None or self._sync_threads is None or self._thread_connections is None:
            actions: list[Callable[[], None]] = []
            async with self.engine.begin() as conn:
                result = await conn.run_sync(_collecting(work, actions))
            _run_after_commit(actions)
            return result
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()
        submitted = self._sync_threads.submit(
            _run_sync_transaction, self._thread_connections, self._writer_gate, work, write,
            lambda result, error: loop.call_soon_threadsafe(_settle, outcome, result, error))
        submitted.add_done_callback(partial(_settle_if_it_failed, loop, outcome))
        return await outcome

    async def migrate(self, revision: str = "heads") -> None:
        """Bring the schema to ``revision`` (default: the newest of every branch).

        Areas may add their revisions as branches off a common base while they
        are developed side by side; ``heads`` applies all of them.
        """
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade, revision)

    async def current_revision(self) -> str | None:
        """The applied revision(s), comma-separated when several branches are applied."""
        async with self.engine.connect() as conn:
            heads = await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_heads())
        return ",".join(sorted(heads)) or None

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._sync_threads is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._sync_threads.shutdown, True)
        if self._thread_connections is not None:
            self._thread_connections.close()          # the threads are done: their kept connections go back
        if self._writer_gate is not None:
            self._writer_gate.close()
        if self._sync_engine is not None:
            self._sync_engine.dispose()


# Threads (and pooled connections) for SQLite's one-hop transactions: one writer
# at a time holds the lock; the others read beside it in WAL.
_SQLITE_THREADS = 4


class _ThreadConnections:
    """One pooled connection per database thread, kept from one ``run_in_transaction`` to the next.

    Checking a connection out of the pool and back for every transaction (a ``Connection`` built, the pool's
    events, its reset-on-return ROLLBACK) cost more than the rest of a one-hop transaction's plumbing. The
    kept connection is the pool's own, opened as any other (WAL, busy_timeout, synchronous=FULL:
    ``_sqlite_pragmas``), so it waits for other processes' writers as before, and between transactions it
    holds no transaction (each ends in its COMMIT or ROLLBACK). One that is invalidated, or still in a
    transaction after its rollback, is closed (``RollbackOnClose``) and replaced at the next use; ``close``
    closes them all (``Database.dispose``, once the threads are done)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[Connection] = set()

    def take(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self.engine.connect()
            self._local.connection = connection
            with self._lock:
                self._open.add(connection)
        return connection

    def settle(self, connection: Connection) -> None:
        """After a failed transaction: a connection not left clean is closed (a new one next time)."""
        driver = None if connection.invalidated or connection.closed else connection.connection.driver_connection
        if driver is not None and not getattr(driver, "in_transaction", False):
            return
        self._forget(connection)
        try:
            connection.close()
        except Exception:  # noqa: BLE001  (it is dropped either way)
            log.warning("closing a failed database connection failed", exc_info=True)

    def _forget(self, connection: Connection) -> None:
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._open.discard(connection)

    def close(self) -> None:
        with self._lock:
            kept, self._open = list(self._open), set()
        for connection in kept:
            try:
                connection.close()
            except Exception:  # noqa: BLE001
                log.warning("closing a database connection failed", exc_info=True)


class WriterGate:
    """SQLite's one write lock, queued for in the kernel rather than by SQLite's busy handler.

    SQLite's busy handler polls: a writer that finds the lock taken sleeps 1, 2, 5, 10, ... 100 ms between
    tries, whenever the lock is freed meanwhile, and under a steady load a writer that commits batch after
    batch (acceptance's group commit, delivery's) takes it again before the sleeper wakes: single waits of 330
    ms in one process and 650 ms with an acceptor process beside it were measured, most of a second of
    waiting per second of load. ``run_in_transaction``'s write transactions therefore take an exclusive
    ``flock`` on ``<database>-writer`` before their BEGIN IMMEDIATE: a waiter is woken the moment the holder
    lets go, whether it is in this process (each database thread has its own open file, and flock locks
    belong to open files) or in another one on the same database (acceptor processes, the CLI). The kernel
    releases it with a process that dies. Writers that do not take it (aiosqlite sessions) still meet
    SQLite's busy handler, as before; the gate only decides the order of those that do.
    """

    def __init__(self, database_file: Path) -> None:
        self.path = database_file.with_name(database_file.name + "-writer")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._files: list[int] = []

    @contextmanager
    def held(self) -> Iterator[None]:
        descriptor = self._descriptor()
        fcntl.flock(descriptor, fcntl.LOCK_EX)          # blocks in the kernel (the GIL released meanwhile)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)

    def _descriptor(self) -> int:
        descriptor: int | None = getattr(self._local, "descriptor", None)
        if descriptor is None:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._local.descriptor = descriptor
            with self._lock:
                self._files.append(descriptor)
        return descriptor

    def close(self) -> None:
        """Once the database threads are done (``Database.dispose``)."""
        with self._lock:
            files, self._files = self._files, []
        for descriptor in files:
            os.close(descriptor)


def _run_sync_transaction(connections: _ThreadConnections, gate: WriterGate | None, work: Callable[[Connection], T],
                          write: bool, report: Callable[[T | None, BaseException | None], object]) -> None:
    """In a database thread: the transaction, its outcome reported to the event loop, then (committed) the
    ``after_commit`` actions, in the same hop but after the caller has its answer (an unlink can wait on the
    file system's journal: it must not delay the group commit behind it). A write transaction passes the
    ``WriterGate`` first and holds it to its COMMIT or ROLLBACK."""
    actions: list[Callable[[], None]] = []
    connection = connections.take()
    try:
        connection.execution_options(sqlite_begin="IMMEDIATE" if write else "DEFERRED")
        with gate.held() if write and gate is not None else nullcontext():
            with connection.begin():
                result = _collecting(work, actions)(connection)
    except BaseException as exc:  # noqa: BLE001  (handed to the caller as it is)
        connections.settle(connection)
        report(None, exc)
        return
    report(result, None)
    _run_after_commit(actions)


def _settle_if_it_failed(loop: asyncio.AbstractEventLoop, outcome: asyncio.Future[T],
                         submitted: concurrent.futures.Future[None]) -> None:
    """A failure before ``_run_sync_transaction`` could report (a wrong call) reaches the caller too, instead
    of leaving it waiting for ever (a benchmark's outdated wrapper hung the filing worker so)."""
    if not submitted.cancelled() and submitted.exception() is not None:
        loop.call_soon_threadsafe(_settle, outcome, None, submitted.exception())


def _settle(outcome: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if outcome.done():                         # the caller was cancelled: the transaction ended all the same
        return
    if error is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(result)  # type: ignore[arg-type]


_AFTER_COMMIT = "gateway.after_commit"


def after_commit(connection: Connection, action: Callable[[], None]) -> bool:
    """Run ``action`` once the transaction ``connection`` is in has committed; never if it rolls back.

    For ``run_in_transaction`` work only (it collects them): on a SQLite file the actions run in the
    same database thread right after the commit, so a clean-up that must follow the commit (unlinking a
    spool file whose message is done) costs no thread hop of its own; on PostgreSQL, on the event loop
    after the commit. Keep them short and synchronous; an action's error is logged, never raised (the
    transaction is committed whatever it does). False, and nothing done, outside ``run_in_transaction``
    (the caller then acts itself once it knows the commit happened)."""
    info = getattr(connection, "info", None)
    actions = info.get(_AFTER_COMMIT) if info is not None else None
    if actions is None:
        return False
    actions.append(action)
    return True


def _collecting(work: Callable[[Connection], T], actions: list[Callable[[], None]]) -> Callable[[Connection], T]:
    def collecting(connection: Connection) -> T:
        connection.info[_AFTER_COMMIT] = actions
        try:
            return work(connection)
        finally:
            # (the info dict is the pooled connection's: kept across checkouts. An invalidated one, as a
            # cancellation leaves it on PostgreSQL, is thrown away, and touching it would raise over the
            # cancellation.)
            if not connection.invalidated:
                connection.info.pop(_AFTER_COMMIT, None)
    return collecting


def _run_after_commit(actions: list[Callable[[], None]]) -> None:
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("an action after a committed transaction failed")


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str | None:
    """The newest revision(s) this version knows, comma-separated when there are branches."""
    return ",".join(sorted(ScriptDirectory.from_config(alembic_config()).get_heads())) or None


def _upgrade(connection: Connection, revision: str) -> None:
    from gateway.storage.advisory import migration_lock

    migration_lock(connection)          # several nodes starting together migrate one after the other
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)

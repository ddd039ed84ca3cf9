"""The database handle: async engine, sessions, migrations.

SQLite is the embedded default (one file under the data directory, WAL,
synchronous=FULL so a committed transaction survives a power cut); PostgreSQL
is used by URL. Both run the same Alembic migrations and the same tests.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from gateway.storage.private import create_private_file, private_dir

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


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
        connection = SqliteConnection(lambda: sqlite3.connect(str(path), check_same_thread=False), iter_chunk_size=64)
        connection._thread.daemon = True    # as SQLAlchemy's dialect sets it: an unclosed one never holds exit
        return connection
    return connect


class Database:
    """Owns the engine; hands out sessions; runs migrations."""

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                # The database file 0600 before SQLite opens it: its -wal and -shm take the file's mode.
                private_dir(Path(path).parent)
                create_private_file(Path(path))
            self.engine: AsyncEngine = create_async_engine(
                url, echo=echo, async_creator=sqlite_connector(Path(path)) if path and path != ":memory:" else None)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(url, echo=echo, pool_size=pool_size, pool_pre_ping=True)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error."""
        async with self.sessions() as session:
            async with session.begin():
                yield session

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


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str | None:
    """The newest revision(s) this version knows, comma-separated when there are branches."""
    return ",".join(sorted(ScriptDirectory.from_config(alembic_config()).get_heads())) or None


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)

"""The directory's generation: a counter every change to the directory bumps, so answers derived from it
can be kept between mail transactions and dropped the moment it changes.

``directory_generation`` holds one row. Database triggers (revision 0020_smtpaccept_dirgen)
add one to it in the same transaction as any INSERT, UPDATE or DELETE on the tables that routes and
S/MIME policy are derived from (``WATCHED_TABLES``), whoever writes: ``gateway serve``, the CLI in another
process, an operator's SQL. A cached answer is therefore stale exactly when the generation moved.

``AnswerCache`` keeps such answers for the acceptance path. Its owner calls ``refresh()`` at the
boundaries where a fresh view is required (the pipeline: at MAIL FROM and again at the end of DATA), one
small query instead of the lookups themselves; a deleted mailbox, a revoked certificate (in the directory)
or a changed policy is seen by the next of these boundaries, never later than the end of the current
transaction. Answers that depend on the clock (trusted-domain validity windows, certificate validity,
CRLs) are not cached here: callers cache the rows and judge them against the time and the CRLs of now.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from sqlalchemy import BigInteger, Integer, select
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.db import Database
from gateway.storage.models import Base

T = TypeVar("T")

WATCHED_TABLES = ("local_domains", "trusted_domains", "mailboxes", "patients", "delegations", "certificates",
                  "smime_policies", "smime_certificates", "smime_held_keys")
MAX_ANSWERS = 20_000   # a bound on memory under a stream of distinct addresses; cleared when reached


class DirectoryGeneration(Base):
    __tablename__ = "directory_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)           # always 1
    value: Mapped[int] = mapped_column(BigInteger)


async def current_generation(db: Database) -> int:
    async with db.engine.connect() as conn:
        value = (await conn.execute(select(DirectoryGeneration.__table__.c.value))).scalar()
    return int(value or 0)


class _SqliteGenerationReader:
    """SQLite: the generation read on a private read-only connection, in the event loop's thread. One
    primary-key read in WAL mode takes microseconds and never waits for the writer (a reader has its own
    snapshot), where a round trip through the async engine's worker thread costs a context switch and
    more Python than every cached lookup it saves."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None         # opened at the first read (after migrations)

    def read(self) -> int:
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0, isolation_level=None,
                                         check_same_thread=False)
        # fetchall, not fetchone: a statement left unfinished keeps its read snapshot open, and a
        # snapshot held for ever stops SQLite's checkpoints from emptying the WAL.
        rows = self._conn.execute("SELECT value FROM directory_generation WHERE id = 1").fetchall()
        return int(rows[0][0]) if rows else 0


def _sqlite_path(db: Database) -> str | None:
    if not db.is_sqlite or "///" not in db.url:
        return None
    path = db.url.split("///", 1)[1]
    return None if not path or path == ":memory:" else path


class AnswerCache:
    """Answers derived from the directory's tables, kept while its generation stays the same."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.generation: int | None = None
        self._answers: dict[tuple[str, str], Any] = {}
        self.hits = 0            # for tests and benchmarks
        self.misses = 0
        path = _sqlite_path(db)
        self._reader = _SqliteGenerationReader(path) if path is not None else None
        self._read_serves = False
        self.reads = 0           # for tests and benchmarks: generations read

    async def refresh(self) -> None:
        """Read the generation; forget every answer if the directory changed since the last read.

        On SQLite, one read serves the refreshes that follow it until every callback made ready before it
        has run: the end of that stretch is a callback queued just before the read (asyncio runs its ready
        callbacks in order). A callback queued before the read was made ready by something that had
        happened already (a directory change committed, a message accepted), so the read saw it; one queued
        after the read runs after the end of the stretch and reads again. The read releases the GIL, so
        each one is a thread switch of the event loop while worker threads wait for it: the deliveries and
        DATA completions woken together (a group commit's callers) now share one."""
        if self._read_serves:
            return
        generation = await self._read()
        if generation != self.generation:
            self._answers.clear()
            self.generation = generation

    async def _read(self) -> int:
        if self._reader is not None:
            asyncio.get_running_loop().call_soon(self._stretch_over)     # queued before the read: see refresh
            try:
                generation = self._reader.read()
            except sqlite3.Error:                  # busy or not migrated yet: the engine's way, which waits
                pass
            else:
                self.reads += 1
                self._read_serves = True
                return generation
        self.reads += 1
        return await current_generation(self.db)

    def _stretch_over(self) -> None:
        self._read_serves = False

    def forget(self) -> None:
        self._answers.clear()

    async def get(self, kind: str, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """The cached answer for (kind, key), else ``compute()``'s, kept if the generation did not move while
        it was computed (a change committed meanwhile must not be kept under the old generation)."""
        try:
            answer = self._answers[kind, key]
        except KeyError:
            pass
        else:
            self.hits += 1
            return cast(T, answer)
        self.misses += 1
        generation = self.generation
        answer = await compute()
        if generation is not None and generation == self.generation:
            if len(self._answers) >= MAX_ANSWERS:
                self._answers.clear()
            self._answers[kind, key] = answer
        return answer

"""The sign-in limiter's counts, in the database every node shares (``auth_failures``: revisions 0010_auth and
0022_limiter_shared_counts).

One row per (login, source) and one per source (``login`` empty: its budget across logins). With several
nodes behind one proxy, or across a restart, every node must see the same counts: a guesser who spreads
attempts over N nodes, or waits for a deploy, must not get N budgets or a fresh one. So:

- an attempt reads its two rows with one SELECT (``read``); a node may skip even that while it knows the
  (login, source) is waiting until T (``AuthLimiter.check``);
- a failure is one INSERT .. ON CONFLICT DO UPDATE of both rows, the count incremented *in the database*
  (two nodes failing at once both count) and restarted from one when the last failure is older than the
  window; RETURNING hands back the counts, so the node knows the wait without reading again;
- a success writes only when there is something to clear or remember (``record_success``): a clean sign-in
  from a source with no failure on record costs no write;
- a throttled attempt is audited once per waiting period whichever node refuses it: the first node to mark
  the period (``claim_throttle_report``, a conditional UPDATE) writes the audit entry;
- expired windows are deleted by ``purge``, run by ``PurgeTask`` on one node at a time.

Statements are SQL Core, each a transaction of its own through ``Database.run_in_transaction`` (on SQLite one
hop to a database thread); the read, run on every attempt, goes to SQLite's driver directly (``Prepared``) and,
on PostgreSQL, runs without BEGIN/COMMIT around it. Times are the nodes' wall clocks (kept in step by NTP, as TLS and the audit chain
already require).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, and_, bindparam, case, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from gateway.ops.periodic import PeriodicTask
from gateway.storage.advisory import run_alone
from gateway.storage.db import Database
from gateway.storage.models import Base, UTCDateTime
from gateway.storage.prepared import Prepared

log = logging.getLogger("gateway.auth")

MAX_LOGIN_LENGTH = 320
SOURCE_WIDE = ""                # the login column of a source's own record (its budget across logins)
Key = tuple[str, str]           # (login, source); login SOURCE_WIDE: the source's budget across logins


class AuthFailureRow(Base):
    """Failures of one login from one source (``login`` empty: the source's budget across logins)."""

    __tablename__ = "auth_failures"

    login: Mapped[str] = mapped_column(String(MAX_LOGIN_LENGTH), primary_key=True)
    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    # The last failure; with no failure (a success remembered), when the row was written.
    last_failure_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    # The last success of this login from this source, written only when the source has failures on record
    # (it exempts the login from the source's budget on every node: colleagues behind one NAT).
    last_success_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The waiting period (named by its last failure) whose throttled attempt has been audited.
    throttle_reported_for: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


@dataclass(frozen=True)
class Stored:
    """One row as the limiter uses it: epoch seconds, 0.0 for none."""

    failures: int
    last_failure: float
    last_success: float = 0.0
    reported_for: float = 0.0


_COLUMNS = AuthFailureRow.__table__.c


class FailureCounts:
    """The statements of the shared counts (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def read(self, login: str, source: str) -> dict[Key, Stored]:
        """The stored rows of (login, source) and of the source's budget (missing ones absent): one SELECT,
        on SQLite's driver directly (``Prepared``: every sign-in attempt runs it)."""
        values = {"login": login, "source": source}
        if self.db.is_sqlite:
            return await self.db.run_in_transaction(lambda conn: _stored(_READ.run(conn, values).fetchall()))
        # PostgreSQL: one statement needs no transaction around it (no BEGIN and COMMIT round trips).
        async with self.db.engine.connect() as conn:
            alone = await conn.execution_options(isolation_level="AUTOCOMMIT")
            return _stored((await alone.execute(_READ.statement, values)).all())

    async def add_failure(self, keys: Sequence[Key], now: float, window_start: float) -> dict[Key, Stored]:
        """One more failure for every key, counted from one again where the last was before ``window_start``."""
        at, horizon = _datetime(now), _datetime(window_start)
        rows = [{"login": login, "source": source, "failures": 1, "last_failure_at": at}
                for login, source in sorted(keys)]     # one lock order for every node: no deadlock between two

        def work(conn: Connection) -> dict[Key, Stored]:
            statement = _insert(conn).values(rows)
            return _stored(conn.execute(statement.on_conflict_do_update(
                index_elements=["login", "source"],
                set_={"failures": case((_COLUMNS.last_failure_at < horizon, 1), else_=_COLUMNS.failures + 1),
                      "last_failure_at": statement.excluded.last_failure_at},
            ).returning(*_RETURNED)))
        return await self.db.run_in_transaction(work, write=True)

    async def record_success(self, key: Key, now: float) -> None:
        """A good credential: the key's failures cleared, its success remembered by every node."""
        at = _datetime(now)

        def work(conn: Connection) -> None:
            statement = _insert(conn).values(login=key[0], source=key[1], failures=0, last_failure_at=at,
                                             last_success_at=at)
            conn.execute(statement.on_conflict_do_update(
                index_elements=["login", "source"],
                set_={"failures": 0, "last_success_at": statement.excluded.last_success_at}))
        await self.db.run_in_transaction(work, write=True)

    async def claim_throttle_report(self, keys: Sequence[Key]) -> bool:
        """Mark the current waiting period of ``keys`` as audited: True for the one caller that marked it."""
        statement = (update(AuthFailureRow)
                     .where(_any_of(keys), _COLUMNS.failures > 0,
                            or_(_COLUMNS.throttle_reported_for.is_(None),
                                _COLUMNS.throttle_reported_for != _COLUMNS.last_failure_at))
                     .values(throttle_reported_for=_COLUMNS.last_failure_at))
        changed = await self.db.run_in_transaction(lambda conn: conn.execute(statement).rowcount, write=True)
        return bool(changed)

    async def purge(self, window_start: float) -> int:
        """Delete the rows with neither a failure nor a success since ``window_start``; how many."""
        horizon = _datetime(window_start)
        statement = delete(AuthFailureRow).where(
            _COLUMNS.last_failure_at < horizon,
            or_(_COLUMNS.last_success_at.is_(None), _COLUMNS.last_success_at < horizon))
        deleted = await self.db.run_in_transaction(lambda conn: conn.execute(statement).rowcount, write=True)
        return int(deleted)


class PurgeTask(PeriodicTask):
    """``gateway serve``'s periodic purge of expired windows, on one node at a time (advisory lock)."""

    name = "auth-failures-purge"

    def __init__(self, db: Database, purge: Callable[[], Awaitable[int]], *, interval_seconds: float) -> None:
        super().__init__(interval_seconds=interval_seconds)
        self.db = db
        self.purge = purge

    async def run_once(self) -> int:
        async with run_alone(self.db, self.name) as alone:
            deleted = await self.purge() if alone else 0
        if deleted:
            log.info("sign-in limiter: %d expired failure records purged", deleted)
        return deleted


_RETURNED = (_COLUMNS.login, _COLUMNS.source, _COLUMNS.failures, _COLUMNS.last_failure_at, _COLUMNS.last_success_at,
             _COLUMNS.throttle_reported_for)
_READ = Prepared(select(*_RETURNED).where(_COLUMNS.source == bindparam("source"),
                                          or_(_COLUMNS.login == bindparam("login"), _COLUMNS.login == SOURCE_WIDE)))


def _any_of(keys: Sequence[Key]) -> ColumnElement[bool]:
    return or_(*(and_(_COLUMNS.login == login, _COLUMNS.source == source) for login, source in keys))


def _insert(conn: Connection) -> Any:
    return (postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert)(AuthFailureRow)


def _stored(rows: Any) -> dict[Key, Stored]:
    """Rows of ``_RETURNED``, by position (``Prepared`` on SQLite hands back the driver's plain tuples)."""
    return {(login, source): Stored(failures, _epoch(last_failure), _epoch(last_success), _epoch(reported_for))
            for login, source, failures, last_failure, last_success, reported_for in rows}


def _datetime(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _epoch(value: dt.datetime | str | None) -> float:
    """A timestamp as epoch seconds: a datetime from Core, or SQLite's stored text as ``Prepared`` reads it
    (UTCDateTime writes UTC without a zone: "2026-12-04 20:10:00.123456")."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return (value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)).timestamp()

"""The limiter's counts live in the database (issue 13): every node and every restart sees the same failures.

Two ``AuthLimiter`` on one database are two gateway nodes. From the guesser's side: alternating between
them buys no extra guesses, concurrent failures on both are all counted, a throttled attempt is audited
once however many nodes refuse it; from the clinician's side: a clean sign-in writes nothing and reads
once, and a success on one node frees the other; expired windows are purged. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select

from gateway.audit import AuditEvent, AuditLog
from gateway.security.auth_limiter import AuditedFailures, AuthFailureRow, AuthLimiter, AuthThrottled
from gateway.security.failure_counts import PurgeTask
from gateway.storage.advisory import run_alone
from gateway.storage.db import Database
from tests.security.limiter_clock import POLICY, Clock



def _nodes(database: Database, clock: Clock, audit: AuditLog | None = None) -> tuple[AuthLimiter, AuthLimiter]:
    sink = AuditedFailures(audit) if audit is not None else None
    return (AuthLimiter(POLICY, db=database, audit=sink, clock=clock),
            AuthLimiter(POLICY, db=database, audit=sink, clock=clock))


async def _fail(limiter: AuthLimiter, login: str, source: str) -> None:
    await limiter.check("imap", login, source)
    await limiter.failed("imap", login, source)


async def _retry_after(limiter: AuthLimiter, login: str, source: str) -> int:
    with pytest.raises(AuthThrottled) as throttled:
        await limiter.check("smtp", login, source)
    return throttled.value.retry_after


async def _stored(database: Database) -> dict[tuple[str, str], int]:
    async with database.session() as session:
        return {(row.login, row.source): row.failures for row in (await session.scalars(select(AuthFailureRow)))}


@contextmanager
def _statements(database: Database) -> Iterator[list[str]]:
    """Every SQL statement the database runs meanwhile: through the async engine (SQLAlchemy's events) and,
    on a SQLite file, on the one-hop engine's driver connections (SQLite's trace callback: ``Prepared`` runs
    statements there without SQLAlchemy)."""
    seen: list[str] = []

    def record(statement: str) -> None:
        if statement.split(None, 1)[0].upper() not in {"BEGIN", "COMMIT", "ROLLBACK", "PRAGMA"}:
            seen.append(statement)

    def cursor_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        record(statement)

    def checkout(driver: Any, *_: Any) -> None:
        driver.set_trace_callback(record)

    def checkin(driver: Any, *_: Any) -> None:
        driver.set_trace_callback(None)

    hooks: list[tuple[Any, str, Any]] = [(database.engine.sync_engine, "before_cursor_execute", cursor_execute)]
    if database._sync_engine is not None:
        hooks += [(database._sync_engine.pool, "checkout", checkout), (database._sync_engine.pool, "checkin", checkin)]
    # The database threads keep their connection from one transaction to the next (no checkout each time):
    # those already open are traced here.
    kept = [connection.connection.driver_connection for connection in _kept_connections(database)]
    for target, name, hook in hooks:
        event.listen(target, name, hook)
    for driver in kept:
        driver.set_trace_callback(record)
    try:
        yield seen
    finally:
        for target, name, hook in hooks:
            event.remove(target, name, hook)
        for driver in [connection.connection.driver_connection for connection in _kept_connections(database)]:
            driver.set_trace_callback(None)


def _kept_connections(database: Database) -> list[Any]:
    kept = database._thread_connections
    if kept is None:
        return []
    with kept._lock:
        return [connection for connection in kept._open if not connection.closed and not connection.invalidated]


def _writes(statements: list[str]) -> list[str]:
    return [s for s in statements if s.lstrip().split(None, 1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}]


async def test_a_guesser_alternating_between_two_nodes_gets_one_budget(database: Database) -> None:
    clock = Clock()
    a, b = _nodes(database, clock)
    await _fail(a, "doc@x", "192.0.2.1")
    await _fail(b, "doc@x", "192.0.2.1")
    await _fail(a, "doc@x", "192.0.2.1")
    # Three failures in all, as against one node: both nodes now make the fourth attempt wait.
    assert await _retry_after(b, "doc@x", "192.0.2.1") == 1
    assert await _retry_after(a, "doc@x", "192.0.2.1") == 1
    clock.now += 1
    await _fail(b, "doc@x", "192.0.2.1")
    assert await _retry_after(a, "doc@x", "192.0.2.1") == 2       # the delay grows from the shared count
    assert await _stored(database) == {("doc@x", "192.0.2.1"): 4, ("", "192.0.2.1"): 4}


async def test_a_restarted_node_starts_from_the_stored_counts(database: Database) -> None:
    clock = Clock()
    first, _ = _nodes(database, clock)
    for _ in range(2):
        await _fail(first, "doc@x", "192.0.2.1")
    restarted = AuthLimiter(POLICY, db=database, clock=clock)     # nothing loaded: each attempt reads
    await _fail(restarted, "doc@x", "192.0.2.1")
    assert await _retry_after(restarted, "doc@x", "192.0.2.1") == 1


async def test_failures_on_two_nodes_at_once_are_all_counted(database: Database) -> None:
    a, b = _nodes(database, Clock())
    await asyncio.gather(*(node.failed("imap", f"user{number}@x", "203.0.113.9")
                           for number in range(8) for node in (a, b)))
    assert (await _stored(database))[("", "203.0.113.9")] == 16
    assert await _retry_after(a, "somebody-new@x", "203.0.113.9") > 0


async def test_a_throttled_attempt_is_audited_once_whichever_nodes_refuse_it(database: Database) -> None:
    clock = Clock()
    audit = AuditLog(database)
    a, b = _nodes(database, clock, audit)
    for _ in range(3):
        await _fail(a, "doc@x", "192.0.2.1")
    for node in (a, b, b, a):
        await _retry_after(node, "doc@x", "192.0.2.1")
    entries = await audit.search(events=[AuditEvent.AUTHENTICATION_FAILED])
    reasons = sorted(entry.outcome.reason or "" for entry in entries)
    assert len(entries) == 4, reasons                              # three failures, one throttled waiting period
    assert sum(reason.startswith("throttled") for reason in reasons) == 1
    clock.now += 1
    await _fail(b, "doc@x", "192.0.2.1")                           # a new waiting period: audited once again
    await _retry_after(a, "doc@x", "192.0.2.1")
    await _retry_after(b, "doc@x", "192.0.2.1")
    assert len(await audit.search(events=[AuditEvent.AUTHENTICATION_FAILED])) == 6


async def test_a_clean_sign_in_reads_once_and_writes_nothing(database: Database) -> None:
    a, _ = _nodes(database, Clock())
    await a.check("imap", "warmup@x", "192.0.2.9")                 # the pool's first connection, not the limiter's
    with _statements(database) as statements:
        await a.check("imap", "doc@x", "198.51.100.7")
        await a.succeeded("imap", "doc@x", "198.51.100.7")
    assert _writes(statements) == [] and len(statements) == 1, statements


async def test_a_failure_is_one_statement(database: Database) -> None:
    a, _ = _nodes(database, Clock())
    await a.check("imap", "warmup@x", "192.0.2.9")
    with _statements(database) as statements:
        await a.failed("imap", "doc@x", "198.51.100.7")
    assert len(statements) == 1 and len(_writes(statements)) == 1, statements


async def test_a_lock_this_node_knows_is_refused_without_reading(database: Database) -> None:
    a, _ = _nodes(database, Clock())
    for _ in range(3):
        await _fail(a, "doc@x", "192.0.2.1")
    await _retry_after(a, "doc@x", "192.0.2.1")                    # the first refusal is audited (no sink here)
    with _statements(database) as statements:
        for _ in range(5):
            await _retry_after(a, "doc@x", "192.0.2.1")
    assert statements == []


async def test_a_success_on_one_node_is_seen_on_the_other(database: Database) -> None:
    clock = Clock()
    a, b = _nodes(database, clock)
    for _ in range(2):
        await _fail(a, "doc@x", "192.0.2.1")
    await b.check("imap", "doc@x", "192.0.2.1")
    await b.succeeded("imap", "doc@x", "192.0.2.1")                # clears (doc@x, source) for every node
    for _ in range(2):
        await _fail(a, "doc@x", "192.0.2.1")
    await a.check("imap", "doc@x", "192.0.2.1")                     # two failures since the success: no wait
    # A colleague who signed in on node B behind a NAT already watched (a typo there) is not held back by
    # that address's budget on node A. (A success from an address with no failures on record writes nothing.)
    clock.now += 5
    await _fail(a, "typo@x", "203.0.113.9")
    await b.check("imap", "colleague@x", "203.0.113.9")
    await b.succeeded("imap", "colleague@x", "203.0.113.9")
    for number in range(9):
        await _fail(b, f"user{number}@x", "203.0.113.9")
    assert await _retry_after(a, "somebody-new@x", "203.0.113.9") > 0
    await a.check("imap", "colleague@x", "203.0.113.9")


async def test_expired_windows_are_purged_and_forgotten(database: Database) -> None:
    clock = Clock()
    a, b = _nodes(database, clock)
    for _ in range(3):
        await _fail(a, "old@x", "192.0.2.1")
    clock.now += POLICY.forget_after + 1
    await _fail(b, "new@x", "192.0.2.2")
    await a.check("imap", "old@x", "192.0.2.1")                     # forgotten even before the purge runs
    assert await b.purge() == 2                                     # (old@x, source) and the source's budget
    assert await _stored(database) == {("new@x", "192.0.2.2"): 1, ("", "192.0.2.2"): 1}
    await _fail(a, "old@x", "192.0.2.1")
    assert (await _stored(database))[("old@x", "192.0.2.1")] == 1   # a new window starts from one


async def test_the_purge_task_deletes_expired_windows_on_one_node_at_a_time(database: Database) -> None:
    clock = Clock()
    a, b = _nodes(database, clock)
    await _fail(a, "old@x", "192.0.2.1")
    clock.now += POLICY.forget_after + 1
    purges = [PurgeTask(database, node.purge, interval_seconds=600) for node in (a, b)]
    async with run_alone(database, "auth-failures-purge") as held:     # another node's pass, in progress
        assert held
        during = await purges[1].run_once()
    after = await purges[0].run_once()
    # PostgreSQL: skipped while the other node held the lock, done after; SQLite (one process): done at once.
    assert (during, after) == ((2, 0) if database.is_sqlite else (0, 2))
    assert await _stored(database) == {}

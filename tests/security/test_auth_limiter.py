"""The one authentication limiter, on a clock of its own: growing delays per (login, source), a budget per
source across logins, no lock a stranger can set on someone signing in elsewhere, state kept in the
database across a restart, and every failure audited with the login it tried."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from gateway.audit import AuditEvent, AuditLog
from gateway.config import ConfigError, load_settings
from gateway.security.auth_limiter import AuditedFailures, AuthFailureRow, AuthLimiter, AuthThrottled, LimiterPolicy, source_key
from gateway.storage.db import Database
from tests.security.limiter_clock import POLICY, Clock



async def _fail(limiter: AuthLimiter, login: str, source: str, door: str = "imap") -> None:
    await limiter.check(door, login, source)
    await limiter.failed(door, login, source)


async def _retry_after(limiter: AuthLimiter, login: str, source: str) -> int:
    with pytest.raises(AuthThrottled) as throttled:
        await limiter.check("smtp", login, source)
    return throttled.value.retry_after


async def test_delays_grow_per_login_and_source_and_are_capped() -> None:
    clock = Clock()
    limiter = AuthLimiter(POLICY, clock=clock)
    for _ in range(3):
        await _fail(limiter, "doc@x", "192.0.2.1")
    assert await _retry_after(limiter, "doc@x", "192.0.2.1") == 1
    clock.now += 1
    await _fail(limiter, "doc@x", "192.0.2.1")
    assert await _retry_after(limiter, "doc@x", "192.0.2.1") == 2
    for _ in range(10):
        clock.now += 3600 - 1           # each try just before forgetting: the delay keeps doubling to the cap
        await limiter.check("smtp", "doc@x", "192.0.2.1")
        await limiter.failed("smtp", "doc@x", "192.0.2.1")
    assert await _retry_after(limiter, "DOC@x ", "192.0.2.1") == 60


async def test_a_stranger_never_holds_back_the_user_signing_in_elsewhere() -> None:
    limiter = AuthLimiter(POLICY, clock=Clock())
    for _ in range(9):
        try:
            await _fail(limiter, "doc@x", "192.0.2.66")
        except AuthThrottled:
            pass
    await _retry_after(limiter, "doc@x", "192.0.2.66")
    await limiter.check("imap", "doc@x", "198.51.100.7")          # the real user, from the hospital: no wait
    await limiter.succeeded("imap", "doc@x", "198.51.100.7")


async def test_one_source_spraying_many_logins_is_throttled_on_all_of_them() -> None:
    clock = Clock()
    limiter = AuthLimiter(POLICY, clock=clock)
    for number in range(10):
        await _fail(limiter, f"user{number}@x", "203.0.113.9")
    assert await _retry_after(limiter, "somebody-new@x", "203.0.113.9") == 1
    # A colleague behind the same address who signed in there recently is not held back.
    clock.now += 2
    await limiter.check("imap", "colleague@x", "203.0.113.9")
    await limiter.succeeded("imap", "colleague@x", "203.0.113.9")
    await _fail(limiter, "user99@x", "203.0.113.9")
    await limiter.check("imap", "colleague@x", "203.0.113.9")
    await limiter.succeeded("imap", "colleague@x", "203.0.113.9")
    await _retry_after(limiter, "user100@x", "203.0.113.9")


async def test_a_success_clears_its_record_not_the_source_budget() -> None:
    clock = Clock()
    limiter = AuthLimiter(POLICY, clock=clock)
    for _ in range(2):
        await _fail(limiter, "doc@x", "192.0.2.1")
    await limiter.check("imap", "doc@x", "192.0.2.1")
    await limiter.succeeded("imap", "doc@x", "192.0.2.1")
    assert limiter.snapshot() == {("", "192.0.2.1"): 2}


async def test_parallel_guesses_cannot_all_pass_before_the_first_failure_lands() -> None:
    limiter = AuthLimiter(POLICY, clock=Clock())
    await _fail(limiter, "doc@x", "192.0.2.1")
    await limiter.check("imap", "doc@x", "192.0.2.1")
    await limiter.check("imap", "doc@x", "192.0.2.1")
    await _retry_after(limiter, "doc@x", "192.0.2.1")             # two in flight + one failure = the free three


async def test_parallel_sign_ins_without_failures_all_go_ahead() -> None:
    limiter = AuthLimiter(POLICY, clock=Clock())
    for _ in range(8):                                             # Thunderbird opens several connections at once
        await limiter.check("imap", "doc@x", "192.0.2.1")


def test_ipv6_sources_are_counted_per_64() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"


async def test_state_survives_a_restart_and_failures_are_audited(database: Database) -> None:
    clock = Clock()
    audit = AuditLog(database)
    limiter = AuthLimiter(POLICY, db=database, audit=AuditedFailures(audit), clock=clock)
    for _ in range(3):
        await _fail(limiter, "doc@x", "192.0.2.1", door="fhir")
    assert await _retry_after(limiter, "doc@x", "192.0.2.1") == 1
    restarted = AuthLimiter(POLICY, db=database, clock=clock)     # nothing loaded: the stored counts are read
    assert await _retry_after(restarted, "doc@x", "192.0.2.1") == 1
    clock.now += 2
    await restarted.check("imap", "doc@x", "192.0.2.1")
    await restarted.succeeded("imap", "doc@x", "192.0.2.1")
    async with database.session() as session:                      # only the source budget still counts
        stored = {(row.login, row.source): row.failures for row in await session.scalars(select(AuthFailureRow))}
    assert {key: failures for key, failures in stored.items() if failures} == {("", "192.0.2.1"): 3}
    entries = await audit.search(events=[AuditEvent.AUTHENTICATION_FAILED])
    assert len(entries) == 4                                       # three failures and one throttled attempt
    assert {(e.actor.id, e.source.door, e.source.ip) for e in entries} == {("doc@x", "fhir", "192.0.2.1"),
                                                                           ("doc@x", "smtp", "192.0.2.1")}
    assert all(e.details["login"] == "doc@x" and e.outcome.is_refused for e in entries)


async def test_old_failures_are_forgotten() -> None:
    clock = Clock()
    limiter = AuthLimiter(POLICY, clock=clock)
    for _ in range(5):
        try:
            await _fail(limiter, "doc@x", "192.0.2.1")
        except AuthThrottled:
            clock.now += 100
    clock.now += 3601
    await limiter.check("imap", "doc@x", "192.0.2.1")


@pytest.mark.parametrize("old_key, new_key", [
    ("auth_failures_before_lockout", "auth.failures_before_delay"),
    ("auth_failure_window_seconds", "auth.forget_failures_after_minutes"),
    ("auth_lockout_seconds", "auth.max_delay_seconds"),
])
def test_the_old_lockout_keys_name_their_replacement(tmp_path: object, old_key: str, new_key: str) -> None:
    with pytest.raises(ConfigError, match=rf"smtp\.{old_key}: replaced by .*{new_key.replace('.', '[.]')}"):
        load_settings(environ={}, data_dir=str(tmp_path), overrides={"smtp": {old_key: 10}})


def test_auth_settings_build_the_policy(tmp_path: object) -> None:
    settings = load_settings(environ={"GATEWAY_AUTH_FAILURES_BEFORE_DELAY": "7"}, data_dir=str(tmp_path))
    assert LimiterPolicy.from_settings(settings.auth).failures_before_delay == 7
    with pytest.raises(ConfigError, match="first_delay_seconds must not exceed max_delay_seconds"):
        load_settings(environ={}, data_dir=str(tmp_path), overrides={"auth": {"first_delay_seconds": 600}})

"""One authentication limiter for every door: SMTP AUTH, IMAP LOGIN/AUTHENTICATE, FHIR Basic, the webmail.

Designed so that guessing is slow and a stranger cannot lock anyone out:

- **per (login, source address)**: after ``failures_before_delay`` failures, each further attempt from
  that source for that login waits ``first_delay * 2^(n - free)`` seconds after the last failure,
  capped at ``max_delay`` (growing delays, as Dovecot's auth penalty and OpenSSH's ``PerSourcePenalties``);
- **per source address, across logins**: a budget of ``source_failures_before_delay`` failures, then the
  same growing delays for everything that source tries (one guesser spraying many accounts is slowed
  on all of them). IPv6 sources are counted per /64, which one host usually owns whole;
- **no lock per account alone**: a user signing in from another address never waits for what
  a stranger did, so wrong passwords cannot be used to deny a clinician access (the defect of
  counting per login: ten guesses from anywhere locked the real user out);
- a success clears the (login, source) record, never the source budget (a guesser holding one
  valid account cannot reset its budget by signing in); and a login that succeeded from a source
  recently is not held back by that source's budget, so colleagues behind one hospital NAT are not
  slowed by someone else's guesses there;
- failures are forgotten ``forget_after`` seconds after the last one;
- the counts are the database's (``auth_failures``, gateway/security/failure_counts.py), shared by every
  node and kept across a restart: each attempt reads its two rows once, each failure is one upsert that
  increments them in the database, and a node that knows a (login, source) waits until T refuses it
  without reading until T. A clean success writes nothing; a success writes only to clear failures or to
  remember itself where its source has failures on record (the NAT exemption, for every node);
- every failed attempt is audited with the login it tried, the door and the source; a throttled
  attempt is audited once per waiting period, whichever node refuses it (not for every retry a client
  makes while it waits).

Attempts in flight count too: a burst of parallel guesses from one source cannot all pass
``check`` before the first ``failed`` is recorded (counted per node: the nodes share what has landed).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn, Protocol

from gateway.security.failure_counts import (MAX_LOGIN_LENGTH, SOURCE_WIDE, AuthFailureRow, FailureCounts, Key,
                                             Stored)

if TYPE_CHECKING:
    from gateway.audit import AuditLog
    from gateway.config import AuthSettings
    from gateway.storage.db import Database

__all__ = ["AuditedFailures", "AuthFailureRow", "AuthLimiter", "AuthThrottled", "LimiterPolicy", "source_key"]

log = logging.getLogger("gateway.auth")

Clock = Callable[[], float]
IN_FLIGHT_EXPIRY = 60.0         # an attempt that never reported back stops counting after this
MAX_RECORDS_BEFORE_SWEEP = 10_000


class AuthThrottled(Exception):
    """This attempt must wait ``retry_after`` seconds; the password was not looked at."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed sign-ins; try again in {retry_after} seconds")
        self.retry_after = retry_after


@dataclass(frozen=True)
class LimiterPolicy:
    failures_before_delay: int = 5
    source_failures_before_delay: int = 20
    first_delay: float = 1.0
    max_delay: float = 300.0
    forget_after: float = 3600.0

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> LimiterPolicy:
        return cls(auth.failures_before_delay, auth.source_failures_before_delay, float(auth.first_delay_seconds),
                   float(auth.max_delay_seconds), auth.forget_failures_after_minutes * 60.0)

    def delay(self, failures: int, free: int) -> float:
        """Seconds to wait after the last of ``failures``: none within the free ones, then doubling, capped."""
        if failures < free:
            return 0.0
        return min(self.max_delay, self.first_delay * 2.0 ** min(failures - free, 62))


@dataclass
class _Record:
    """What this node knows of one key: with a database, a copy of its row as last read or written."""

    failures: int = 0
    last_failure: float = 0.0                       # wall clock (the nodes' clocks agree: NTP)
    in_flight: list[float] = field(default_factory=list)
    last_success: float = 0.0
    throttle_audited: bool = False                  # one audit entry per waiting period
    locked_until: float = 0.0                       # known to wait until then: refused without a read


class FailureAudit(Protocol):
    async def failed(self, door: str, login: str, source: str, reason: str) -> None: ...


class AuditedFailures:
    """Writes failed and throttled sign-ins to the hash-chained audit log."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    async def failed(self, door: str, login: str, source: str, reason: str) -> None:
        from gateway.audit import AuditEvent
        from gateway.audit.chain import Actor, Outcome, Source
        shown = (login or "?")[:128]
        await self.audit.append(AuditEvent.AUTHENTICATION_FAILED, actor=Actor.unauthenticated(shown), patient=None,
                                source=Source(door, _audit_ip(source)), outcome=Outcome.refused(reason),
                                details={"login": login[:MAX_LOGIN_LENGTH], "door": door})


class AuthLimiter:
    """Built once by ``app.open_services`` (``services.auth_limiter``) and shared by every door.

    With ``db`` the counts are the database's, shared by every node (``FailureCounts``); without it (a door
    built alone, in tests) they live in this process only.
    """

    def __init__(self, policy: LimiterPolicy | None = None, *, db: Database | None = None,
                 audit: FailureAudit | None = None, clock: Clock = time.time) -> None:
        self.policy = policy or LimiterPolicy()
        self.counts = FailureCounts(db) if db is not None else None
        self.audit = audit
        self._clock = clock
        self._records: dict[Key, _Record] = {}

    # ------------------------------------------------------------------ the API of every door

    async def check(self, door: str, login: str, source: str) -> None:
        """Raise ``AuthThrottled`` when this attempt must wait; otherwise count it as in flight."""
        now = self._clock()
        keys = _keys(login, source)
        known = self._records.get(keys[0])
        if known is not None and known.locked_until > now:
            await self._refuse(door, login, source, keys, known.locked_until - now)
        if self.counts is not None:
            self._copy_stored(keys, await self.counts.read(*keys[0]))
        retry_after = self._wait(keys[0], now)
        if not self._recently_succeeded(keys[0], now):
            retry_after = max(retry_after, self._wait(keys[1], now))
        if retry_after > 0:
            await self._refuse(door, login, source, keys, retry_after)
        for key in keys:
            self._records.setdefault(key, _Record()).in_flight.append(now)

    async def failed(self, door: str, login: str, source: str) -> None:
        """A wrong credential: count it for (login, source) and for the source, in the database, audit it."""
        now = self._clock()
        keys = _keys(login, source)
        stored = await self.counts.add_failure(keys, now, now - self.policy.forget_after) if self.counts else None
        for key in keys:
            record = self._records.setdefault(key, _Record())
            _land_one(record)
            if stored is not None:
                record.failures, record.last_failure = stored[key].failures, stored[key].last_failure
            else:
                self._forget_if_old(record, now)
                record.failures, record.last_failure = record.failures + 1, now
            record.throttle_audited = False
            record.locked_until = record.last_failure + self.policy.delay(record.failures, self._free(key))
        log.warning("%s: failed sign-in for %r from %s", door, login[:100], source)
        if self.audit is not None:
            await self.audit.failed(door, _clean_login(login), source, "wrong credentials")
        self._sweep(now)

    async def succeeded(self, door: str, login: str, source: str) -> None:
        """A good credential: the (login, source) record is cleared; the source's budget is not.

        Written only when there is something to clear, or when the source has failures on record and this
        success is not yet remembered (so every node exempts the login from that source's budget)."""
        now = self._clock()
        account_key, source_wide = _keys(login, source)
        _land_one(self._records.get(source_wide))
        record = self._records.setdefault(account_key, _Record())
        _land_one(record)
        write = record.failures > 0 or (self._has_failures(source_wide, now)
                                        and now - record.last_success > self.policy.forget_after / 2)
        record.failures, record.throttle_audited, record.last_success, record.locked_until = 0, False, now, 0.0
        if write and self.counts is not None:
            await self.counts.record_success(account_key, now)

    # ------------------------------------------------------------------ housekeeping

    async def purge(self) -> int:
        """Delete the stored windows that have expired (``PurgeTask`` runs it); how many rows."""
        if self.counts is None:
            return 0
        return await self.counts.purge(self._clock() - self.policy.forget_after)

    def snapshot(self) -> dict[Key, int]:
        """Failures per (login, source) as this node last saw them (login empty: the source's budget)."""
        return {key: record.failures for key, record in self._records.items() if record.failures}

    # ------------------------------------------------------------------ internals

    def _copy_stored(self, keys: Sequence[Key], stored: dict[Key, Stored]) -> None:
        """The database's rows are the truth: a key without a row has no failures (cleared or purged)."""
        for key in keys:
            row = stored.get(key)
            record = self._records.get(key)
            if row is None:
                if record is not None:
                    record.failures, record.locked_until = 0, 0.0
                continue
            if record is None:
                record = self._records[key] = _Record()
            record.failures, record.last_failure = row.failures, row.last_failure
            record.last_success = max(record.last_success, row.last_success)
            record.throttle_audited = row.failures > 0 and row.reported_for == row.last_failure

    def _free(self, key: Key) -> int:
        return self.policy.source_failures_before_delay if key[0] == SOURCE_WIDE else self.policy.failures_before_delay

    def _wait(self, key: Key, now: float) -> float:
        record = self._records.get(key)
        if record is None:
            return 0.0
        self._forget_if_old(record, now)
        record.in_flight = [t for t in record.in_flight if now - t < IN_FLIGHT_EXPIRY]
        free = self._free(key)
        if not record.failures:
            return 0.0                                  # parallel sign-ins of a client with no failure all go ahead
        record.locked_until = record.last_failure + self.policy.delay(record.failures, free)
        wait = record.locked_until - now
        if wait <= 0 and record.in_flight and record.failures + len(record.in_flight) >= free:
            wait = self.policy.first_delay              # the earlier attempts have not reported back yet
        return max(wait, 0.0)

    def _has_failures(self, key: Key, now: float) -> bool:
        record = self._records.get(key)
        return record is not None and record.failures > 0 and now - record.last_failure <= self.policy.forget_after

    def _recently_succeeded(self, key: Key, now: float) -> bool:
        record = self._records.get(key)
        return record is not None and record.last_success > 0 and now - record.last_success < self.policy.forget_after

    def _forget_if_old(self, record: _Record, now: float) -> None:
        if record.failures and now - record.last_failure > self.policy.forget_after:
            record.failures = 0
            record.throttle_audited = False

    async def _refuse(self, door: str, login: str, source: str, keys: Sequence[Key], retry_after: float) -> NoReturn:
        if await self._first_refusal_of_period(keys):
            log.warning("%s: sign-in for %r from %s throttled for %d s", door, login[:100], source,
                        math.ceil(retry_after))
            if self.audit is not None:
                await self.audit.failed(door, _clean_login(login), source,
                                        f"throttled: too many failed sign-ins, retry after {math.ceil(retry_after)} s")
        raise AuthThrottled(math.ceil(retry_after))

    async def _first_refusal_of_period(self, keys: Sequence[Key]) -> bool:
        """True for the first refusal of this waiting period: on this node, then (shared) on any node."""
        records = [self._records[key] for key in keys if key in self._records]
        if all(record.throttle_audited for record in records):
            return False
        for record in records:
            record.throttle_audited = True
        if self.counts is None or self.audit is None:
            return True
        return await self.counts.claim_throttle_report(keys)

    def _sweep(self, now: float) -> None:
        """Bound memory under many sources: drop records with nothing left to remember."""
        if len(self._records) <= MAX_RECORDS_BEFORE_SWEEP:
            return
        for key in [key for key, record in self._records.items()
                    if now - max(record.last_failure, record.last_success) > self.policy.forget_after
                    and not record.in_flight]:
            del self._records[key]


def _land_one(record: _Record | None) -> None:
    if record is not None and record.in_flight:
        record.in_flight.pop(0)


def _clean_login(login: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in login.strip().lower())[:MAX_LOGIN_LENGTH]


def source_key(source: str) -> str:
    """The address failures are counted under: IPv4 as is, IPv6 per /64, IPv4-mapped IPv6 as IPv4."""
    try:
        address = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return source[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _keys(login: str, source: str) -> tuple[Key, Key]:
    where = source_key(source)
    return (_clean_login(login) or "?", where), (SOURCE_WIDE, where)


def _audit_ip(source: str) -> str | None:
    try:
        return str(ipaddress.ip_address(source.split("%", 1)[0]))
    except ValueError:
        return None

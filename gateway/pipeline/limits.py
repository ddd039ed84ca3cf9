"""In-memory limiters: concurrent slots and message rates (sign-in attempts: gateway.security.auth_limiter).

A slot is released exactly once whatever happens (its ``release`` is
idempotent and callers hold it in ``finally`` paths): a limiter that leaks
counts ends up refusing everyone (maddy#348). ``snapshot()`` shows the live
counts, for tests and metrics.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Literal, Protocol

Clock = Callable[[], float]


class SlotGiver(Protocol):
    """What a ``Slot`` gives itself back to: a ``ConcurrencyLimiter``, or its stand-in in an SMTP acceptor
    process, which tells the main process (gateway.smtp.acceptors)."""

    def _give_back(self, key: str) -> None: ...


class Slot:
    """One held unit of a ``ConcurrencyLimiter``; ``release()`` may be called any number of times."""

    def __init__(self, limiter: SlotGiver, key: str) -> None:
        self._limiter = limiter
        self.key = key
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._give_back(self.key)


class ConcurrencyLimiter:
    """At most ``limit`` simultaneous holders per key (connections per IP, sessions per user)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = defaultdict(int)

    def try_acquire(self, key: str) -> Slot | None:
        if self._counts[key] >= self.limit:
            return None
        self._counts[key] += 1
        return Slot(self, key)

    async def acquire(self, key: str) -> Slot | None:
        """``try_acquire`` as the SMTP handler calls it: an acceptor process asks the main process, which
        holds the gateway-wide counts (gateway.smtp.acceptors)."""
        return self.try_acquire(key)

    def _give_back(self, key: str) -> None:
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

    def snapshot(self) -> dict[str, int]:
        return {key: count for key, count in self._counts.items() if count}


class RateLimiter:
    """At most ``limit`` events per key in a sliding window of ``window`` seconds; limit 0 = unlimited."""

    def __init__(self, limit: int, window: float = 60.0, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        """Record one event for ``key`` if it fits in the window; False (nothing recorded) if not."""
        if not self.limit:
            return True
        now = self._clock()
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def forget_idle(self) -> None:
        """Drop keys whose events all left the window (bounded memory under many clients)."""
        horizon = self._clock() - self.window
        for key in [k for k, events in self._events.items() if not events or events[-1] <= horizon]:
            del self._events[key]

    def snapshot(self) -> dict[str, int]:
        return {key: len(events) for key, events in self._events.items() if events}


RateRefusal = Literal["user", "ip"]


class MessageRates:
    """``smtp.messages_per_minute_per_user`` and ``_per_ip``: which one a new message would exceed, if any
    (the user's counted first; a message refused by one is not counted by the other)."""

    def __init__(self, per_user: int, per_ip: int, clock: Clock = time.monotonic) -> None:
        self.user = RateLimiter(per_user, clock=clock)
        self.ip = RateLimiter(per_ip, clock=clock)

    @property
    def unlimited(self) -> bool:
        return not self.user.limit and not self.ip.limit

    def refusal(self, account: str | None, address: str) -> RateRefusal | None:
        if account is not None and not self.user.allow(account):
            return "user"
        if not self.ip.allow(address):
            return "ip"
        return None

    async def check(self, account: str | None, address: str) -> RateRefusal | None:
        """``refusal`` as the pipeline calls it: an acceptor process asks the main process."""
        return self.refusal(account, address)

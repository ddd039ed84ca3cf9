"""The webmail's one call into the gateway's authentication limiter (shared with SMTP, IMAP and FHIR).

``gateway/security/auth_limiter.py`` (``AuthLimiter.check(door, login, source)``
raising ``AuthThrottled(retry_after)``, then ``failed`` / ``succeeded``), built
in ``app.open_services()`` as ``services.auth_limiter``. Until a gateway
carries it, the same three calls are answered by the SMTP AUTH lockout
(pipeline/limits.py) with the ``[smtp]`` thresholds, so sign-in guessing is
throttled either way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import Settings
from gateway.pipeline.limits import AuthLockout

DOOR = "webmail"


class Throttled(Exception):
    """Too many failed sign-ins for this login or address: try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed sign-ins; retry in {retry_after} s")
        self.retry_after = retry_after


class Limiter(Protocol):
    def check(self, door: str, login: str, source: str | None) -> Any: ...
    def failed(self, door: str, login: str, source: str | None) -> Any: ...
    def succeeded(self, door: str, login: str, source: str | None) -> Any: ...


@dataclass
class LockoutLimiter:
    """The limiter's API over an ``AuthLockout`` keyed by source address and by login."""

    lockout: AuthLockout

    @classmethod
    def from_settings(cls, settings: Settings) -> LockoutLimiter:
        smtp = settings.smtp
        return cls(AuthLockout(smtp.auth_failures_before_lockout, smtp.auth_failure_window_seconds,
                               smtp.auth_lockout_seconds))

    def check(self, door: str, login: str, source: str | None) -> None:
        seconds = max(self.lockout.seconds_locked(f"ip:{source}"), self.lockout.seconds_locked(f"login:{login}"))
        if seconds > 0:
            raise Throttled(seconds)

    def failed(self, door: str, login: str, source: str | None) -> None:
        self.lockout.record_failure(f"ip:{source}")
        self.lockout.record_failure(f"login:{login}")

    def succeeded(self, door: str, login: str, source: str | None) -> None:
        self.lockout.record_success(f"login:{login}")


def limiter_for(services: Any, settings: Settings) -> Limiter:
    shared = getattr(services, "auth_limiter", None)
    return shared if shared is not None else LockoutLimiter.from_settings(settings)


async def _call(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def check(limiter: Limiter, login: str, source: str | None) -> None:
    """Raise ``Throttled`` when this login or source must wait (whichever limiter answers)."""
    try:
        await _call(limiter.check(DOOR, login, source))
    except Throttled:
        raise
    except Exception as exc:
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is None:
            raise
        raise Throttled(int(retry_after)) from exc


async def failed(limiter: Limiter, login: str, source: str | None) -> None:
    await _call(limiter.failed(DOOR, login, source))


async def succeeded(limiter: Limiter, login: str, source: str | None) -> None:
    await _call(limiter.succeeded(DOOR, login, source))

"""The webmail's calls into the gateway's one authentication limiter (shared with SMTP, IMAP and FHIR).

``services.auth_limiter`` (``security/auth_limiter.py``) decides: ``check`` before
the password is looked at (raises ``AuthThrottled(retry_after)``), then
``failed`` or ``succeeded``; the webmail is the door ``"webmail"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import Settings
from gateway.security.auth_limiter import AuthLimiter, AuthThrottled

if TYPE_CHECKING:
    from gateway.app import Services

DOOR = "webmail"
Throttled = AuthThrottled
Limiter = AuthLimiter


def limiter_for(services: Services, settings: Settings) -> AuthLimiter:
    return services.auth_limiter


async def check(limiter: AuthLimiter, login: str, source: str | None) -> None:
    """Raise ``Throttled`` when this login or source must wait."""
    await limiter.check(DOOR, login, source or "")


async def failed(limiter: AuthLimiter, login: str, source: str | None) -> None:
    await limiter.failed(DOOR, login, source or "")


async def succeeded(limiter: AuthLimiter, login: str, source: str | None) -> None:
    await limiter.succeeded(DOOR, login, source or "")

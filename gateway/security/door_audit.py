"""Refusals and faults at the doors, written to the hash-chained audit log.

Sign-in failures are audited by the authentication limiter
(``auth_limiter.AuditedFailures``); this records the other refusals a door
answers for policy reasons (a relay attempt, a sender address that is not the
login's, a smuggled message, an unknown recipient) and the commands that
failed inside the server, so that an abuse leaves a trace beside the record's
own entries. The door decides which of its replies count; this module only
writes them.

An attacker can repeat a refusal as fast as the network allows, and each entry
is a write under the chain's lock: the same refusal (door, client address,
reply) is written once per ``window`` seconds, and the next entry after a quiet
window says how many were folded into it (``details.repeated``), so the count
is kept without one write per attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.audit import AuditEvent, AuditLog
from gateway.audit.chain import Actor, ActorKind, Outcome, Source

log = logging.getLogger(__name__)

MAX_TRACKED = 10_000   # distinct (door, address, reply) kept for folding; beyond, the oldest are forgotten


@dataclass
class _Folded:
    last_written: float
    repeated: int = 0


class DoorAudit:
    """Built once by ``app.open_services`` (``services.door_audit``) and shared by every door."""

    def __init__(self, audit: AuditLog, *, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.audit = audit
        self.window = window
        self._clock = clock
        self._folded: dict[tuple[str, str, str], _Folded] = {}

    async def refused(self, door: str, client_ip: str | None, login: str | None, reply: str,
                      detail: str | None = None) -> None:
        """A policy refusal answered to ``client_ip`` (``login`` when the session is authenticated)."""
        repeated = self._fold((door, client_ip or "", reply))
        if repeated is None:
            return
        details: dict[str, str | int] = {"reply": reply[:512]}
        if detail:
            details["detail"] = detail[:512]
        if repeated:
            details["repeated"] = repeated
        await self._write(AuditEvent.DOOR_REFUSED, door, client_ip, login, reply, details)

    async def failed(self, door: str, client_ip: str | None, login: str | None, command: str, error: str) -> None:
        """A command that failed inside the server (answered with a local-error reply)."""
        await self._write(AuditEvent.COMMAND_FAILED, door, client_ip, login, f"internal error in {command}",
                          {"command": command[:64], "error": error[:256]})

    async def _write(self, event: AuditEvent, door: str, client_ip: str | None, login: str | None, reason: str,
                     details: dict[str, str | int]) -> None:
        actor = (Actor(ActorKind.MAILBOX, login[:128], login[:256]) if login
                 else Actor.unauthenticated(client_ip or "?"))
        try:
            await self.audit.append(event, actor=actor, patient=None, source=Source(door, client_ip),
                                    outcome=Outcome.refused(reason[:2000]), details=details)
        except Exception:   # the audit must not take the session down with it; the log keeps the fact
            log.exception("could not audit %s at the %s door from %s: %s", event.event_name, door, client_ip, reason)

    def _fold(self, key: tuple[str, str, str]) -> int | None:
        """How many were folded since the last entry for ``key``, or None if this one folds too."""
        now = self._clock()
        folded = self._folded.get(key)
        if folded is not None and now - folded.last_written < self.window:
            folded.repeated += 1
            return None
        repeated = folded.repeated if folded is not None else 0
        self._folded.pop(key, None)
        if len(self._folded) >= MAX_TRACKED:
            self._folded.pop(next(iter(self._folded)))
        self._folded[key] = _Folded(now)
        return repeated

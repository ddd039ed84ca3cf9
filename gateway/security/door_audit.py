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
login, command, reason, reply) is written once per ``window`` seconds, and how
many were folded into it is written later (``details.repeated``): in the next
entry for the same refusal after the window, or, when none comes, in a summary
entry once the window is over (looked for at the next refusal of any kind) or
when the gateway stops (``flush``). The count is kept without one write per
attempt, and none is lost with the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.audit import AuditEvent, AuditLog
from gateway.audit.chain import Actor, ActorKind, Outcome, Source

log = logging.getLogger(__name__)

MAX_TRACKED = 10_000   # distinct refusals kept for folding; beyond, the oldest is written out and forgotten


@dataclass
class _Folded:
    """The last entry written for one refusal, and what a summary of the ones folded since would say."""

    last_written: float
    door: str
    client_ip: str | None
    login: str | None
    reply: str
    details: dict[str, str | int]
    repeated: int = 0


class DoorAudit:
    """Built once by ``app.open_services`` (``services.door_audit``) and shared by every door."""

    def __init__(self, audit: AuditLog, *, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.audit = audit
        self.window = window
        self._clock = clock
        self._folded: dict[tuple[str, ...], _Folded] = {}
        self._evicted: list[_Folded] = []     # forgotten to make room, their counts still to write
        self._swept = clock()

    async def refused(self, door: str, client_ip: str | None, login: str | None, reply: str,
                      detail: str | None = None, *, reason: str | None = None, command: str | None = None) -> None:
        """A policy refusal answered to ``client_ip`` (``login`` when the session is authenticated).

        ``reason`` names the door's rule (``details.reason``: a stable word such as ``traversal``) and
        ``command`` the verb refused; both tell refusals apart for folding, ``detail`` (what was asked) does not.
        """
        details: dict[str, str | int] = {"reply": reply[:512]}
        for name, value in (("reason", reason), ("command", command)):
            if value:
                details[name] = value[:64]
        key = (door, client_ip or "", login or "", command or "", reason or "", reply)
        folded = self._fold(key, _Folded(self._clock(), door, client_ip, login, reply, dict(details)))
        await self._write_expired()
        if folded is None:
            return
        if detail:
            details["detail"] = detail[:512]
        if folded:
            details["repeated"] = folded
        await self._write(AuditEvent.DOOR_REFUSED, door, client_ip, login, _outcome_reason(reason, reply), details)

    async def flush(self) -> None:
        """Write the counts still folded (the gateway is stopping): nothing an attacker did goes uncounted."""
        pending = self._evicted + [entry for entry in self._folded.values() if entry.repeated]
        self._folded.clear()
        self._evicted = []
        for entry in pending:
            await self._write_summary(entry)

    async def failed(self, door: str, client_ip: str | None, login: str | None, command: str, error: str) -> None:
        """A command that failed inside the server (answered with a local-error reply): an ``error`` outcome,
        not a refusal, so an auditor tells the server's faults from its decisions."""
        await self._write(AuditEvent.COMMAND_FAILED, door, client_ip, login, f"internal error in {command}",
                          {"command": command[:64], "error": error[:256]})

    async def _write(self, event: AuditEvent, door: str, client_ip: str | None, login: str | None, reason: str,
                     details: dict[str, str | int]) -> None:
        actor = (Actor(ActorKind.MAILBOX, login[:128], login[:256]) if login
                 else Actor.unauthenticated(client_ip or "?"))
        # A failure inside the server is an error, not a refusal: an auditor tells faults from decisions.
        outcome = (Outcome.error(reason[:2000]) if event is AuditEvent.COMMAND_FAILED
                   else Outcome.refused(reason[:2000]))
        try:
            await self.audit.append(event, actor=actor, patient=None, source=Source(door, client_ip),
                                    outcome=outcome, details=details)
        except Exception:   # the audit must not take the session down with it; the log keeps the fact
            log.exception("could not audit %s at the %s door from %s: %s", event.event_name, door, client_ip, reason)

    def _fold(self, key: tuple[str, ...], fresh: _Folded) -> int | None:
        """How many were folded since the last entry for ``key``, or None if this one folds too."""
        folded = self._folded.get(key)
        if folded is not None and fresh.last_written - folded.last_written < self.window:
            folded.repeated += 1
            return None
        repeated = folded.repeated if folded is not None else 0
        self._folded.pop(key, None)
        if len(self._folded) >= MAX_TRACKED:
            oldest = self._folded.pop(next(iter(self._folded)))
            if oldest.repeated:
                self._evicted.append(oldest)
        self._folded[key] = fresh
        return repeated

    async def _write_expired(self) -> None:
        """Once per window: the refusals whose window is over write what they folded, and are forgotten
        (and at once, those forgotten to make room)."""
        evicted, self._evicted = self._evicted, []
        for entry in evicted:
            await self._write_summary(entry)
        now = self._clock()
        if now - self._swept < self.window:
            return
        self._swept = now
        expired = [key for key, entry in self._folded.items() if now - entry.last_written >= self.window]
        for key in expired:
            entry = self._folded.pop(key)
            if entry.repeated:
                await self._write_summary(entry)

    async def _write_summary(self, entry: _Folded) -> None:
        details = {**entry.details, "repeated": entry.repeated, "folded": "summary"}
        reason = details.get("reason")
        await self._write(AuditEvent.DOOR_REFUSED, entry.door, entry.client_ip, entry.login,
                          _outcome_reason(reason if isinstance(reason, str) else None, entry.reply), details)


def _outcome_reason(reason: str | None, reply: str) -> str:
    return f"{reason}: {reply}" if reason else reply

"""The FHIR API's boundary: every request audited whatever its outcome, no exception escapes as a bare 500.

``audit_boundary`` is the aiohttp middleware of the FHIR sub-application. It
opens a ``RequestTrail`` for the request (a context variable, so the audit log
and the handlers reach it without being handed it): ``TrackedAuditLog`` marks
it whenever an entry is written, ``guarded`` names the authenticated caller
in it, ``outcome_response`` notes the diagnostics. When the handler is done,
whatever happened (its answer, an ``HTTPException``, any other exception
turned into a 500 OperationOutcome), a request that wrote no entry of its own
gets one: ACCESS_REFUSED (outcome ``refused``) for a 4xx, COMMAND_FAILED
(outcome ``error``: a fault, not a decision) for a 5xx, with the caller (or
``fhir-unauthenticated``), the method, the path and the status. Only a successful ``GET /metadata`` (the
CapabilityStatement, which names nobody and no record) is not written, and
sign-in failures are the sign-in limiter's (``note_audited_by_the_limiter``):
not doubled, and not one entry per throttled retry.

The text of a request (path, parameters, headers) is attacker-controlled:
``printable`` makes it safe to log, store in the audit log (no NUL, valid
UTF-8) and echo in a diagnostic.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.audit.chain import Actor, AuditEntry, Door, Outcome, Source, Subject
from gateway.audit.events import AuditEvent
from gateway.audit.log import AuditLog
from gateway.dmp_bridge.fhir.resources import FHIR_JSON, operation_outcome
from gateway.ops.proxied import peer_host
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger("gateway.fhir")

NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
UNAUTHENTICATED = Actor.system("fhir-unauthenticated")
MAX_AUDITED_PATH = 256
# Why a request was answered with an error, as the audit log's refusal reason.
REASONS = {400: "bad-request", 401: "unauthenticated", 403: "forbidden", 404: "not-found",
           405: "method-not-allowed", 413: "body-too-large", 415: "unsupported-media-type"}
# FHIR IssueType of an error answered by aiohttp itself (an HTTPException).
ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               413: "too-costly", 415: "not-supported"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RequestTrail:
    """What the boundary learns about one request while it is handled."""

    audited: bool = False
    actor: Actor | None = None
    diagnostics: str | None = None


_TRAIL: contextvars.ContextVar[RequestTrail | None] = contextvars.ContextVar("fhir_request_trail", default=None)


def current_trail() -> RequestTrail | None:
    return _TRAIL.get()


def note_audited_by_the_limiter() -> None:
    """The request's refusal is a sign-in failure or a throttled attempt, which the sign-in limiter audits
    (``authentication_failed``, a throttled login once per waiting period): the boundary adds no entry."""
    trail = _TRAIL.get()
    if trail is not None:
        trail.audited = True


def note_caller(actor: Actor) -> None:
    """The request's caller is known (authenticated): the boundary's entry names them."""
    trail = _TRAIL.get()
    if trail is not None:
        trail.actor = actor


def printable(text: str, limit: int = 2000) -> str:
    """``text`` with control characters, lone surrogates (undecodable bytes) and NUL escaped, cut at ``limit``."""
    escaped = "".join(character if character.isprintable() and not 0xD800 <= ord(character) <= 0xDFFF
                      else ascii(character)[1:-1] for character in text[:limit])
    return escaped[:limit]


def fhir_response(resource: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(resource, ensure_ascii=False).encode("utf-8"),
                        content_type=FHIR_JSON, charset="utf-8", headers={**NO_STORE, **(headers or {})})


def outcome_response(status: int, code: str, diagnostics: str, details_code: str | None = None,
                     headers: dict[str, str] | None = None) -> web.Response:
    """An OperationOutcome answer; the diagnostics are also what the boundary's audit entry records."""
    safe = printable(diagnostics)
    trail = _TRAIL.get()
    if trail is not None:
        trail.diagnostics = safe
    return fhir_response(operation_outcome(code, safe, details_code=details_code), status, headers)


class TrackedAuditLog(AuditLog):
    """The audit log as the FHIR API writes it: each entry marks the current request as audited."""

    def __init__(self, inner: AuditLog) -> None:
        super().__init__(inner.db, inner.key)
        self._append_lock = inner._append_lock  # one lock per process for every appender of this database

    async def append(self, event: AuditEvent, *, actor: Actor, patient: str | None, source: Source,
                     subject: Subject | None = None, outcome: Outcome | None = None,
                     details: dict[str, Any] | None = None, session: AsyncSession | None = None) -> AuditEntry:
        entry = await super().append(event, actor=actor, patient=patient, source=source, subject=subject,
                                     outcome=outcome, details=details, session=session)
        trail = _TRAIL.get()
        if trail is not None:
            trail.audited = True
        return entry


def audit_boundary(audit: AuditLog, metadata_path: str) -> Any:
    """The middleware: answer every request with FHIR, and audit every request that did not audit itself."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        trail = RequestTrail()
        token = _TRAIL.set(trail)
        try:
            response = await _answer(request, handler)
            if not trail.audited and response.status >= 400:
                await _audit_request(audit, request, response.status, trail)
            elif not trail.audited and not _is_metadata(request, metadata_path):
                log.error("FHIR %s %s answered %d without an audit entry", request.method,
                          printable(request.path, MAX_AUDITED_PATH), response.status)
        finally:
            _TRAIL.reset(token)
        return response

    return middleware


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:  # raised by aiohttp itself (e.g. a body over client_max_size)
        if exc.status < 400:
            raise
        code = ISSUE_CODES.get(exc.status, "processing")
        return outcome_response(exc.status, code, exc.reason, headers=_kept_headers(exc))
    except Exception:
        # A bug, not an input: one traceback in the log, a FHIR answer that says nothing of the internals.
        log.exception("FHIR %s %s failed", request.method, printable(request.path, MAX_AUDITED_PATH))
        return outcome_response(500, "exception", "internal error: the request could not be completed")


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {name: value for name, value in exc.headers.items() if name.lower() in ("allow", "www-authenticate")}


def _is_metadata(request: web.Request, metadata_path: str) -> bool:
    return request.method in ("GET", "HEAD") and request.path == metadata_path


async def _audit_request(audit: AuditLog, request: web.Request, status: int, trail: RequestTrail) -> None:
    """A 4xx is a refusal (ACCESS_REFUSED, outcome ``refused``); a 5xx a failure inside the server
    (COMMAND_FAILED, outcome ``error``), as the other doors record theirs: an auditor tells them apart."""
    event, outcome = ((AuditEvent.COMMAND_FAILED, Outcome.error("server-error")) if status >= 500
                      else (AuditEvent.ACCESS_REFUSED, Outcome.refused(REASONS.get(status, f"http-{status}"))))
    details: dict[str, Any] = {"operation": printable(request.method, 16),
                               "path": printable(request.path, MAX_AUDITED_PATH), "status": status}
    if trail.diagnostics:
        details["diagnostics"] = trail.diagnostics[:500]
    try:
        await audit.append(event, actor=trail.actor or UNAUTHENTICATED, patient=None,
                           source=Source(Door.FHIR, _ip(request)), outcome=outcome, details=details)
    except Exception:  # the answer is an error already: say loudly that its trace is missing
        log.exception("FHIR %s %s answered %d but could not be audited", details["operation"], details["path"], status)


def _ip(request: web.Request) -> str | None:
    try:
        return str(ipaddress.ip_address(peer_host(request.transport) or ""))
    except ValueError:  # a Unix socket, or no peer
        return None

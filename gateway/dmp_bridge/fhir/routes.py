"""HTTP handlers of the FHIR API (aiohttp): ITI-67, ITI-68, read, limited update, metadata.

Every answer is FHIR JSON (``application/fhir+json``) except a Binary read
whose Accept does not ask for FHIR: the document's bytes, as the type the
filing decided from their content (``content_types.py``: never the sender's
declared type), with ``nosniff``, a sandbox CSP and ``attachment`` unless PDF
or plain text (ITI-68). Errors are OperationOutcome: 400 bad request (a
resource id outside the FHIR id syntax, a query that is not percent-encoded
UTF-8 or carries control characters, a header that is not UTF-8 text, a body
that is not JSON, nested deeper than 32 levels or carrying invalid text), 401
no valid credentials (with a Basic challenge), 403 refused by the policy (the
reason code in ``issue.details``), 404 unknown or concealed document (a hidden
or masked document is indistinguishable from one that does not exist), 405
update outside status/securityLabel/isArchived or an unsupported method, 413
a body over 1 MiB (RFC 9110 15.5.14). ``boundary.py`` audits every answer the
service did not audit itself and turns any other exception into a 500.

Emergency access ("bris de glace"): the header ``X-Emergency-Access-Reason``
carries the professional's justification (UTF-8, percent-encoding allowed, no
control characters, at most 1000 characters). Present but blank: 400. The
access is audited as an emergency access.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.audit.log import AuditLog
from gateway.dmp_bridge.access import Emergency, Reason
from gateway.dmp_bridge.content_types import content_headers
from gateway.dmp_bridge.fhir.auth import CallerResolver, Unauthenticated
from gateway.dmp_bridge.fhir.boundary import (
    audit_boundary,
    fhir_response,
    note_audited_by_the_limiter,
    note_caller,
    outcome_response,
)
from gateway.dmp_bridge.fhir.params import MethodNotAllowed, change_from_patch, change_from_resource, search_query
from gateway.dmp_bridge.fhir.resources import (
    binary,
    capability_statement,
    document_reference,
    searchset,
)
from gateway.dmp_bridge.fhir.service import (
    AccessRefused,
    CallContext,
    DocumentMissing,
    InvalidRequest,
    RecordAccessService,
)
from gateway.audit.chain import Door, Source
from gateway.ops.proxied import peer_host
from gateway.security.auth_limiter import AuthThrottled

log = logging.getLogger("gateway.fhir")

EMERGENCY_HEADER = "X-Emergency-Access-Reason"
MAX_EMERGENCY_REASON = 1000  # characters of the professional's justification
MAX_BODY = 1024 * 1024
MAX_JSON_DEPTH = 32  # a DocumentReference is a few levels deep; deeper is an attack on the parser
READ_CHUNK = 64 * 1024
# FHIR R4 id datatype: [A-Za-z0-9\-\.]{1,64}
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BodyTooLarge(Exception):
    """The request body exceeds ``MAX_BODY``: 413 (RFC 9110 15.5.14)."""


@dataclass(frozen=True)
class FhirConfig:
    base_path: str
    page_size: int
    max_page_size: int
    emergency_enabled: bool


def refusal_response(error: AccessRefused) -> web.Response:
    decision = error.decision
    if decision.concealed:
        return outcome_response(404, "not-found", "no such document")
    if decision.reason == Reason.EMERGENCY_WITHOUT_REASON:
        return outcome_response(400, "required", f"{EMERGENCY_HEADER} must state why", decision.reason.value)
    return outcome_response(403, "forbidden", f"access refused: {decision.reason.value}", decision.reason.value)


class FhirRoutes:
    def __init__(self, service: RecordAccessService, resolver: CallerResolver, audit: AuditLog,
                 config: FhirConfig) -> None:
        self.service = service
        self.resolver = resolver
        self.audit = audit
        self.config = config

    def install(self, app: web.Application) -> None:
        app.middlewares.append(audit_boundary(self.audit, f"{self.config.base_path}/metadata"))
        app.router.add_get("/metadata", self.metadata)
        app.router.add_get("/DocumentReference", self.guarded(self.search))
        app.router.add_get("/DocumentReference/{id}", self.guarded(self.read))
        app.router.add_put("/DocumentReference/{id}", self.guarded(self.update))
        app.router.add_patch("/DocumentReference/{id}", self.guarded(self.patch))
        app.router.add_get("/Binary/{id}", self.guarded(self.binary))
        for path in ("/DocumentReference", "/DocumentReference/{id}", "/Binary/{id}"):
            app.router.add_route("*", path, self.not_allowed)
        app.router.add_route("*", "/{tail:.*}", self.unknown)

    # ------------------------------------------------------------------ plumbing

    def base_url(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}{self.config.base_path}"

    def guarded(self, handler: Callable[[web.Request, CallContext], Awaitable[web.StreamResponse]]) -> Handler:
        """Authenticate, check the request's text, then run ``handler``; refusals become OperationOutcomes.

        Nothing is audited here: the service audits what it decides, the boundary middleware every other answer.
        """
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                call = await self._call(request)
                return await handler(request, call)
            except Unauthenticated as exc:
                challenge = 'Basic realm="MSS FHIR", charset="UTF-8"'
                return outcome_response(401, "login", str(exc), headers={"WWW-Authenticate": challenge})
            except AuthThrottled as exc:
                # RFC 6585 4: 429 with Retry-After; the limiter has audited the throttled attempt.
                note_audited_by_the_limiter()
                return outcome_response(429, "throttled", str(exc), headers={"Retry-After": str(exc.retry_after)})
            except AccessRefused as exc:
                return refusal_response(exc)
            except DocumentMissing:
                return outcome_response(404, "not-found", "no such document")
            except InvalidRequest as exc:
                return outcome_response(400, "invalid", str(exc))
            except BodyTooLarge as exc:
                return outcome_response(413, "too-costly", str(exc))
            except MethodNotAllowed as exc:
                return outcome_response(405, "not-supported", str(exc))
        return wrapped

    async def _call(self, request: web.Request) -> CallContext:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        client = peer_host(request.transport)   # behind a trusted proxy: the client its PROXY header named
        requester = await self.resolver.resolve(ssl_object, _header(request, "Authorization"), client or "?")
        source = Source(Door.FHIR, client)
        call = CallContext(requester, source)
        note_caller(call.actor)  # from here on, whatever fails is audited under the caller's name
        _check_id(request)
        _check_query(request)
        return CallContext(requester, source, _emergency(request))

    # ------------------------------------------------------------------ handlers

    async def metadata(self, request: web.Request) -> web.Response:
        return fhir_response(capability_statement(self.base_url(request),
                                                  emergency_enabled=self.config.emergency_enabled))

    async def search(self, request: web.Request, call: CallContext) -> web.Response:
        """ITI-67 Find Document References."""
        query = search_query(request.query, {"date": request.query.getall("date", [])},
                             page_size=self.config.page_size, max_page_size=self.config.max_page_size)
        result = await self.service.search(call, query)
        base = self.base_url(request)
        entries = [document_reference(d, base, archived=d.unique_id in result.archived) for d in result.documents]
        following = query.offset + query.count
        next_url = self._page_url(request, following) if following < result.total else None
        return fhir_response(searchset(entries, result.total, self._page_url(request, query.offset), next_url, base))

    def _page_url(self, request: web.Request, offset: int) -> str:
        params = [(key, value) for key, value in request.query.items() if key != "_offset"] + [("_offset", str(offset))]
        return f"{self.base_url(request)}/DocumentReference?{urllib.parse.urlencode(params)}"

    async def read(self, request: web.Request, call: CallContext) -> web.Response:
        document, archived = await self.service.read(call, request.match_info["id"])
        return fhir_response(document_reference(document, self.base_url(request), archived=archived))

    async def binary(self, request: web.Request, call: CallContext) -> web.Response:
        """ITI-68 Retrieve Document: the bytes, or a FHIR Binary when Accept asks for FHIR JSON."""
        document, content = await self.service.read_content(call, request.match_info["id"])
        if _wants_fhir(request):
            return fhir_response(binary(document, content))
        # The type the filing decided from the content, never the sender's; shown inline only when harmless.
        headers = {"Cache-Control": "no-store", **content_headers(document.mime_type, str(document.id))}
        return web.Response(body=content, headers=headers)

    async def update(self, request: web.Request, call: CallContext) -> web.Response:
        return await self._update(request, call, change_from_resource)

    async def patch(self, request: web.Request, call: CallContext) -> web.Response:
        return await self._update(request, call, change_from_patch)

    async def _update(self, request: web.Request, call: CallContext, parse: Callable[..., Any]) -> web.Response:
        resource_id = request.match_info["id"]
        body = await _json_body(request)
        current, archived = await self.service.current_for_update(call, resource_id)
        change = parse(document_reference(current, self.base_url(request), archived=archived), body, resource_id)
        updated, archived = await self.service.update(call, resource_id, change)
        return fhir_response(document_reference(updated, self.base_url(request), archived=archived))

    async def not_allowed(self, request: web.Request) -> web.Response:
        return outcome_response(405, "not-supported", f"{request.method} is not supported on {request.path}")

    async def unknown(self, request: web.Request) -> web.Response:
        return outcome_response(404, "not-supported", f"no FHIR endpoint at {request.path}")


def _wants_fhir(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    fmt = request.query.get("_format", "")
    return "application/fhir+json" in accept or fmt in ("json", "application/fhir+json")


def _header(request: web.Request, name: str) -> str | None:
    """A header's value; aiohttp keeps undecodable bytes as lone surrogates, which are refused here."""
    value = request.headers.get(name)
    if value is not None and not _is_text(value, allow_controls=False):
        raise InvalidRequest(f"the {name} header is not UTF-8 text", field=name)
    return value


def _check_id(request: web.Request) -> None:
    resource_id = request.match_info.get("id")
    if resource_id is not None and not FHIR_ID.fullmatch(resource_id):
        raise InvalidRequest("a resource id is 1 to 64 letters, digits, '-' or '.' (FHIR id)", field="id")


def _check_query(request: web.Request) -> None:
    """RFC 3986 2.5 / FHIR search: the query is percent-encoded UTF-8, and no parameter carries control characters."""
    for pair in request.rel_url.raw_query_string.split("&"):
        for part in pair.split("=", 1):
            try:
                text = urllib.parse.unquote_to_bytes(part.replace("+", " ")).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest("the query string is not percent-encoded UTF-8", field="query") from None
            if not _is_text(text, allow_controls=False):
                raise InvalidRequest("a search parameter contains control characters", field="query")


def _emergency(request: web.Request) -> Emergency | None:
    """The justification of ``X-Emergency-Access-Reason``: UTF-8, percent-encoding allowed, printable, bounded."""
    raw = _header(request, EMERGENCY_HEADER)
    if raw is None:
        return None
    try:
        reason = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{EMERGENCY_HEADER} is not UTF-8 text (percent-encoded UTF-8 is allowed)",
                             field=EMERGENCY_HEADER) from None
    if not _is_text(reason, allow_controls=False):
        raise InvalidRequest(f"{EMERGENCY_HEADER} must not contain control characters", field=EMERGENCY_HEADER)
    if len(reason) > MAX_EMERGENCY_REASON:
        raise InvalidRequest(f"{EMERGENCY_HEADER} is longer than {MAX_EMERGENCY_REASON} characters",
                             field=EMERGENCY_HEADER)
    return Emergency(reason.strip())


def _is_text(value: str, *, allow_controls: bool) -> bool:
    """Valid Unicode (no lone surrogate from undecodable bytes) and, unless allowed, no control character."""
    for character in value:
        category = unicodedata.category(character)
        if category == "Cs" or (category == "Cc" and not allow_controls):
            return False
    return True


async def _json_body(request: web.Request) -> Any:
    """The body as JSON: at most ``MAX_BODY`` bytes, at most ``MAX_JSON_DEPTH`` levels, valid Unicode text."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BodyTooLarge(f"the body is larger than {MAX_BODY} bytes")
    raw = await _bounded_body(request)
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidRequest(f"the body is nested too deep (at most {MAX_JSON_DEPTH} levels)", field="body") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not JSON", field="body") from None
    _check_json(value)
    return value


async def _bounded_body(request: web.Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(READ_CHUNK):
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyTooLarge(f"the body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_json(value: Any) -> None:
    """Walk the parsed body without recursion: depth bounded, every string and key valid text without NUL."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the body is nested too deep (at most {MAX_JSON_DEPTH} levels)", field="body")
        if isinstance(item, str) and (not _is_text(item, allow_controls=True) or "\x00" in item):
            raise InvalidRequest("the body contains a string that is not valid text", field="body")
        if isinstance(item, dict):
            pending.extend((key, depth + 1) for key in item)
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)

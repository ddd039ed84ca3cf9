"""HTTP handlers of the FHIR API (aiohttp): ITI-67, ITI-68, read, limited update, metadata.

Every answer is FHIR JSON (``application/fhir+json``) except a Binary read
whose Accept does not ask for FHIR: the document's own bytes and MIME type
(ITI-68). Errors are OperationOutcome: 400 bad request, 401 no valid
credentials (with a Basic challenge), 403 refused by the policy (the reason
code in ``issue.details``), 404 unknown or concealed document (a hidden or
masked document is indistinguishable from one that does not exist), 405
update outside status/securityLabel/isArchived or an unsupported method.

Emergency access ("bris de glace"): the header ``X-Emergency-Access-Reason``
carries the professional's justification (UTF-8, percent-encoding allowed).
Present but blank: 400. The access is audited as an emergency access.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.audit.chain import Actor, Door, Outcome, Source
from gateway.audit.events import AuditEvent
from gateway.audit.log import AuditLog
from gateway.dmp_bridge.access import Emergency, Reason
from gateway.dmp_bridge.fhir.auth import CallerResolver, Unauthenticated
from gateway.dmp_bridge.fhir.params import MethodNotAllowed, change_from_patch, change_from_resource, search_query
from gateway.dmp_bridge.fhir.resources import (
    FHIR_JSON,
    binary,
    capability_statement,
    document_reference,
    operation_outcome,
    searchset,
)
from gateway.dmp_bridge.fhir.service import (
    AccessRefused,
    CallContext,
    DocumentMissing,
    InvalidRequest,
    RecordAccessService,
    SearchQuery,
)

log = logging.getLogger("gateway.fhir")

EMERGENCY_HEADER = "X-Emergency-Access-Reason"
MAX_BODY = 1024 * 1024
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class FhirConfig:
    base_path: str
    page_size: int
    max_page_size: int
    emergency_enabled: bool


def fhir_response(resource: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(resource, ensure_ascii=False).encode("utf-8"),
                        content_type=FHIR_JSON, charset="utf-8", headers={**NO_STORE, **(headers or {})})


def outcome_response(status: int, code: str, diagnostics: str, details_code: str | None = None,
                     headers: dict[str, str] | None = None) -> web.Response:
    return fhir_response(operation_outcome(code, diagnostics, details_code=details_code), status, headers)


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
        """Authenticate, then run ``handler``; map refusals to OperationOutcome responses."""
        async def wrapped(request: web.Request) -> web.StreamResponse:
            source = Source(Door.FHIR, request.remote)
            try:
                call = await self._call(request, source)
                return await handler(request, call)
            except Unauthenticated as exc:
                return await self._unauthenticated(request, source, str(exc))
            except AccessRefused as exc:
                return refusal_response(exc)
            except DocumentMissing:
                return outcome_response(404, "not-found", "no such document")
            except InvalidRequest as exc:
                return outcome_response(400, "invalid", str(exc))
            except MethodNotAllowed as exc:
                return outcome_response(405, "not-supported", str(exc))
        return wrapped

    async def _call(self, request: web.Request, source: Source) -> CallContext:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        requester = await self.resolver.resolve(ssl_object, request.headers.get("Authorization"))
        return CallContext(requester, source, self._emergency(request))

    def _emergency(self, request: web.Request) -> Emergency | None:
        raw = request.headers.get(EMERGENCY_HEADER)
        return None if raw is None else Emergency(urllib.parse.unquote(raw).strip())

    async def _unauthenticated(self, request: web.Request, source: Source, why: str) -> web.Response:
        """401, audited: nobody is named, so the entry is filed under no patient."""
        await self.audit.append(AuditEvent.ACCESS_REFUSED, actor=Actor.system("fhir-unauthenticated"), patient=None,
                                source=source, outcome=Outcome.refused("unauthenticated"),
                                details={"operation": request.method, "path": request.path[:256]})
        challenge = 'Basic realm="MSS FHIR", charset="UTF-8"'
        return outcome_response(401, "login", why, headers={"WWW-Authenticate": challenge})

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
        return web.Response(body=content, headers={**NO_STORE, "Content-Type": document.mime_type})

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


async def _json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidRequest("the body is too large", field="body")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise InvalidRequest("the body is too large", field="body")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not JSON", field="body") from None

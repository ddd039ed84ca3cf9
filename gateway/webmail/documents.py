"""My documents: the patient's record from the DMP bridge, filtered, opened, downloaded, hidden from professionals.

Every read goes through ``dmp_bridge.patient_space.PatientDocuments`` with the
signed-in patient as requester (the FHIR API's access policy and audit
entries; no notice to themselves). A document id in a URL that is not this
patient's, or that they may not see, is answered 404 like a missing one.

A PDF is never inlined into a page: the page frames ``/documents/<id>/pdf``,
and that response carries ``Content-Security-Policy: sandbox; default-src
'none'`` (an opaque origin: no script, no same-origin access, no form, no
navigation of the page, nothing fetched), ``X-Content-Type-Options: nosniff``
and ``Content-Disposition: inline``. The sandbox is the response's, not an
``<iframe sandbox>`` attribute: chromium refuses to run its PDF viewer in a
sandboxed frame (a blank frame, seen in the browser test's screenshots), and
the CSP sandbox puts the same restrictions on the framed document. A
CDA's narrative is shown as sanitised HTML (``dmp_bridge.narrative``). The
download is ``Content-Disposition: attachment`` with ``application/octet-stream``
for the filed XML, so a browser never renders it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from markupsafe import Markup

from gateway.dmp_bridge.access_history import AccessHistory
from gateway.dmp_bridge.fhir.server import record_access_from
from gateway.dmp_bridge.narrative import ReadableKind
from gateway.dmp_bridge.patient_choices import LoggingNotifier
from gateway.dmp_bridge.patient_export import PatientExport
from gateway.dmp_bridge.patient_space import (
    DocumentFilter,
    OpenedDocument,
    PatientCaller,
    PatientControls,
    PatientDocuments,
    document_day,
)
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import RecordDocument
from gateway.errors import NotFound, UserError
from gateway.webmail.auth import PatientIdentity, require_patient
from gateway.webmail.web import N_, add_nav, client_ip, context, refusal, render, translate

PAGE_SIZE = 50
PDF_CSP = "sandbox; default-src 'none'; frame-ancestors 'self'"
DOWNLOAD_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                    "Content-Security-Policy": "sandbox; default-src 'none'"}


@dataclass(frozen=True)
class RecordPages:
    """The record services the webmail's pages share (built once per application)."""

    documents: PatientDocuments
    controls: PatientControls
    history: AccessHistory
    export: PatientExport


def record_pages(request: web.Request) -> RecordPages:
    ctx = context(request)
    pages = ctx.extras.get("record")
    if pages is None:
        services, settings = ctx.services, ctx.settings
        access, audit = record_access_from(services, settings, audit=services.audit, notifier=LoggingNotifier())
        store = RecordStore(services.db, services.blobs, getattr(services, "fields", None))
        history = AccessHistory(services.db, audit, store)
        pages = RecordPages(PatientDocuments(access),
                            PatientControls(services.db, access.choices, services.directory,
                                            retention_days=settings.retention.closed_patient_days),
                            history, PatientExport(access, store, services.mailstore, history))
        ctx.extras["record"] = pages
    assert isinstance(pages, RecordPages)
    return pages


def caller_of(request: web.Request, patient: PatientIdentity) -> PatientCaller:
    return PatientCaller(patient.ins, patient.display_name, client_ip(request))


def install(app: web.Application) -> None:
    app.router.add_get("/documents", documents_list)
    app.router.add_get("/documents/{id}", document_page)
    app.router.add_get("/documents/{id}/pdf", document_pdf)
    app.router.add_get("/documents/{id}/telecharger", document_download)
    app.router.add_post("/documents/{id}/masquer", hide_document)
    app.router.add_post("/documents/{id}/afficher", unhide_document)
    add_nav(app, "/documents", N_("My documents"))


# ------------------------------------------------------------------ list


async def documents_list(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    wanted, errors = _filter(request)
    page = _page_number(request)
    listing = await record_pages(request).documents.listing(caller_of(request, patient), wanted,
                                                            offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)
    return render(request, "documents.html", {
        "documents": [_row(d, listing.hidden) for d in listing.documents], "types": listing.types,
        "total": listing.total, "matching": listing.matching, "filter": wanted, "errors": errors, "page": page,
        "pages": max(1, -(-listing.matching // PAGE_SIZE)), "query": _query_without_page(request)})


def _filter(request: web.Request) -> tuple[DocumentFilter, list[str]]:
    errors: list[str] = []
    since = _date(request.query.get("du", ""), errors, N_("The start date is not a valid date."))
    until = _date(request.query.get("au", ""), errors, N_("The end date is not a valid date."))
    type_code = request.query.get("type", "").strip()[:64] or None
    superseded = request.query.get("versions", "toutes") != "actuelles"
    return DocumentFilter(type_code, since, until, superseded), [translate(request, e) for e in errors]


def _date(value: str, errors: list[str], message: str) -> dt.date | None:
    if not value.strip():
        return None
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        errors.append(message)
        return None


def _page_number(request: web.Request) -> int:
    value = request.query.get("page", "1")
    return int(value) if value.isascii() and value.isdigit() and 0 < int(value) < 100_000 else 1


def _query_without_page(request: web.Request) -> str:
    from urllib.parse import urlencode
    return urlencode([(k, v) for k, v in request.query.items() if k != "page"])


def _row(document: RecordDocument, hidden: frozenset[str]) -> dict[str, Any]:
    return {"id": document.id, "title": document.title or document.type_display or "", "type": document.type_display,
            "day": document_day(document), "author": document.author_name, "organisation": document.author_organisation_name,
            "superseded": document.status == "superseded", "hidden": document.unique_id in hidden,
            "pdf": document.mime_type == "application/pdf"}


# ------------------------------------------------------------------ one document


async def _opened(request: web.Request) -> tuple[PatientIdentity, OpenedDocument]:
    patient = await require_patient(request)
    try:
        opened = await record_pages(request).documents.open(caller_of(request, patient), request.match_info["id"])
    except NotFound:
        raise web.HTTPNotFound() from None
    return patient, opened


async def document_page(request: web.Request) -> web.StreamResponse:
    patient, opened = await _opened(request)
    document, readable = opened.document, opened.readable
    pages = record_pages(request)
    choices = await pages.documents.access.choices.choices(patient.ins)
    newer = await _newer_version(request, patient, document)
    return render(request, "document.html", {
        "document": _row(document, choices.hidden_documents), "readable": readable, "kind": readable.kind.value,
        "sections": [{"title": s.title, "html": Markup(s.html), "level": min(s.depth + 1, 6)}  # noqa: S704 (nh3-sanitised)
                     for s in readable.sections] if readable.kind == ReadableKind.SECTIONS else [],
        "newer": newer, "unique_id": document.unique_id, "done": request.query.get("fait")})


async def _newer_version(request: web.Request, patient: PatientIdentity, document: RecordDocument) -> int | None:
    if not document.superseded_by_unique_id:
        return None
    try:
        newer = await record_pages(request).documents.row(caller_of(request, patient),
                                                           unique_id=document.superseded_by_unique_id)
    except NotFound:
        return None
    return newer.id


async def document_pdf(request: web.Request) -> web.StreamResponse:
    """The PDF (filed as such, or a level-1 CDA's), inline but sandboxed: it can run nothing in our origin."""
    _patient, opened = await _opened(request)
    if opened.readable.pdf is None:
        raise web.HTTPNotFound()
    return web.Response(body=opened.readable.pdf, content_type="application/pdf", headers={
        "Content-Disposition": 'inline; filename="document.pdf"', "Content-Security-Policy": PDF_CSP,
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "X-Frame-Options": "SAMEORIGIN"})


async def document_download(request: web.Request) -> web.StreamResponse:
    """The document as filed (the CDA's XML or the PDF), as an attachment: saved, never rendered here."""
    _patient, opened = await _opened(request)
    document = opened.document
    is_pdf = document.mime_type == "application/pdf"
    name = f"document-{document_day(document).isoformat()}-{document.id}.{'pdf' if is_pdf else 'xml'}"
    return web.Response(body=opened.content, content_type="application/pdf" if is_pdf else "application/octet-stream",
                        headers={**DOWNLOAD_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'})


async def hide_document(request: web.Request) -> web.StreamResponse:
    return await _set_hidden(request, hidden=True)


async def unhide_document(request: web.Request) -> web.StreamResponse:
    return await _set_hidden(request, hidden=False)


async def _set_hidden(request: web.Request, *, hidden: bool) -> web.StreamResponse:
    """Hide or show again; an id that is not this patient's (or not visible to them) is 404."""
    patient = await require_patient(request)
    pages = record_pages(request)
    caller = caller_of(request, patient)
    try:
        document = await pages.documents.row(caller, document_id=request.match_info["id"])
        if hidden:
            await pages.controls.hide(caller, document.unique_id)
        else:
            await pages.controls.unhide(caller, document.unique_id)
    except NotFound:
        # Reading another patient's document is refused (and audited) by the record's access policy; this
        # control refuses without an entry of its own, so the door writes one.
        raise refusal(request, web.HTTPNotFound(), "not-yours") from None
    except UserError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    raise web.HTTPSeeOther(f"/documents/{document.id}?fait={'masque' if hidden else 'visible'}")

"""ITI-68 Binary: the type the filing decided, never the sender's, with nosniff, a sandbox CSP and attachment.

The end-to-end attack (a CDA mailed as text/html with a script, read back over
``gateway serve``'s HTTPS listener) is in ``test_serve_attacks.py``; here the
decision itself and the rows filed before it existed.
"""

from __future__ import annotations

import pytest
from sqlalchemy import update

from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.content_types import CDA_XML, OPAQUE, PDF, PLAIN_TEXT, content_headers, decided_type
from gateway.dmp_bridge.extract import ExtractedDocument
from gateway.dmp_bridge.fhir.service import RecordAccessService
from gateway.dmp_bridge.pdf import inspect_pdf
from gateway.dmp_bridge.tables import RecordDocument
from tests.fhir.world import VACCINATION_ID, FhirWorld

MINIMAL_PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
               b"trailer<</Root 1 0 R>>\n%%EOF\n")


def extracted(content: bytes, declared: str, **kwargs: object) -> ExtractedDocument:
    return ExtractedDocument("xdm", "IHE_XDM.ZIP", "DOC0001", declared, content, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("content", "declared", "decided"), [
    (b"<html><script>alert(1)</script></html>", "text/html", OPAQUE),
    (b"<html><script>alert(1)</script></html>", "text/plain", PLAIN_TEXT),  # shown as text, never run
    (b"<svg onload=alert(1)>", "image/svg+xml", OPAQUE),
    ("Compte rendu: tension 12/8, RAS.\n".encode(), "text/plain; charset=utf-8", PLAIN_TEXT),
    (b"\xff\xfe not utf-8", "text/plain", OPAQUE),
    (b"text with a \x1b[31m terminal escape", "text/plain", OPAQUE),
    (MINIMAL_PDF, "text/html", PDF),
    (b"PK\x03\x04 a zip", "application/pdf", OPAQUE),
])
def test_the_filing_decides_the_type_from_the_content(content: bytes, declared: str, decided: str) -> None:
    assert decided_type(extracted(content, declared)) == decided


def test_a_parsed_pdf_or_cda_keeps_its_type_whatever_was_declared() -> None:
    assert decided_type(extracted(MINIMAL_PDF, "text/html", pdf=inspect_pdf(MINIMAL_PDF))) == PDF


@pytest.mark.parametrize(("stored", "content_type", "disposition"), [
    (PDF, "application/pdf", "inline"),
    (PLAIN_TEXT, "text/plain; charset=utf-8", "inline"),
    (CDA_XML, "text/xml", "attachment"),
    (OPAQUE, "application/octet-stream", "attachment"),
    ("text/html", "application/octet-stream", "attachment"),  # a row filed before the decision existed
    ("image/svg+xml", "application/octet-stream", "attachment"),
])
def test_served_headers(stored: str, content_type: str, disposition: str) -> None:
    headers = content_headers(stored, "7")
    assert headers["Content-Type"] == content_type
    assert headers["Content-Disposition"].split(";")[0] == disposition
    assert headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_a_row_stored_with_a_declared_html_type_is_served_as_an_opaque_attachment(fhir: FhirWorld) -> None:
    async with fhir.world.db.session() as session:
        await session.execute(update(RecordDocument).where(RecordDocument.unique_id == VACCINATION_ID)
                              .values(mime_type="text/html"))
    target = fhir.documents[VACCINATION_ID]
    async with fhir.client("doctor") as client:
        content = await client.get(f"/Binary/{target}")
        wrapped = await client.get(f"/Binary/{target}", headers={"Accept": "application/fhir+json"})
        reference = await client.get(f"/DocumentReference/{target}")
    assert content.status_code == 200
    assert content.headers["Content-Type"] == "application/octet-stream"
    assert content.headers["Content-Disposition"] == f'attachment; filename="document-{target}.bin"'
    assert content.headers["X-Content-Type-Options"] == "nosniff"
    assert content.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert wrapped.json()["contentType"] == "application/octet-stream"
    assert reference.json()["content"][0]["attachment"]["contentType"] == "application/octet-stream"


async def test_a_filed_cda_is_text_xml_as_an_attachment(fhir: FhirWorld) -> None:
    async with fhir.client("doctor") as client:
        content = await client.get(f"/Binary/{fhir.documents[VACCINATION_ID]}")
    assert content.status_code == 200
    assert content.headers["Content-Type"] == "text/xml"
    assert content.headers["Content-Disposition"].startswith("attachment;")


async def test_an_unexpected_error_is_a_500_operation_outcome_and_audited(fhir: FhirWorld,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (here a service that fails) answers FHIR, tells nothing of the internals, and leaves its trace."""
    async def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("secret internals /var/lib/gateway")

    monkeypatch.setattr(RecordAccessService, "read", broken)
    head = await fhir.audit.head()
    before = head.seq if head is not None else 0
    async with fhir.client("doctor") as client:
        response = await client.get(f"/DocumentReference/{fhir.documents[VACCINATION_ID]}")
        still = await client.get(f"/Binary/{fhir.documents[VACCINATION_ID]}")
    assert response.status_code == 500 and still.status_code == 200
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "exception"
    assert "secret" not in response.text
    entries = [e for e in await fhir.audit.search(events=[AuditEvent.ACCESS_REFUSED, AuditEvent.COMMAND_FAILED],
                                                  limit=10) if e.seq > before]
    assert [(e.event_code, e.actor.id, e.outcome.status, e.outcome.reason, e.details["status"]) for e in entries] == [
        (AuditEvent.COMMAND_FAILED, fhir.people.idnps["doctor"], "error", "server-error", 500)]

"""The MIME type of a filed document: decided from its content at filing, never taken from the sender.

A sender declares a type (the MIME part's Content-Type, or XDM METADATA's
``mimeType``), and a declared ``text/html`` served back as is would run its
scripts in whatever browser shows it (a stored XSS in the webmail). The
filing therefore stores the type the gateway recognised:

- a PDF (``%PDF-`` magic, inspected by ``pdf.py``): ``application/pdf``;
- a CDA R2 document (parsed by ``cda.py``): ``text/xml`` (CI-SIS, IHE XDS-SD);
- text declared ``text/plain`` that is UTF-8 without control characters: ``text/plain``;
- anything else: ``application/octet-stream``.

Serving (ITI-68 Binary) sends only these types, with ``nosniff``, a
sandboxing CSP, and ``Content-Disposition: attachment`` for everything but
PDF and plain text, which a browser shows without running anything.
Rows filed before this decision existed are served as
``application/octet-stream`` unless their stored type is one of these.
"""

from __future__ import annotations

from gateway.dmp_bridge.extract import ExtractedDocument
from gateway.dmp_bridge.pdf import looks_like_pdf

PDF = "application/pdf"
CDA_XML = "text/xml"
PLAIN_TEXT = "text/plain"
OPAQUE = "application/octet-stream"
SERVED_TYPES = frozenset({PDF, CDA_XML, PLAIN_TEXT, OPAQUE})
SHOWN_INLINE = frozenset({PDF, PLAIN_TEXT})
EXTENSIONS = {PDF: "pdf", CDA_XML: "xml", PLAIN_TEXT: "txt", OPAQUE: "bin"}
# RFC 9110 12.5.1 / CSP 3: nothing may load, and the document runs in a unique origin without scripts.
SANDBOX_POLICY = "default-src 'none'; sandbox"


def decided_type(document: ExtractedDocument) -> str:
    """The type to store for ``document``, from what the extraction recognised in its bytes."""
    if document.pdf is not None or looks_like_pdf(document.content):
        return PDF
    if document.cda is not None:
        return CDA_XML
    declared = document.mime_type.split(";", 1)[0].strip().casefold()
    if declared == PLAIN_TEXT and _is_plain_text(document.content):
        return PLAIN_TEXT
    return OPAQUE


def served_type(stored: str) -> str:
    """The type a stored document is served as (a row filed before the decision may hold a declared one)."""
    return stored if stored in SERVED_TYPES else OPAQUE


def content_headers(stored: str, document_id: str) -> dict[str, str]:
    """Content-Type, Content-Disposition and CSP of a document's bytes sent to a browser or a client."""
    kind = served_type(stored)
    disposition = "inline" if kind in SHOWN_INLINE else "attachment"
    content_type = f"{kind}; charset=utf-8" if kind == PLAIN_TEXT else kind
    filename = f"document-{document_id}.{EXTENSIONS[kind]}"
    return {"Content-Type": content_type, "Content-Disposition": f'{disposition}; filename="{filename}"',
            "Content-Security-Policy": SANDBOX_POLICY, "X-Content-Type-Options": "nosniff"}


def _is_plain_text(content: bytes) -> bool:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(character.isprintable() or character in "\t\r\n" for character in text)

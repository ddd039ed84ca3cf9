"""Find the medical documents a delivered message carries (mssante.md §3.3 and §7, DMP bridge).

Three kinds of attachment are documents:
- an IHE XDM zip: named ``IHE_XDM.ZIP`` in any case, or any zip when the
  subject carries the XDM "ZIP over e-mail" marker ``XDM/1.0/DDM``;
- a bare CDA R2: an XML part (``text/xml``, ``application/xml`` or ``.xml``)
  whose root is ``ClinicalDocument`` in ``urn:hl7-org:v3``;
- a PDF (``application/pdf``, ``.pdf``, or ``%PDF-`` magic in an octet stream).

One bad attachment never stops the others: its failure is collected with a
reason and CI-SIS code 906. The MIME tree is walked to a bounded depth and
part count; attached messages (``message/rfc822``) are not entered, since the
original message quoted in a report or a forward is not this sender's filing.
"""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from typing import Literal, cast

from gateway.dmp_bridge.cda import CdaDocument, cda_from_element, is_cda_root
from gateway.dmp_bridge.errors import DocumentError, IntegrationCode, NotACdaError
from gateway.dmp_bridge.formats import check_cda_body, looks_like_dicom, looks_like_html, refuse_unsupported
from gateway.dmp_bridge.patient import PatientIdentity, identify_patient
from gateway.dmp_bridge.pdf import DEFAULT_MAX_PDF_BYTES, PdfInfo, inspect_pdf, looks_like_pdf
from gateway.dmp_bridge.safe_xml import DEFAULT_XML_LIMITS, XmlLimits, local_name, parse_xml
from gateway.dmp_bridge.xdm import DEFAULT_ZIP_LIMITS, DocumentEntry, SubmissionSet, XdmDocument, XdmPackage, ZipLimits, read_xdm

DocumentSource = Literal["xdm", "cda", "pdf"]
_AttachmentKind = Literal["xdm", "xml", "pdf"]

XDM_SUBJECT_MARKER = "xdm/1.0/ddm"
XDM_ATTACHMENT_NAME = "ihe_xdm.zip"
XMLDSIG_FORMAT = "http://www.w3.org/2000/09/xmldsig#"
_ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/x-zip"})
_XML_TYPES = frozenset({"text/xml", "application/xml", "application/hl7-v3+xml", "application/hl7-cda+xml"})


@dataclass(frozen=True)
class ExtractionLimits:
    max_mime_depth: int = 10
    max_parts: int = 200
    max_attachment_bytes: int = 64 * 1024 * 1024
    max_pdf_bytes: int = DEFAULT_MAX_PDF_BYTES
    xml: XmlLimits = DEFAULT_XML_LIMITS
    zip: ZipLimits = DEFAULT_ZIP_LIMITS


DEFAULT_EXTRACTION_LIMITS = ExtractionLimits()


class _RememberingHeaderRegistry(HeaderRegistry):
    """``email.policy.default``'s header parser, remembering what it parsed.

    Under that policy every ``part.get_content_type()`` (the parser asks it of
    each part, the walk asks it again) parses the Content-Type header anew:
    it was the largest share of a filing's CPU. A parsed header is immutable
    (a ``str`` with its parse tree, parameters and defects), so one parse of a
    given (name, value) serves every later read, in any message and thread."""

    MAX_VALUE = 2048  # longer values (rare: a folded address list) are parsed each time
    MAX_ENTRIES = 4096  # then forgotten all at once: a bounded memory, whatever the traffic

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[tuple[str, str], BaseHeader] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Callable[[], HeaderRegistry], tuple[()]]:
        # A parsed message sent to another process (the filing's extraction processes) names the registry
        # of the process that receives it (its lock and memory are not sent).
        return _filing_header_factory, ()

    def __call__(self, name: str, value: str) -> BaseHeader:
        if len(value) > self.MAX_VALUE:
            return super().__call__(name, value)
        key = (name, value)
        header = self._parsed.get(key)
        if header is None:
            header = super().__call__(name, value)
            with self._lock:
                if len(self._parsed) >= self.MAX_ENTRIES:
                    self._parsed.clear()
                self._parsed[key] = header
        return header


FILING_POLICY = email.policy.default.clone(header_factory=_RememberingHeaderRegistry())


def _filing_header_factory() -> HeaderRegistry:
    return cast(HeaderRegistry, FILING_POLICY.header_factory)


def parse_message(raw: bytes) -> EmailMessage:
    """``raw`` as the filing reads it: ``email.policy.default``, each distinct header value parsed once."""
    message = email.message_from_bytes(raw, policy=FILING_POLICY)
    assert isinstance(message, EmailMessage)
    return message


@dataclass(frozen=True)
class ExtractedDocument:
    """One document found in the message, with everything parsed from it."""

    source: DocumentSource
    attachment: str  # the attachment it came from (file name, or "part N")
    filename: str | None  # the document's own name (the archive member for XDM)
    mime_type: str
    content: bytes
    cda: CdaDocument | None = None
    pdf: PdfInfo | None = None
    xdm_entry: DocumentEntry | None = None
    xdm_submission_set: SubmissionSet | None = None
    is_signature: bool = False  # an IHE DSG signature of other entries, not a report
    # A PDF beside an XDM or CDA is normally their rendering (CI-SIS ECO.2.1.1).
    accompanies_structured: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtractionFailure:
    attachment: str
    reason: str
    code: IntegrationCode = IntegrationCode.OTHER


@dataclass(frozen=True)
class ExtractionResult:
    documents: tuple[ExtractedDocument, ...]
    failures: tuple[ExtractionFailure, ...]
    packages: tuple[XdmPackage, ...] = ()
    notes: tuple[str, ...] = ()  # attachments looked at and found not to be documents

    @property
    def xdm_cda_documents(self) -> tuple[ExtractedDocument, ...]:
        return tuple(d for d in self.documents if d.source == "xdm" and d.cda is not None)


@dataclass
class _Collector:
    documents: list[ExtractedDocument] = field(default_factory=list)
    failures: list[ExtractionFailure] = field(default_factory=list)
    packages: list[XdmPackage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def extract_documents(message: EmailMessage, *, limits: ExtractionLimits = DEFAULT_EXTRACTION_LIMITS) -> ExtractionResult:
    """Every document of ``message`` (parsed with ``email.policy.default``, or ``parse_message``), and why
    others failed."""
    collector = _Collector()
    subject = str(message.get("Subject", "") or "")
    for number, part in _leaf_parts(message, limits, collector):
        label = _attachment_label(part, number)
        try:
            _extract_part(part, label, subject, limits, collector)
        except DocumentError as error:
            collector.failures.append(ExtractionFailure(label, str(error), error.code))
    return ExtractionResult(_mark_companions(collector.documents), tuple(collector.failures), tuple(collector.packages), tuple(collector.notes))


# -- MIME walk -----------------------------------------------------------------------------------


def _leaf_parts(message: Message, limits: ExtractionLimits, collector: _Collector) -> Iterator[tuple[int, Message]]:
    """Leaf parts in order, within the depth and part-count limits (breaches are recorded as failures)."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > limits.max_parts:
            collector.failures.append(ExtractionFailure("message", f"more than {limits.max_parts} MIME parts: the rest is not examined"))
            return
        if part.get_content_maintype() == "message":
            continue
        if part.is_multipart():
            if depth >= limits.max_mime_depth:
                collector.failures.append(ExtractionFailure("message", f"MIME nesting deeper than {limits.max_mime_depth} levels: not examined"))
                continue
            children = part.get_payload()
            stack.extend((child, depth + 1) for child in reversed(children if isinstance(children, list) else [])
                         if isinstance(child, Message))
            continue
        yield seen, part


def _attachment_label(part: Message, number: int) -> str:
    try:
        filename = part.get_filename()
    except (ValueError, LookupError, UnicodeError):
        filename = None
    return filename or f"part {number} ({part.get_content_type()})"


def _filename(part: Message) -> str:
    try:
        return (part.get_filename() or "").strip()
    except (ValueError, LookupError, UnicodeError):
        return ""


def _payload(part: Message, limits: ExtractionLimits) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except (ValueError, LookupError, UnicodeError) as error:
        raise DocumentError(f"attachment cannot be decoded: {error}") from None
    if not isinstance(payload, bytes):
        raise DocumentError("attachment has no decodable content")
    if len(payload) > limits.max_attachment_bytes:
        raise DocumentError(f"attachment of {len(payload)} bytes refused: the limit is {limits.max_attachment_bytes} bytes")
    return payload


def _kind(part: Message, subject: str, payload: bytes) -> _AttachmentKind | None:
    name = _filename(part).casefold()
    content_type = part.get_content_type()
    if name == XDM_ATTACHMENT_NAME:
        return "xdm"
    if (content_type in _ZIP_TYPES or name.endswith(".zip")) and XDM_SUBJECT_MARKER in subject.casefold():
        return "xdm"
    if content_type in _XML_TYPES or name.endswith(".xml"):
        return "xml"
    if content_type == "application/pdf" or name.endswith(".pdf") or looks_like_pdf(payload):
        return "pdf"
    return None


def _extract_part(part: Message, label: str, subject: str, limits: ExtractionLimits, collector: _Collector) -> None:
    if part.get_content_type() in ("text/plain", "text/html") and not _filename(part):
        return  # the message body
    payload = _payload(part, limits)
    kind = _kind(part, subject, payload)
    if kind == "xdm":
        _extract_xdm(payload, label, limits, collector)
    elif kind == "xml":
        _extract_cda(payload, label, _filename(part) or None, part.get_content_type(), limits, collector)
    elif kind == "pdf":
        pdf = inspect_pdf(payload, max_bytes=limits.max_pdf_bytes)
        collector.documents.append(ExtractedDocument("pdf", label, _filename(part) or None, "application/pdf", payload, pdf=pdf))


# -- bare CDA ----------------------------------------------------------------------------------------


def _extract_cda(payload: bytes, label: str, filename: str | None, content_type: str, limits: ExtractionLimits, collector: _Collector) -> None:
    root = parse_xml(payload, limits=limits.xml)
    if not is_cda_root(root):
        collector.notes.append(f"{label}: XML whose root is <{local_name(root.tag)}>, not a CDA document; not filed")
        return
    cda = cda_from_element(root, max_body_bytes=limits.max_attachment_bytes)
    check_cda_body(cda)
    collector.documents.append(ExtractedDocument("cda", label, filename, content_type, payload, cda=cda, warnings=cda.warnings))


# -- XDM ----------------------------------------------------------------------------------------------


def _extract_xdm(payload: bytes, label: str, limits: ExtractionLimits, collector: _Collector) -> None:
    package = read_xdm(payload, limits=limits.zip, xml_limits=limits.xml)
    collector.packages.append(package)
    signatures = package.signature_entry_ids
    for subset in package.subsets:
        for document in subset.documents:
            member_label = f"{label}: {document.path}"
            try:
                collector.documents.append(_xdm_document(document, subset.submission_set, label, signatures, limits))
            except DocumentError as error:
                collector.failures.append(ExtractionFailure(member_label, str(error), error.code))


def _xdm_document(document: XdmDocument, submission_set: SubmissionSet | None, attachment: str, signatures: frozenset[str], limits: ExtractionLimits) -> ExtractedDocument:
    entry = document.entry
    is_signature = entry.entry_id in signatures or (entry.format_code is not None and entry.format_code.code == XMLDSIG_FORMAT)
    base = ExtractedDocument(
        "xdm", attachment, document.path, entry.mime_type or "application/octet-stream", document.content,
        xdm_entry=entry, xdm_submission_set=submission_set, is_signature=is_signature,
    )
    if looks_like_pdf(document.content):
        return replace(base, pdf=inspect_pdf(document.content, max_bytes=limits.max_pdf_bytes))
    if is_signature or looks_like_dicom(document.content):
        return base
    if not _looks_like_xml(document.content, entry.mime_type) or looks_like_html(document.content):
        refuse_unsupported(document.path, document.content, entry.mime_type)
    try:
        root = parse_xml(document.content, limits=limits.xml)
        cda = cda_from_element(root, max_body_bytes=limits.max_attachment_bytes)
    except NotACdaError:
        refuse_unsupported(document.path, document.content, entry.mime_type, why="an XML document that is not a CDA")
    check_cda_body(cda)
    return replace(base, cda=cda, warnings=cda.warnings + _cross_check(entry, cda))


def _looks_like_xml(content: bytes, mime_type: str | None) -> bool:
    return (mime_type or "").casefold() in _XML_TYPES or content.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def _cross_check(entry: DocumentEntry, cda: CdaDocument) -> tuple[str, ...]:
    """METADATA and CDA header must agree on the document id and the patient (IHE XDS-SD, CI-SIS)."""
    warnings = []
    if entry.unique_id and entry.unique_id != cda.id.xds_unique_id:
        warnings.append(f"METADATA uniqueId {entry.unique_id!r} differs from the CDA id {cda.id.xds_unique_id!r}")
    identity = identify_patient(cda.patient, accept_production=True)
    if entry.patient and isinstance(identity, PatientIdentity) and (entry.patient.id, entry.patient.oid) != (identity.ins, identity.oid):
        warnings.append(f"METADATA patientId {entry.patient.raw!r} differs from the CDA INS {identity.xds_patient_id!r}")
    return tuple(warnings)


def _mark_companions(documents: list[ExtractedDocument]) -> tuple[ExtractedDocument, ...]:
    has_structured = any(d.source in ("xdm", "cda") and d.cda is not None for d in documents)
    if not has_structured:
        return tuple(documents)
    return tuple(replace(d, accompanies_structured=True) if d.source == "pdf" else d for d in documents)

"""The document formats the record holds, decided from the bytes (never from a declared MIME type).

The record holds what the CI-SIS defines as a shared health document
(mssante.md §3.1, §3.3):
- an HL7 CDA R2 document, structured (level 3) or with an unstructured body
  (level 1, ``nonXMLBody``) in one of the media types the CI-SIS admits for
  it: PDF, plain text, RTF, JPEG or TIFF;
- a PDF (IHE XDS-SD; a plain PDF report);
- a DICOM object (the imaging manifest, KOS, that the ANS DRIMbox XDM
  carries under type IMG-KOS): a DICOM Part 10 file, ``DICM`` after its
  128-byte preamble.
Anything else (HTML, a zip inside a zip, a script, XML that is not a CDA, an
executable) is refused with CI-SIS code 906 and the reason: it is neither a
report the record can show safely nor one a professional's software can read
back as a document.
"""

from __future__ import annotations

from typing import NoReturn

from gateway.dmp_bridge.cda import BodyKind, CdaDocument
from gateway.dmp_bridge.errors import DocumentError

# CI-SIS Structuration minimale, nonXMLBody/text@mediaType: the media types a level-1 CDA may carry.
CDA_LEVEL_ONE_MEDIA_TYPES = frozenset({"application/pdf", "text/plain", "text/rtf", "image/jpeg", "image/tiff"})
DICOM_PREAMBLE = 128
DICOM_MAGIC = b"DICM"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


class UnsupportedFormatError(DocumentError):
    """A document in a format the record does not hold (906)."""


def looks_like_dicom(content: bytes) -> bool:
    """DICOM PS3.10 7.1: a 128-byte preamble, then the prefix ``DICM``."""
    return content[DICOM_PREAMBLE:DICOM_PREAMBLE + len(DICOM_MAGIC)] == DICOM_MAGIC


def check_cda_body(cda: CdaDocument) -> None:
    """A level-1 CDA must carry one of the CI-SIS media types (an HTML body is refused)."""
    body = cda.body
    if body is None or body.kind != BodyKind.UNSTRUCTURED:
        return
    media_type = (body.media_type or "").strip().casefold()
    if media_type not in CDA_LEVEL_ONE_MEDIA_TYPES:
        raise UnsupportedFormatError(
            f"CDA {cda.id.xds_unique_id}: an unstructured body of type {media_type or '(none)'!r} is not a format the "
            f"record holds (CI-SIS level 1 admits {', '.join(sorted(CDA_LEVEL_ONE_MEDIA_TYPES))})")


def refuse_unsupported(path: str, content: bytes, declared_type: str | None, *, why: str | None = None) -> NoReturn:
    """Raise the 906 refusal of an entry that is neither a CDA, a PDF nor a DICOM object."""
    what = why or _sniffed(content)
    declared = f", declared as {declared_type!r}" if declared_type else ""
    raise UnsupportedFormatError(f"{path}: {what}{declared} is not a format the record holds (CDA R2, PDF or DICOM): "
                                 "not filed")


def looks_like_html(content: bytes) -> bool:
    """HTML (or XHTML) by its opening: a browser would render it, scripts included."""
    head = _head(content)
    if head.startswith((b"<!doctype html", b"<html")):
        return True
    return b"clinicaldocument" not in head and any(tag in head for tag in (b"<script", b"<body", b"<iframe"))


def _head(content: bytes) -> bytes:
    return content.lstrip(b"\xef\xbb\xbf \t\r\n")[:1024].lower()


def _sniffed(content: bytes) -> str:
    head = _head(content)
    if content.startswith(_ZIP_MAGICS):
        return "a zip archive"
    if looks_like_html(content):
        return "an HTML page"
    if head.startswith(b"<"):
        return "an XML document that is not a CDA"
    return "content of an unknown format"

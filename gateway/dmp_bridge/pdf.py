"""PDF reports: recognise them and read what is cheap, without a PDF library.

A PDF starts with ``%PDF-x.y`` and ends with ``%%EOF`` (ISO 32000-1 §7.5.2
and §7.5.5; trailing garbage after the marker is common, so it is looked for
in the last kilobyte). That, and a size bound, is the sanity check.

Title and creation date come from the document information dictionary
(§14.3.3) when it is an uncompressed object that the trailer names with
``/Info N G R``; when it sits in a compressed object stream, or the file is
encrypted, they are left out (``None``) rather than decompressing stranger
content. Filing never depends on them: the CDA header is authoritative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from gateway.dmp_bridge.errors import PdfError

PDF_MAGIC = b"%PDF-"
DEFAULT_MAX_PDF_BYTES = 50 * 1024 * 1024
_EOF_WINDOW = 1024
_MAX_INFO_OBJECT = 64 * 1024

_VERSION = re.compile(rb"^%PDF-(\d\.\d)")
_INFO_REF = re.compile(rb"/Info\s+(\d{1,10})\s+(\d{1,5})\s+R")
_PDF_DATE = re.compile(r"^D:(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:([+\-Z])(?:(\d{2})'?(\d{2})?'?)?)?", re.ASCII)


@dataclass(frozen=True)
class PdfInfo:
    version: str | None
    size: int
    encrypted: bool
    title: str | None
    creation_date: datetime | None


def looks_like_pdf(data: bytes) -> bool:
    return data.startswith(PDF_MAGIC)


def inspect_pdf(data: bytes, *, max_bytes: int = DEFAULT_MAX_PDF_BYTES) -> PdfInfo:
    """Check that ``data`` is a sane PDF and read its cheap metadata; raises ``PdfError``."""
    if len(data) > max_bytes:
        raise PdfError(f"PDF of {len(data)} bytes refused: the limit is {max_bytes} bytes")
    if not looks_like_pdf(data):
        raise PdfError("not a PDF: the content does not start with %PDF-")
    if b"%%EOF" not in data[-_EOF_WINDOW:]:
        raise PdfError("truncated PDF: no %%EOF marker at the end of the file")
    version = _VERSION.match(data)
    encrypted = b"/Encrypt" in data[-_MAX_INFO_OBJECT:]
    info = b"" if encrypted else _info_dictionary(data)
    return PdfInfo(
        version=version.group(1).decode("ascii") if version else None,
        size=len(data),
        encrypted=encrypted,
        title=_string_entry(info, b"Title"),
        creation_date=_pdf_date(_string_entry(info, b"CreationDate")),
    )


def _info_dictionary(data: bytes) -> bytes:
    """The raw bytes of the uncompressed Info object named by the last trailer, or ``b""``."""
    references = list(_INFO_REF.finditer(data))
    if not references:
        return b""
    number, generation = references[-1].group(1), references[-1].group(2)
    header = re.compile(rb"(?<![0-9])" + number + rb"\s+" + generation + rb"\s+obj\b")
    matches = list(header.finditer(data))
    if not matches:
        return b""  # inside a compressed object stream: not read
    start = matches[-1].end()
    end = data.find(b"endobj", start, start + _MAX_INFO_OBJECT)
    return data[start:end] if end > 0 else b""


def _string_entry(dictionary: bytes, key: bytes) -> str | None:
    match = re.search(rb"/" + key + rb"\s*([(<])", dictionary)
    if not match:
        return None
    start = match.end()
    raw = _literal_string(dictionary, start) if match.group(1) == b"(" else _hex_string(dictionary, start)
    return _decode_text_string(raw) if raw is not None else None


def _literal_string(data: bytes, start: int) -> bytes | None:
    """A ``( ... )`` string from just after its opening parenthesis (§7.3.4.2: nesting and escapes)."""
    out = bytearray()
    depth, position = 1, start
    while position < len(data):
        char = data[position]
        if char == 0x5C and position + 1 < len(data):  # backslash
            position = _unescape(data, position + 1, out)
            continue
        if char == 0x28:
            depth += 1
        elif char == 0x29:
            depth -= 1
            if depth == 0:
                return bytes(out)
        out.append(char)
        position += 1
    return None


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("f"): b"\f", ord("("): b"(", ord(")"): b")", ord("\\"): b"\\"}


def _unescape(data: bytes, position: int, out: bytearray) -> int:
    """Append the escaped character at ``position`` (after a backslash); return the next position."""
    char = data[position]
    if char in _ESCAPES:
        out += _ESCAPES[char]
        return position + 1
    octal = re.match(rb"[0-7]{1,3}", data[position : position + 3])
    if octal:
        out.append(int(octal.group(0), 8) & 0xFF)
        return position + len(octal.group(0))
    if char in (0x0D, 0x0A):  # line continuation
        return position + (2 if data[position : position + 2] == b"\r\n" else 1)
    out.append(char)
    return position + 1


def _hex_string(data: bytes, start: int) -> bytes | None:
    end = data.find(b">", start)
    if end < 0:
        return None
    digits = re.sub(rb"\s", b"", data[start:end])
    if not re.fullmatch(rb"[0-9A-Fa-f]*", digits):
        return None
    if len(digits) % 2:
        digits += b"0"
    return bytes.fromhex(digits.decode("ascii"))


def _decode_text_string(raw: bytes) -> str | None:
    """PDF text strings: UTF-16BE with BOM, UTF-8 with BOM (PDF 2.0), else PDFDocEncoding (read as Latin-1)."""
    if raw.startswith(b"\xfe\xff"):
        text = raw[2:].decode("utf-16-be", errors="replace")
    elif raw.startswith(b"\xef\xbb\xbf"):
        text = raw[3:].decode("utf-8", errors="replace")
    else:
        text = raw.decode("latin-1")
    text = " ".join(text.replace("\x00", "").split())
    return text or None


def _pdf_date(value: str | None) -> datetime | None:
    """``D:20231108153345+01'00'`` -> an aware datetime (§7.9.4); no offset given means UTC."""
    match = _PDF_DATE.match(value or "")
    if not match:
        return None
    year, month, day, hour, minute, second, sign, offset_hours, offset_minutes = match.groups()
    offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    try:
        tz = timezone(-offset if sign == "-" else offset) if sign in ("+", "-") else timezone.utc
        return datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0), tzinfo=tz)
    except ValueError:
        return None

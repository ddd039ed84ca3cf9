"""Parse step: what the pipeline needs to know about a spooled message, read as a stream.

The body is never loaded whole: the header section is read up to a bound
(RFC 5322 2.2 fields, unfolded per 2.2.3), then, for multipart messages only,
the body lines are scanned for boundary delimiters (RFC 2046 5.1.1) to measure
the nesting depth. Limits on header count, header size and MIME depth raise
``SmtpRefusal`` with 554 5.6.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from gateway.smtp import codes
from gateway.smtp.codes import SmtpRefusal


@dataclass(frozen=True)
class ParseLimits:
    max_header_count: int
    max_header_bytes: int
    max_mime_depth: int


@dataclass
class MessageFacts:
    headers: list[tuple[str, str]] = field(default_factory=list)
    header_bytes: int = 0
    mime_depth: int = 0

    def get(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def subject(self) -> str | None:
        return self.get("Subject")

    @property
    def message_id(self) -> str | None:
        return self.get("Message-ID")


def scan_message(path: Path, limits: ParseLimits) -> MessageFacts:
    """Read ``path`` once: headers, then MIME depth. Blocking: run it in a thread."""
    with path.open("rb") as stream:
        return scan_stream(stream, limits)


def scan_stream(stream: BinaryIO, limits: ParseLimits) -> MessageFacts:
    """``scan_message`` over an open stream (a sealed spool file's plaintext reader)."""
    facts = _read_header_section(stream, limits)
    boundary = _multipart_boundary(facts.headers)
    if boundary is not None:
        facts.mime_depth = _scan_mime_depth(stream, boundary, limits.max_mime_depth)
    return facts


def _read_header_section(stream: BinaryIO, limits: ParseLimits) -> MessageFacts:
    facts = MessageFacts()
    raw_fields: list[bytes] = []
    while True:
        line = stream.readline(limits.max_header_bytes + 1)
        if not line or line in (b"\r\n", b"\n"):                      # RFC 5322 2.1: an empty line ends the header
            break
        facts.header_bytes += len(line)
        if facts.header_bytes > limits.max_header_bytes:
            raise SmtpRefusal(codes.HEADER_TOO_LARGE.format(limit=limits.max_header_bytes))
        if line[:1] in (b" ", b"\t") and raw_fields:
            raw_fields[-1] += line                                     # RFC 5322 2.2.3: folded continuation
            continue
        raw_fields.append(line)
        if len(raw_fields) > limits.max_header_count:
            raise SmtpRefusal(codes.TOO_MANY_HEADERS.format(limit=limits.max_header_count))
    facts.headers = [_split_field(raw) for raw in raw_fields]
    return facts


def _split_field(raw: bytes) -> tuple[str, str]:
    text = raw.decode("utf-8", errors="replace")                       # RFC 6532 3.2: UTF-8 header values
    name, _, value = text.partition(":")
    unfolded = " ".join(part.strip() for part in value.replace("\r\n", "\n").split("\n") if part.strip())
    return name.strip(), unfolded


def _content_type(value: str | None) -> tuple[str, str | None]:
    message = Message()
    message["Content-Type"] = value or "text/plain"
    boundary = message.get_param("boundary")
    return message.get_content_type(), boundary if isinstance(boundary, str) and boundary else None


def _multipart_boundary(headers: list[tuple[str, str]]) -> str | None:
    value = next((v for k, v in headers if k.lower() == "content-type"), None)
    content_type, boundary = _content_type(value)
    return boundary if content_type.startswith("multipart/") else None


def _scan_mime_depth(stream: BinaryIO, boundary: str, max_depth: int) -> int:
    """Follow boundary lines (RFC 2046 5.1.1) and part headers to find the deepest multipart."""
    stack = [boundary.encode("utf-8", errors="replace")]
    deepest = 1
    part_header: list[bytes] | None = None
    for line in stream:
        if part_header is not None:
            if line in (b"\r\n", b"\n"):
                inner = _multipart_boundary([_split_field(raw) for raw in _join_folded(part_header)])
                part_header = None
                if inner is not None:
                    stack.append(inner.encode("utf-8", errors="replace"))
                    deepest = max(deepest, len(stack))
                    if deepest > max_depth:
                        raise SmtpRefusal(codes.MIME_TOO_DEEP.format(limit=max_depth))
            else:
                part_header.append(line)
            continue
        if not line.startswith(b"--") or not stack:
            continue
        delimiter = line.rstrip(b" \t\r\n")[2:]
        for level in range(len(stack) - 1, -1, -1):
            if delimiter == stack[level]:
                del stack[level + 1:]                                  # inner parts left unterminated
                part_header = []
                break
            if delimiter == stack[level] + b"--":                      # close-delimiter
                del stack[level:]
                break
    return deepest


def _join_folded(lines: list[bytes]) -> list[bytes]:
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields

"""Parse step: what the pipeline needs to know about a spooled message, read as a stream.

The body is never loaded whole: the header section is read up to a bound
(RFC 5322 2.2 fields, unfolded per 2.2.3), then, for multipart and
encapsulated (message/rfc822) messages only, the body lines are scanned for
boundary delimiters (RFC 2046 5.1.1) and for the header sections of parts and
of encapsulated messages (RFC 2046 5.2.1) to measure the nesting depth. Limits
on header count, header size and MIME depth raise ``MailRefusal`` with 554 5.6.0.
"""

from __future__ import annotations

import email.errors
import email.policy
from dataclasses import dataclass, field
from email.message import Message
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from gateway.mail import codes
from gateway.mail.codes import MailRefusal


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

    def all(self, name: str) -> list[str]:
        """Every value of the fields called ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    @property
    def subject(self) -> str | None:
        return self.get("Subject")

    @property
    def message_id(self) -> str | None:
        return self.get("Message-ID")


@dataclass(frozen=True)
class MailboxList:
    """An address field (From, Sender) as RFC 5322 3.4 reads it: its mailboxes, and whether group syntax
    was used; ``problem`` says why it could not be read."""

    addresses: tuple[str, ...] = ()
    group: bool = False
    problem: str | None = None


@lru_cache(maxsize=2048)
def parse_mailbox_list(value: str) -> MailboxList:
    """``From:``/``Sender:`` value -> its addr-specs (RFC 5322 3.4, 3.6.2; RFC 6532 UTF-8 allowed). Kept for
    the values seen last (a frozen answer, a function of the text alone): a sender's From repeats, and the
    email package's header grammar costs more than the rest of the author check."""
    try:
        parsed = email.policy.default.header_factory("From", value)
        groups = parsed.groups
    except Exception as exc:                                          # the email package's parser, on any input
        return MailboxList(problem=f"unreadable: {type(exc).__name__}")
    if any(group.display_name is not None for group in groups):
        return MailboxList(group=True)
    # "a@ours <b@ours>" reads as a@ours here and as b@ours in some clients: a malformed list is no author.
    invalid = [str(defect) for defect in parsed.defects if isinstance(defect, email.errors.InvalidHeaderDefect)]
    if invalid:
        return MailboxList(problem=f"malformed: {invalid[0]}")
    addresses = []
    for group in groups:
        for address in group.addresses:
            if not address.username or not address.domain:
                return MailboxList(problem=f"{address.addr_spec or value.strip()!r} is not local-part@domain")
            addresses.append(address.addr_spec)
    return MailboxList(tuple(addresses), problem=None if addresses else "empty")


def scan_message(path: Path, limits: ParseLimits) -> MessageFacts:
    """Read ``path`` once: headers, then MIME depth. Blocking: run it in a thread."""
    with path.open("rb") as stream:
        return scan_stream(stream, limits)


def scan_stream(stream: BinaryIO, limits: ParseLimits) -> MessageFacts:
    """``scan_message`` over an open stream (a sealed spool file's plaintext reader)."""
    facts = _read_header_section(stream, limits)
    top = _container(facts.headers)
    if top is not None:
        facts.mime_depth = _MimeDepthScanner(limits.max_mime_depth, limits.max_header_bytes).scan(stream, top)
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
            raise MailRefusal(codes.HEADER_TOO_LARGE.format(limit=limits.max_header_bytes))
        if line[:1] in (b" ", b"\t") and raw_fields:
            raw_fields[-1] += line                                     # RFC 5322 2.2.3: folded continuation
            continue
        raw_fields.append(line)
        if len(raw_fields) > limits.max_header_count:
            raise MailRefusal(codes.TOO_MANY_HEADERS.format(limit=limits.max_header_count))
    facts.headers = [_split_field(raw) for raw in raw_fields]
    return facts


def _split_field(raw: bytes) -> tuple[str, str]:
    text = raw.decode("utf-8", errors="replace")                       # RFC 6532 3.2: UTF-8 header values
    name, _, value = text.partition(":")
    if "\n" not in value[:-1]:                                         # one line (most fields): nothing to unfold
        return name.strip(), value.strip()
    return name.strip(), _unfolded(value)


def _unfolded(value: str) -> str:
    """RFC 5322 2.2.3: each line's content, trimmed, joined by one space."""
    return " ".join(part.strip() for part in value.replace("\r\n", "\n").split("\n") if part.strip())


CACHED_CONTENT_TYPE_CHARS = 256     # longer values are read each time (the cache's memory stays small)


def _content_type(value: str | None) -> tuple[str, str | None]:
    """The media type and boundary of a Content-Type value (RFC 2045 5.1). The answers for short values are
    kept (a function of the text alone): most messages repeat a client's few values, and building a
    ``Message`` to read one costs more than the rest of the scan of a small message."""
    if value is not None and len(value) > CACHED_CONTENT_TYPE_CHARS:
        return _read_content_type(value)
    return _cached_content_type(value)


@lru_cache(maxsize=1024)
def _cached_content_type(value: str | None) -> tuple[str, str | None]:
    return _read_content_type(value)


def _read_content_type(value: str | None) -> tuple[str, str | None]:
    message = Message()
    message["Content-Type"] = value or "text/plain"
    boundary = message.get_param("boundary")
    return message.get_content_type(), boundary if isinstance(boundary, str) and boundary else None


# RFC 2046 5.2.1 / RFC 6532 3.7: an encapsulated message, whose body is itself a whole message.
ENCAPSULATED_TYPES = ("message/rfc822", "message/global")
# RFC 2046 5.2.1: message/rfc822 may only be 7bit, 8bit or binary; an encoded one is opaque here.
IDENTITY_ENCODINGS = ("", "7bit", "8bit", "binary")


@dataclass(frozen=True)
class _Frame:
    """One open MIME container: a multipart (with its boundary) or an encapsulated message (boundary None)."""

    boundary: bytes | None


def _container(headers: list[tuple[str, str]]) -> _Frame | None:
    """The container these header fields open, if any: a multipart with a boundary (RFC 2046 5.1.1) or
    an encapsulated message in an identity transfer encoding (RFC 2046 5.2.1); None for a leaf."""
    content_type, boundary = _content_type(next((v for k, v in headers if k.lower() == "content-type"), None))
    if content_type.startswith("multipart/"):
        return _Frame(boundary.encode("utf-8", errors="replace")) if boundary is not None else None
    if content_type in ENCAPSULATED_TYPES:
        encoding = next((v for k, v in headers if k.lower() == "content-transfer-encoding"), "")
        return _Frame(None) if encoding.strip().lower() in IDENTITY_ENCODINGS else None
    return None


class _MimeDepthScanner:
    """The deepest nesting of MIME containers, read line by line without keeping the body.

    Both kinds of container count one level: a multipart (its parts are delimited by boundary
    lines, RFC 2046 5.1.1) and an encapsulated ``message/rfc822`` (a forward inside a forward,
    RFC 2046 5.2.1), whose body starts with its own header section. Boundary lines are
    recognised everywhere, even inside a header section, as MIME parsers do, so a hostile
    message cannot hide a level from this count that a later parser would see. Beyond
    ``max_depth`` the message is refused (catalogue ``MIME_TOO_DEEP``, 554 5.6.0).
    """

    def __init__(self, max_depth: int, max_header_bytes: int) -> None:
        self.max_depth = max_depth
        self.max_header_bytes = max_header_bytes
        self.stack: list[_Frame] = []
        self.deepest = 0
        self.header: list[bytes] | None = None           # the part (or encapsulated message) header being read
        self.header_bytes = 0

    def scan(self, stream: BinaryIO, top: _Frame) -> int:
        self._open(top)
        for line in stream:
            if self._boundary(line):
                continue
            if self.header is not None:
                self._header_line(line)
        return self.deepest

    def _open(self, frame: _Frame) -> None:
        self.stack.append(frame)
        self.deepest = max(self.deepest, len(self.stack))
        if self.deepest > self.max_depth:
            raise MailRefusal(codes.MIME_TOO_DEEP.format(limit=self.max_depth))
        if frame.boundary is None:
            self._start_header()                          # the encapsulated message's own header follows

    def _start_header(self) -> None:
        self.header, self.header_bytes = [], 0

    def _header_line(self, line: bytes) -> None:
        assert self.header is not None
        if line in (b"\r\n", b"\n"):                      # RFC 5322 2.1: the header section ends
            fields = [_split_field(raw) for raw in _join_folded(self.header)]
            self.header = None
            inner = _container(fields)
            if inner is not None:
                self._open(inner)
            return
        self.header_bytes += len(line)
        if self.header_bytes > self.max_header_bytes:    # memory stays bounded, and no Content-Type is skipped
            raise MailRefusal(codes.HEADER_TOO_LARGE.format(limit=self.max_header_bytes))
        self.header.append(line)

    def _boundary(self, line: bytes) -> bool:
        """A delimiter or close-delimiter of an open multipart (RFC 2046 5.1.1): True when it was one."""
        if not line.startswith(b"--"):
            return False
        delimiter = line.rstrip(b" \t\r\n")[2:]
        for level in range(len(self.stack) - 1, -1, -1):
            boundary = self.stack[level].boundary
            if boundary is None:
                continue
            if delimiter == boundary:
                del self.stack[level + 1:]                # inner containers left unterminated end here
                self._start_header()
                return True
            if delimiter == boundary + b"--":
                del self.stack[level:]
                self.header = None
                return True
        return False


def _join_folded(lines: list[bytes]) -> list[bytes]:
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields

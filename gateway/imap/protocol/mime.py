"""A message's MIME tree as offsets into its octets (RFC 2045, RFC 2046 5, RFC 3501 6.4.5).

IMAP serves body sections as they are stored: ``BODY[2]`` is the octets of part
2 between its header and the CRLF before the next boundary, not a re-generated
copy.  So the tree is built on the octets themselves, as Dovecot's
message-parser does, and every section is a slice of them:

- a part is ``header`` (its MIME header, the empty line included) then ``body``;
- a multipart body is split on its boundary lines (RFC 2046 5.1.1: the CRLF
  before a delimiter belongs to the delimiter; the preamble before the first
  delimiter and the epilogue after the close delimiter belong to no part; a
  boundary may hold spaces, ``boundary="foo bar"``);
- a message/rfc822 body is itself a message (``encapsulated``);
- parts of a multipart/digest default to message/rfc822 (RFC 2046 5.1.5), others
  to text/plain; us-ascii (RFC 2045 5.2).

Line ends are made CRLF first (RFC 3501 2.3.4 / 6.4.5: sizes and octets are in
CRLF form).  Nesting deeper than ``MAX_MIME_DEPTH`` leaves the whole message
one opaque part: no client needs it, and hostile messages must not cost more.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from gateway.imap.protocol.headers import MimeValue, parse_mime_value, unfold

MAX_MIME_DEPTH = 64
TEXT_PLAIN = MimeValue("TEXT/PLAIN", (("CHARSET", "US-ASCII"),))
MESSAGE_RFC822 = MimeValue("MESSAGE/RFC822", ())
_LINE_END = re.compile(rb"\r\n|\r|\n")
_PADDING = frozenset(b" \t")
# RFC 2046 5.2.1: an encapsulated message is 7bit, 8bit or binary; an encoded one is not looked into.
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


class _TooDeep(Exception):
    pass


def crlf(octets: bytes) -> bytes:
    """Every line end as CRLF (a no-op copy for what SMTP delivered)."""
    return _LINE_END.sub(b"\r\n", octets)


@dataclass
class MimePart:
    """One entity: ``data[start:body_start]`` is its header, ``data[body_start:end]`` its body."""

    data: bytes
    start: int
    body_start: int
    end: int
    headers: Message
    media: MimeValue
    children: list[MimePart] | None = None        # a multipart's parts (None: not a multipart)
    encapsulated: MimePart | None = None          # a message/rfc822 part's message
    opaque: bool = False                          # nesting too deep: served as one text part
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def header(self) -> bytes:
        return self.data[self.start:self.body_start]

    @property
    def body(self) -> bytes:
        return self.data[self.body_start:self.end]

    @property
    def whole(self) -> bytes:
        return self.data[self.start:self.end]

    @property
    def is_multipart(self) -> bool:
        return self.children is not None


def header_value(headers: Message, name: str) -> str | None:
    """The first ``name`` field, unfolded, exactly as written (no RFC 2047 decoding)."""
    wanted = name.lower()
    for key, value in headers.raw_items():
        if key.lower() == wanted:
            return unfold(str(value)).strip(" \t")
    return None


def parse_message(data: bytes) -> MimePart:
    """The MIME tree of a stored message (see the module docstring)."""
    octets = crlf(data)
    try:
        return _entity(octets, 0, len(octets), "text/plain", 0)
    except _TooDeep:
        return _leaf(octets, 0, len(octets), "text/plain", opaque=True)


def _header_end(data: bytes, start: int, end: int) -> int:
    """Where the body starts: after the first empty line (RFC 5322 2.1); a part that starts with
    the empty line has no fields; without one, everything is header."""
    if data.startswith(b"\r\n", start) and start + 2 <= end:
        return start + 2
    index = data.find(b"\r\n\r\n", start, end)
    return end if index < 0 else index + 4


def _headers(data: bytes, start: int, body_start: int) -> Message:
    return BytesHeaderParser(policy=compat32).parsebytes(data[start:body_start])


def _media(headers: Message, default_type: str) -> MimeValue:
    """RFC 2045 5.2: an absent or invalid Content-Type is the default."""
    raw = header_value(headers, "Content-Type")
    parsed = parse_mime_value(raw) if raw else None
    if parsed is None or parsed.value.count("/") != 1 or "" in parsed.value.split("/"):
        return MESSAGE_RFC822 if default_type == "message/rfc822" else TEXT_PLAIN
    return parsed


def _leaf(data: bytes, start: int, end: int, default_type: str, *, opaque: bool = False) -> MimePart:
    body_start = _header_end(data, start, end)
    headers = _headers(data, start, body_start)
    return MimePart(data, start, body_start, end, headers, _media(headers, default_type), opaque=opaque)


def _entity(data: bytes, start: int, end: int, default_type: str, depth: int) -> MimePart:
    part = _leaf(data, start, end, default_type)
    kind = part.media.value.lower()
    part.parameters = {name.lower(): value for name, value in part.media.parameters}
    if kind.startswith("multipart/"):
        boundary = part.parameters.get("boundary", "")
        if boundary:
            if depth >= MAX_MIME_DEPTH:
                raise _TooDeep
            child_type = "message/rfc822" if kind == "multipart/digest" else "text/plain"
            part.children = [_entity(data, low, high, child_type, depth + 1)
                             for low, high in _split(data, part.body_start, end, boundary.encode("utf-8", "replace"))]
    elif kind == "message/rfc822" and _encoding(part) in _IDENTITY_ENCODINGS:
        if depth >= MAX_MIME_DEPTH:
            raise _TooDeep
        part.encapsulated = _entity(data, part.body_start, end, "text/plain", depth + 1)
    return part


def _encoding(part: MimePart) -> str:
    return (header_value(part.headers, "Content-Transfer-Encoding") or "").strip().lower()


def _delimiter_at(data: bytes, line: int, end: int, delimiter: bytes) -> tuple[bool, int] | None:
    """If a delimiter line starts at ``line``: (is the close delimiter, where the next line starts)."""
    if not data.startswith(delimiter, line) or line + len(delimiter) > end:
        return None
    position = line + len(delimiter)
    closing = data.startswith(b"--", position) and position + 2 <= end
    if closing:
        position += 2
    line_end = data.find(b"\r\n", position, end)
    stop = end if line_end < 0 else line_end
    # RFC 2046 5.1.1: only transport padding (spaces, tabs) may follow the boundary on its line.
    if any(octet not in _PADDING for octet in data[position:stop]):
        return None
    return closing, end if line_end < 0 else line_end + 2


def _split(data: bytes, body_start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """The (start, end) of each body part between the delimiter lines of ``boundary``."""
    delimiter = b"--" + boundary
    parts: list[tuple[int, int]] = []
    part_start: int | None = None
    for line, crlf_before in _delimiter_lines(data, body_start, end, delimiter):
        found = _delimiter_at(data, line, end, delimiter)
        if found is None:
            continue
        closing, next_line = found
        if part_start is not None:
            parts.append((part_start, max(part_start, crlf_before)))
        if closing:
            return parts
        part_start = next_line
    if part_start is not None:
        parts.append((part_start, end))      # no close delimiter: the last part runs to the end
    return parts


def _delimiter_lines(data: bytes, body_start: int, end: int, delimiter: bytes) -> Iterator[tuple[int, int]]:
    """Candidate delimiter lines: (line start, where the CRLF before it starts), in order."""
    if data.startswith(delimiter, body_start):
        yield body_start, body_start
    search = body_start
    needle = b"\r\n" + delimiter
    while (index := data.find(needle, search, end)) >= 0:
        yield index + 2, index
        search = index + 2


def mime_depth(part: MimePart) -> int:
    """How deeply parts nest (0 for a single part), without recursion."""
    deepest = 0
    pending = [(part, 0)]
    while pending:
        current, depth = pending.pop()
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in subparts(current))
    return deepest


def subparts(part: MimePart) -> list[MimePart]:
    if part.children is not None:
        return part.children
    return [part.encapsulated] if part.encapsulated is not None else []


def find_part(root: MimePart, numbers: tuple[int, ...]) -> MimePart | None:
    """RFC 3501 6.4.5 part numbers, as Dovecot walks them: a multipart's parts are 1..n; a single part
    is part 1 of itself; a message/rfc822 part followed by more numbers steps into its message."""
    part = root
    for index, number in enumerate(numbers):
        more = index < len(numbers) - 1
        if part.children is not None:
            if number > len(part.children):
                return None
            part = part.children[number - 1]
        elif number != 1 or (more and part.encapsulated is None):
            return None
        if more and part.encapsulated is not None:
            part = part.encapsulated
    return part

"""Grammar building blocks of RFC 3501 9 as pure parsers.

Each parser takes a ``memoryview`` over the assembled command and returns
``(value, rest)`` (pymap's shape), raising ``ParseError`` with a reason.  The
command has already been assembled by the reader, so literals are inline:
``{n}`` CRLF followed by ``n`` octets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from gateway.imap.protocol.errors import ParseError

T = TypeVar("T")
Buffer = memoryview

# RFC 3501 9: ATOM-CHAR = <any CHAR except atom-specials>;
# atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials / resp-specials.
_ATOM_CLASS = rb"!#$&'+-\[^-z|-~"
ATOM = re.compile(rb"[" + _ATOM_CLASS + rb"]+")
# ASTRING-CHAR = ATOM-CHAR / resp-specials
ASTRING_ATOM = re.compile(rb"[" + _ATOM_CLASS + rb"\]]+")
# list-char = ATOM-CHAR / list-wildcards / resp-specials (RFC 3501 9, list-mailbox)
LIST_ATOM = re.compile(rb"[" + _ATOM_CLASS + rb"\]%*]+")
# tag = 1*<any ASTRING-CHAR except "+">
TAG = re.compile(rb"[!#$&',-\[\]^-z|-~]+")
NUMBER = re.compile(rb"[0-9]+")
# RFC 3501 9: quoted = DQUOTE *QUOTED-CHAR DQUOTE; QUOTED-CHAR = TEXT-CHAR except quoted-specials / "\" quoted-specials.
# 8-bit octets are accepted too: RFC 6855 3 allows UTF-8 there once enabled, and
# common clients send UTF-8 SEARCH strings quoted; the caller validates UTF-8.
QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
# RFC 3501 9 literal, RFC 7888 3 literal+, RFC 3516 4.2 literal8.
LITERAL = re.compile(rb"(~?)\{([0-9]{1,10})(\+?)\}\r\n")
_ESCAPE = re.compile(rb"\\([\"\\])")

MAX_NUMBER = 2**32 - 1        # RFC 3501 9: number is an unsigned 32-bit integer
MAX_MODSEQ = 2**63 - 1        # RFC 7162 7: mod-sequence-value is 1*DIGIT < 2^63


def buffer(data: bytes) -> Buffer:
    return memoryview(data)


def peek(buf: Buffer, size: int = 1) -> bytes:
    """The next ``size`` octets as bytes (empty at the end), without consuming them."""
    return bytes(buf[:size])


def describe(buf: Buffer) -> str:
    """A short, printable excerpt of where parsing stopped, for error reasons."""
    excerpt = bytes(buf[:20]).decode("ascii", "replace")
    shown = "".join(ch if ch.isprintable() else "?" for ch in excerpt)
    return f"at {shown!r}" if shown else "at end of command"


def fail(reason: str, buf: Buffer) -> ParseError:
    return ParseError(f"{reason} {describe(buf)}")


def parse_sp(buf: Buffer) -> Buffer:
    """SP: exactly one space."""
    if peek(buf) != b" ":
        raise fail("Expected a space", buf)
    return buf[1:]


def parse_end(buf: Buffer) -> None:
    """The command must end here (RFC 3501 9: command ends with CRLF, already removed)."""
    if len(buf):
        raise fail("Unexpected data", buf)


def at_end(buf: Buffer) -> bool:
    return len(buf) == 0


def parse_char(buf: Buffer, char: bytes) -> Buffer:
    if peek(buf) != char:
        raise fail(f"Expected {char.decode()!r}", buf)
    return buf[1:]


def try_char(buf: Buffer, char: bytes) -> Buffer | None:
    return buf[1:] if peek(buf) == char else None


def try_keyword(buf: Buffer, keyword: bytes) -> Buffer | None:
    """``keyword`` (case-insensitive, RFC 3501 9 note 1) followed by a delimiter, or None."""
    size = len(keyword)
    if bytes(buf[:size]).upper() != keyword:
        return None
    following = bytes(buf[size:size + 1])
    if following and following not in b" ()[]<>":
        return None
    return buf[size:]


def parse_keyword(buf: Buffer, keyword: bytes) -> Buffer:
    rest = try_keyword(buf, keyword)
    if rest is None:
        raise fail(f"Expected {keyword.decode()}", buf)
    return rest


def parse_atom(buf: Buffer, pattern: re.Pattern[bytes] = ATOM) -> tuple[bytes, Buffer]:
    match = pattern.match(buf)
    if match is None:
        raise fail("Expected an atom", buf)
    return match.group(0), buf[match.end():]


def parse_number(buf: Buffer, maximum: int = MAX_NUMBER) -> tuple[int, Buffer]:
    """RFC 3501 9 ``number``; bounded so a hostile 10,000-digit number stays cheap."""
    match = NUMBER.match(buf[:21])
    if match is None:
        raise fail("Expected a number", buf)
    digits = match.group(0)
    value = int(digits) if len(digits) <= 20 else maximum + 1
    if value > maximum:
        raise fail("Number out of range", buf)
    return value, buf[match.end():]


def parse_nz_number(buf: Buffer) -> tuple[int, Buffer]:
    """RFC 3501 9 ``nz-number``: a number that is not zero."""
    value, rest = parse_number(buf)
    if value == 0:
        raise fail("Expected a non-zero number", buf)
    return value, rest


def parse_quoted(buf: Buffer) -> tuple[bytes, Buffer]:
    if peek(buf) != b'"':
        raise fail("Expected a quoted string", buf)
    match = QUOTED.match(buf)
    if match is None:
        raise fail("Unterminated or invalid quoted string", buf)
    return _ESCAPE.sub(rb"\1", match.group(1)), buf[match.end():]


def parse_literal(buf: Buffer, *, allow_binary: bool = False) -> tuple[bytes, Buffer, bool]:
    """``literal`` / ``literal8``: returns (octets, rest, was_literal8)."""
    match = LITERAL.match(buf[:20])
    if match is None:
        raise fail("Expected a literal", buf)
    binary = bool(match.group(1))
    if binary and not allow_binary:
        raise fail("literal8 not allowed here", buf)
    size = int(match.group(2))
    start = match.end()
    if len(buf) - start < size:
        raise fail("Literal shorter than announced", buf)
    octets = bytes(buf[start:start + size])
    if not binary and b"\x00" in octets:
        # RFC 3501 9: literal = "{" number "}" CRLF *CHAR8, CHAR8 = %x01-ff (no NUL).
        raise fail("NUL octet in literal", buf)
    return octets, buf[start + size:], binary


def is_literal_start(buf: Buffer) -> bool:
    return peek(buf) == b"{" or peek(buf, 2) == b"~{"


def parse_string(buf: Buffer) -> tuple[bytes, Buffer]:
    """RFC 3501 9 ``string = quoted / literal``."""
    if peek(buf) == b'"':
        return parse_quoted(buf)
    if peek(buf) == b"{":
        octets, rest, _ = parse_literal(buf)
        return octets, rest
    raise fail("Expected a string", buf)


def parse_astring(buf: Buffer) -> tuple[bytes, Buffer]:
    """RFC 3501 9 ``astring = 1*ASTRING-CHAR / string``."""
    if peek(buf) in (b'"', b"{"):
        return parse_string(buf)
    return parse_atom(buf, ASTRING_ATOM)


def parse_nstring(buf: Buffer) -> tuple[bytes | None, Buffer]:
    """RFC 3501 9 ``nstring = string / nil``."""
    rest = try_keyword(buf, b"NIL")
    if rest is not None:
        return None, rest
    return parse_string(buf)


def decode_utf8(octets: bytes, what: str) -> str:
    """Text the grammar wants as characters; invalid UTF-8 is a parse error, never a crash."""
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ParseError(f"Invalid UTF-8 in {what} at octet {error.start}") from None


def parse_astring_text(buf: Buffer, what: str) -> tuple[str, Buffer]:
    octets, rest = parse_astring(buf)
    return decode_utf8(octets, what), rest


def parse_paren_list(buf: Buffer, item: Callable[[Buffer], tuple[T, Buffer]],
                     *, allow_empty: bool = True, max_items: int = 10_000) -> tuple[list[T], Buffer]:
    """``"(" [item *(SP item)] ")"``."""
    rest = parse_char(buf, b"(")
    items: list[T] = []
    if peek(rest) == b")":
        if not allow_empty:
            raise fail("Empty list", buf)
        return items, rest[1:]
    while True:
        value, rest = item(rest)
        items.append(value)
        if len(items) > max_items:
            raise fail("List too long", rest)
        if peek(rest) == b")":
            return items, rest[1:]
        rest = parse_sp(rest)


def parse_atom_text(buf: Buffer) -> tuple[str, Buffer]:
    """An atom as ASCII text (atoms are ASCII by construction)."""
    value, rest = parse_atom(buf)
    return value.decode("ascii"), rest

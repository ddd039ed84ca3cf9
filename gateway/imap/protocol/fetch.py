"""FETCH data items (RFC 3501 6.4.5, 9 ``fetch-att``), BINARY (RFC 3516 4), MODSEQ (RFC 7162 3.1.4).

``FetchAttribute`` says what to return and ``response_name()`` how the item is
named in the FETCH response (RFC 3501 7.4.2: ``BODY[section]<origin>``, never
``.PEEK``).  Macros ALL / FAST / FULL are expanded here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.imap.protocol.errors import ParseError
from gateway.imap.protocol.primitives import (
    MAX_MODSEQ, Buffer, decode_utf8, fail, parse_astring, parse_char, parse_keyword, parse_number,
    parse_nz_number, parse_sp, peek, try_keyword,
)

_ITEM_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_PART = re.compile(rb"[0-9]+(?:\.[0-9]+)*")
MAX_SECTION_DEPTH = 32
MAX_HEADER_FIELDS = 256

SIMPLE_ITEMS = frozenset({
    "ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE", "RFC822.TEXT",
    "BODY", "BODYSTRUCTURE", "UID", "MODSEQ",
})
# RFC 3501 6.4.5: RFC822 and RFC822.TEXT set \Seen; RFC822.HEADER is BODY.PEEK[HEADER].
_SETS_SEEN = frozenset({"RFC822", "RFC822.TEXT"})


@dataclass(frozen=True)
class BodySection:
    """RFC 3501 9 ``section-spec``: part numbers then HEADER / HEADER.FIELDS[.NOT] / TEXT / MIME."""

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def format(self) -> str:
        pieces = [".".join(str(n) for n in self.part)] if self.part else []
        if self.text:
            pieces.append(self.text)
        spec = ".".join(pieces)
        if self.fields:
            spec += " (" + " ".join(_format_field(name) for name in self.fields) + ")"
        return spec


def _format_field(name: str) -> str:
    """header-fld-name is an astring: bare when it is a safe atom, quoted otherwise."""
    if name and re.fullmatch(r"[!#$&'+-\[^-z|-~\]]+", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class FetchAttribute:
    """One fetch-att.  ``name`` is FLAGS, ENVELOPE, ..., or BODY / BINARY / BINARY.SIZE with a section."""

    name: str
    section: BodySection | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False

    @property
    def has_section(self) -> bool:
        return self.section is not None

    def sets_seen(self) -> bool:
        """RFC 3501 6.4.5: BODY[...] (not .PEEK), RFC822 and RFC822.TEXT set \\Seen; RFC 3516 for BINARY."""
        if self.name in _SETS_SEEN:
            return True
        return self.section is not None and self.name in ("BODY", "BINARY") and not self.peek

    def response_name(self) -> str:
        """RFC 3501 7.4.2: ``BODY[section]<origin>``; RFC 3516 4.2: ``BINARY[part]``."""
        if self.section is None:
            return self.name
        name = f"{self.name}[{self.section.format()}]"
        if self.partial is not None:
            name += f"<{self.partial[0]}>"
        return name

    def request_name(self) -> str:
        """The item as a client writes it (for tests and logs)."""
        if self.section is None:
            return self.name
        name = f"{self.name}{'.PEEK' if self.peek else ''}[{self.section.format()}]"
        if self.partial is not None:
            name += f"<{self.partial[0]}.{self.partial[1]}>"
        return name


def _simple(name: str) -> FetchAttribute:
    return FetchAttribute(name)


# RFC 3501 6.4.5 macros.
MACROS: dict[str, tuple[FetchAttribute, ...]] = {
    "FAST": (_simple("FLAGS"), _simple("INTERNALDATE"), _simple("RFC822.SIZE")),
    "ALL": (_simple("FLAGS"), _simple("INTERNALDATE"), _simple("RFC822.SIZE"), _simple("ENVELOPE")),
    "FULL": (_simple("FLAGS"), _simple("INTERNALDATE"), _simple("RFC822.SIZE"), _simple("ENVELOPE"),
             _simple("BODY")),
}


def _parse_header_list(buf: Buffer) -> tuple[tuple[str, ...], Buffer]:
    """RFC 3501 9: header-list = "(" header-fld-name *(SP header-fld-name) ")"."""
    rest = parse_char(buf, b"(")
    names: list[str] = []
    while True:
        octets, rest = parse_astring(rest)
        name = decode_utf8(octets, "header field name")
        if not name or any(ord(c) <= 32 or ord(c) == 127 or c == ":" for c in name):
            raise fail("Invalid header field name", buf)
        names.append(name)
        if len(names) > MAX_HEADER_FIELDS:
            raise fail("Too many header fields", buf)
        if peek(rest) == b")":
            return tuple(names), rest[1:]
        rest = parse_sp(rest)


def _parse_section_text(buf: Buffer, *, after_part: bool) -> tuple[str, tuple[str, ...], Buffer]:
    """section-msgtext / "MIME" (MIME only after a part number)."""
    for text in (b"HEADER.FIELDS.NOT", b"HEADER.FIELDS"):
        rest = try_keyword(buf, text)
        if rest is not None:
            fields, rest = _parse_header_list(parse_sp(rest))
            return text.decode(), fields, rest
    for text in (b"HEADER", b"TEXT", b"MIME"):
        rest = try_keyword(buf, text)
        if rest is not None:
            if text == b"MIME" and not after_part:
                raise fail("MIME needs a part number", buf)
            return text.decode(), (), rest
    raise fail("Invalid section", buf)


def parse_section(buf: Buffer, *, binary: bool = False) -> tuple[BodySection, Buffer]:
    """RFC 3501 9 ``section``; RFC 3516 4.2 ``section-binary = "[" [section-part] "]"``."""
    rest = parse_char(buf, b"[")
    part: tuple[int, ...] = ()
    match = _SECTION_PART.match(rest)
    if match is not None:
        numbers = match.group(0).split(b".")
        if len(numbers) > MAX_SECTION_DEPTH or any(len(n) > 10 or int(n) == 0 for n in numbers):
            raise fail("Invalid section part", rest)
        part = tuple(int(n) for n in numbers)
        rest = rest[match.end():]
    text: str | None = None
    fields: tuple[str, ...] = ()
    if peek(rest) != b"]":
        if binary:
            raise fail("BINARY takes only a part number", rest)
        if part:
            rest = parse_char(rest, b".")
        text, fields, rest = _parse_section_text(rest, after_part=bool(part))
    return BodySection(part, text, fields), parse_char(rest, b"]")


def _parse_partial(buf: Buffer) -> tuple[tuple[int, int] | None, Buffer]:
    """RFC 3501 9: "<" number "." nz-number ">"."""
    if peek(buf) != b"<":
        return None, buf
    start, rest = parse_number(buf[1:])
    rest = parse_char(rest, b".")
    length, rest = parse_nz_number(rest)
    return (start, length), parse_char(rest, b">")


def _parse_sectioned(name: str, rest: Buffer) -> tuple[FetchAttribute, Buffer]:
    base, _, suffix = name.partition(".")
    peek = suffix == "PEEK"
    if base == "BINARY" and suffix == "SIZE":
        section, rest = parse_section(rest, binary=True)
        return FetchAttribute("BINARY.SIZE", section), rest
    section, rest = parse_section(rest, binary=base == "BINARY")
    partial, rest = _parse_partial(rest)
    return FetchAttribute(base, section, partial, peek), rest


def parse_fetch_attribute(buf: Buffer) -> tuple[FetchAttribute, Buffer]:
    """One fetch-att."""
    match = _ITEM_NAME.match(buf)
    if match is None:
        raise fail("Expected a fetch item", buf)
    name = match.group(0).decode("ascii").upper()
    rest = buf[match.end():]
    if peek(rest) == b"[":
        if name not in ("BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"):
            raise fail("Unknown fetch item", buf)
        return _parse_sectioned(name, rest)
    if name not in SIMPLE_ITEMS:
        raise fail("Unknown fetch item", buf)
    return FetchAttribute(name), rest


def parse_fetch_attributes(buf: Buffer) -> tuple[tuple[FetchAttribute, ...], Buffer]:
    """``"ALL" / "FULL" / "FAST" / fetch-att / "(" fetch-att *(SP fetch-att) ")"``."""
    for macro, items in MACROS.items():
        rest = try_keyword(buf, macro.encode())
        if rest is not None:
            return items, rest
    if peek(buf) != b"(":
        item, rest = parse_fetch_attribute(buf)
        return (item,), rest
    rest = buf[1:]
    items_list: list[FetchAttribute] = []
    while True:
        item, rest = parse_fetch_attribute(rest)
        items_list.append(item)
        if peek(rest) == b")":
            return tuple(items_list), rest[1:]
        rest = parse_sp(rest)


@dataclass(frozen=True)
class FetchModifiers:
    """RFC 7162 3.1.4.1 CHANGEDSINCE; RFC 7162 3.2.6 VANISHED (needs QRESYNC and UID FETCH)."""

    changed_since: int | None = None
    vanished: bool = False


def parse_fetch_modifiers(buf: Buffer) -> tuple[FetchModifiers, Buffer]:
    """fetch-modifiers = SP "(" fetch-modifier *(SP fetch-modifier) ")" (RFC 4466 2.4)."""
    rest = parse_char(buf, b"(")
    changed_since: int | None = None
    vanished = False
    while True:
        after = try_keyword(rest, b"CHANGEDSINCE")
        if after is not None:
            changed_since, rest = parse_number(parse_sp(after), MAX_MODSEQ)
        else:
            rest = parse_keyword(rest, b"VANISHED")
            vanished = True
        if peek(rest) == b")":
            break
        rest = parse_sp(rest)
    if vanished and changed_since is None:
        # RFC 7162 3.2.6: VANISHED is only allowed together with CHANGEDSINCE.
        raise ParseError("VANISHED requires CHANGEDSINCE")
    return FetchModifiers(changed_since, vanished), rest[1:]

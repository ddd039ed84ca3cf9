"""SEARCH criteria (RFC 3501 6.4.4, 9 ``search-key``) as a normalised tree.

Each keyword becomes one of a few node types, so the evaluator has little to
know: ``FROM x`` is ``SearchHeader("from", x)``, ``UNSEEN`` is
``SearchFlag("\\Seen", present=False)``, ``NEW`` is RECENT and UNSEEN.  Also
``MODSEQ`` (RFC 7162 3.1.5), the saved result ``$`` (RFC 5182), and the
ESEARCH return options (RFC 4731 3.1).  Nesting (parentheses, NOT, OR) is
bounded so hostile input cannot exhaust the stack.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from gateway.imap.protocol.dates import parse_date
from gateway.imap.protocol.errors import BADCHARSET, ImapNo, ParseError
from gateway.imap.protocol.primitives import (
    ATOM, MAX_MODSEQ, Buffer, decode_utf8, fail, parse_astring, parse_atom, parse_char, parse_number,
    parse_quoted, parse_sp, peek, try_keyword,
)
from gateway.imap.protocol.sequence import SequenceSet, parse_sequence_set

MAX_DEPTH = 64
SUPPORTED_CHARSETS = ("US-ASCII", "UTF-8")
RETURN_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})   # RFC 4731 3.1, RFC 5182 2.1


@dataclass(frozen=True)
class SearchAll:
    """ALL: every message."""


@dataclass(frozen=True)
class SearchFlag:
    """A system flag or keyword that must be set (``present``) or not set."""

    flag: str
    present: bool = True


@dataclass(frozen=True)
class SearchDate:
    """BEFORE/ON/SINCE (internal date) and SENTBEFORE/SENTON/SENTSINCE (Date: header)."""

    field: Literal["internal", "sent"]
    relation: Literal["before", "on", "since"]
    date: dt.date


@dataclass(frozen=True)
class SearchHeader:
    """HEADER name value, and FROM/TO/CC/BCC/SUBJECT; ``field`` is lower-case, match is a substring."""

    field: str
    value: str


@dataclass(frozen=True)
class SearchText:
    """BODY (body only) or TEXT (header and body)."""

    where: Literal["body", "text"]
    value: str


@dataclass(frozen=True)
class SearchSize:
    """LARGER n / SMALLER n (RFC822.SIZE strictly greater / smaller)."""

    relation: Literal["larger", "smaller"]
    size: int


@dataclass(frozen=True)
class SearchSequence:
    """A bare sequence-set (message numbers) or ``UID`` sequence-set."""

    sequence: SequenceSet
    uid: bool = False


@dataclass(frozen=True)
class SearchModSeq:
    """RFC 7162 3.1.5: MODSEQ [entry-name entry-type] mod-sequence-valzer."""

    modseq: int
    entry_name: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True)
class SearchNot:
    key: SearchKey


@dataclass(frozen=True)
class SearchOr:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True)
class SearchAnd:
    keys: tuple[SearchKey, ...]


SearchKey: TypeAlias = (SearchAll | SearchFlag | SearchDate | SearchHeader | SearchText | SearchSize
                        | SearchSequence | SearchModSeq | SearchNot | SearchOr | SearchAnd)


@dataclass(frozen=True)
class SearchProgram:
    """What follows ``SEARCH``: ESEARCH return options (None: plain SEARCH), charset, criteria."""

    criteria: SearchKey
    charset: str | None = None
    return_options: tuple[str, ...] | None = None


_FLAG_KEYS: dict[bytes, tuple[str, bool]] = {
    b"ANSWERED": ("\\Answered", True), b"UNANSWERED": ("\\Answered", False),
    b"DELETED": ("\\Deleted", True), b"UNDELETED": ("\\Deleted", False),
    b"DRAFT": ("\\Draft", True), b"UNDRAFT": ("\\Draft", False),
    b"FLAGGED": ("\\Flagged", True), b"UNFLAGGED": ("\\Flagged", False),
    b"SEEN": ("\\Seen", True), b"UNSEEN": ("\\Seen", False),
    b"RECENT": ("\\Recent", True), b"OLD": ("\\Recent", False),
}
_DATE_KEYS: dict[bytes, tuple[Literal["internal", "sent"], Literal["before", "on", "since"]]] = {
    b"BEFORE": ("internal", "before"), b"ON": ("internal", "on"), b"SINCE": ("internal", "since"),
    b"SENTBEFORE": ("sent", "before"), b"SENTON": ("sent", "on"), b"SENTSINCE": ("sent", "since"),
}
_HEADER_KEYS = {b"FROM": "from", b"TO": "to", b"CC": "cc", b"BCC": "bcc", b"SUBJECT": "subject"}
_KEYWORD_NAME = re.compile(rb"[A-Za-z]+")
# RFC 7162 3.1.5: entry-name = entry-flag-name; entry-flag-name = DQUOTE "/flags/" attr-flag DQUOTE
_ENTRY_TYPES = (b"PRIV", b"SHARED", b"ALL")


class _SearchParser:
    """Recursive descent over search-key with an explicit depth bound."""

    def __init__(self) -> None:
        self.handlers: dict[bytes, Callable[[Buffer, int], tuple[SearchKey, Buffer]]] = {
            b"ALL": lambda rest, depth: (SearchAll(), rest),
            b"NEW": lambda rest, depth: (SearchAnd((SearchFlag("\\Recent"), SearchFlag("\\Seen", False))), rest),
            b"KEYWORD": lambda rest, depth: self.keyword(rest, True),
            b"UNKEYWORD": lambda rest, depth: self.keyword(rest, False),
            b"HEADER": lambda rest, depth: self.header(rest),
            b"BODY": lambda rest, depth: self.text(rest, "body"),
            b"TEXT": lambda rest, depth: self.text(rest, "text"),
            b"LARGER": lambda rest, depth: self.size(rest, "larger"),
            b"SMALLER": lambda rest, depth: self.size(rest, "smaller"),
            b"UID": lambda rest, depth: self.uid(rest),
            b"NOT": self.negation,
            b"OR": self.disjunction,
            b"MODSEQ": lambda rest, depth: self.modseq(rest),
        }

    def key(self, buf: Buffer, depth: int) -> tuple[SearchKey, Buffer]:
        if depth > MAX_DEPTH:
            raise fail("Search criteria nested too deeply", buf)
        first = peek(buf)
        if first == b"(":
            return self.group(buf, depth)
        if first.isdigit() or first in (b"*", b"$"):
            sequence, rest = parse_sequence_set(buf)
            return SearchSequence(sequence), rest
        match = _KEYWORD_NAME.match(buf)
        if match is None:
            raise fail("Expected a search key", buf)
        name = match.group(0).upper()
        after = try_keyword(buf, name)
        if after is None:
            raise fail("Unknown search key", buf)
        return self.keyword_key(name, after, depth, buf)

    def keyword_key(self, name: bytes, rest: Buffer, depth: int, buf: Buffer) -> tuple[SearchKey, Buffer]:
        if name in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[name]
            return SearchFlag(flag, present), rest
        if name in _DATE_KEYS:
            field, relation = _DATE_KEYS[name]
            date, rest = parse_date(parse_sp(rest))
            return SearchDate(field, relation, date), rest
        if name in _HEADER_KEYS:
            value, rest = self.string(parse_sp(rest))
            return SearchHeader(_HEADER_KEYS[name], value), rest
        handler = self.handlers.get(name)
        if handler is None:
            raise fail("Unknown search key", buf)
        return handler(rest, depth)

    def group(self, buf: Buffer, depth: int) -> tuple[SearchKey, Buffer]:
        """RFC 3501 9: "(" search-key *(SP search-key) ")" — all must match."""
        rest = parse_char(buf, b"(")
        keys: list[SearchKey] = []
        while True:
            key, rest = self.key(rest, depth + 1)
            keys.append(key)
            if peek(rest) == b")":
                return (keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))), rest[1:]
            rest = parse_sp(rest)

    def negation(self, rest: Buffer, depth: int) -> tuple[SearchKey, Buffer]:
        key, rest = self.key(parse_sp(rest), depth + 1)
        return SearchNot(key), rest

    def disjunction(self, rest: Buffer, depth: int) -> tuple[SearchKey, Buffer]:
        left, rest = self.key(parse_sp(rest), depth + 1)
        right, rest = self.key(parse_sp(rest), depth + 1)
        return SearchOr(left, right), rest

    def string(self, buf: Buffer) -> tuple[str, Buffer]:
        octets, rest = parse_astring(buf)
        return decode_utf8(octets, "search string"), rest

    def keyword(self, rest: Buffer, present: bool) -> tuple[SearchKey, Buffer]:
        # RFC 3501 9: "KEYWORD" SP flag-keyword; flag-keyword = atom.
        atom, rest = parse_atom(parse_sp(rest), ATOM)
        return SearchFlag(atom.decode("ascii"), present), rest

    def header(self, rest: Buffer) -> tuple[SearchKey, Buffer]:
        # RFC 3501 9: "HEADER" SP header-fld-name SP astring.
        name, rest = self.string(parse_sp(rest))
        value, rest = self.string(parse_sp(rest))
        return SearchHeader(name.lower(), value), rest

    def text(self, rest: Buffer, where: Literal["body", "text"]) -> tuple[SearchKey, Buffer]:
        value, rest = self.string(parse_sp(rest))
        return SearchText(where, value), rest

    def size(self, rest: Buffer, relation: Literal["larger", "smaller"]) -> tuple[SearchKey, Buffer]:
        value, rest = parse_number(parse_sp(rest))
        return SearchSize(relation, value), rest

    def uid(self, rest: Buffer) -> tuple[SearchKey, Buffer]:
        sequence, rest = parse_sequence_set(parse_sp(rest))
        return SearchSequence(sequence, uid=True), rest

    def modseq(self, rest: Buffer) -> tuple[SearchKey, Buffer]:
        """RFC 7162 3.1.5: "MODSEQ" [SP entry-name SP entry-type-req] SP mod-sequence-valzer."""
        rest = parse_sp(rest)
        entry_name: str | None = None
        entry_type: str | None = None
        if peek(rest) == b'"':
            name, rest = parse_quoted(rest)
            entry_name = decode_utf8(name, "MODSEQ entry name")
            if not entry_name.startswith("/flags/"):
                raise fail("Invalid MODSEQ entry name", rest)
            kind, rest = parse_atom(parse_sp(rest), ATOM)
            if kind.upper() not in _ENTRY_TYPES:
                raise fail("Invalid MODSEQ entry type", rest)
            entry_type = kind.decode("ascii").lower()
            rest = parse_sp(rest)
        value, rest = parse_number(rest, MAX_MODSEQ)
        return SearchModSeq(value, entry_name, entry_type), rest


_PARSER = _SearchParser()


def parse_search_key(buf: Buffer) -> tuple[SearchKey, Buffer]:
    return _PARSER.key(buf, 0)


def parse_search_criteria(buf: Buffer) -> tuple[SearchKey, Buffer]:
    """search-key *(SP search-key); several keys mean all must match (RFC 3501 6.4.4)."""
    keys: list[SearchKey] = []
    rest = buf
    while True:
        key, rest = _PARSER.key(rest, 0)
        keys.append(key)
        if not len(rest):
            return (keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))), rest
        rest = parse_sp(rest)


def parse_return_options(buf: Buffer) -> tuple[tuple[str, ...], Buffer]:
    """RFC 4731 3.1: "RETURN" SP "(" [search-return-opt *(SP search-return-opt)] ")"; () means ALL."""
    rest = parse_char(buf, b"(")
    options: list[str] = []
    while peek(rest) != b")":
        if options:
            rest = parse_sp(rest)
        atom, rest = parse_atom(rest, ATOM)
        option = atom.decode("ascii").upper()
        if option not in RETURN_OPTIONS:
            raise fail("Unknown SEARCH return option", buf)
        if option not in options:
            options.append(option)
    return tuple(options) or ("ALL",), rest[1:]


def parse_charset(buf: Buffer) -> tuple[str, Buffer]:
    """RFC 3501 6.4.4: an unsupported charset is NO [BADCHARSET (list)], not BAD."""
    octets, rest = parse_astring(buf)
    charset = octets.decode("ascii", "replace").upper()
    if charset not in SUPPORTED_CHARSETS:
        raise ImapNo("Unsupported charset", f"{BADCHARSET} ({' '.join(SUPPORTED_CHARSETS)})")
    return charset, rest


def parse_search_program(buf: Buffer) -> tuple[SearchProgram, Buffer]:
    """After "SEARCH" SP: [RETURN (...) SP] [CHARSET astring SP] search-key *(SP search-key)."""
    return_options: tuple[str, ...] | None = None
    rest = buf
    after = try_keyword(rest, b"RETURN")
    if after is not None and peek(after, 2) == b" (":
        return_options, rest = parse_return_options(parse_sp(after))
        rest = parse_sp(rest)
    charset: str | None = None
    after = try_keyword(rest, b"CHARSET")
    if after is not None:
        charset, rest = parse_charset(parse_sp(after))
        rest = parse_sp(rest)
    if not len(rest):
        raise ParseError("Missing search criteria")
    criteria, rest = parse_search_criteria(rest)
    return SearchProgram(criteria, charset, return_options), rest

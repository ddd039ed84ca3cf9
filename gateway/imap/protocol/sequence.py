"""Sequence sets (RFC 3501 9 ``sequence-set``) and the saved search result ``$`` (RFC 5182 2.1).

A set is kept as written (so it round-trips) and is resolved against the
mailbox when used: ``*`` is the largest number in use (RFC 3501 6.4.8, 9 note on
seq-number), and a range may be written in either order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.imap.protocol.errors import ParseError
from gateway.imap.protocol.primitives import MAX_NUMBER, Buffer, fail

_SET_TOKEN = re.compile(rb"[0-9*:,$]+")
MAX_SET_ITEMS = 100_000   # a 64 KiB line of single UIDs stays within it


@dataclass(frozen=True)
class SequenceRange:
    """``start:end`` with ``None`` for ``*``; a single number has start == end."""

    start: int | None
    end: int | None

    def bounds(self, largest: int) -> tuple[int, int]:
        """RFC 3501 9 seq-range: "2:4" and "4:2" are equivalent; "*" is the largest number."""
        low = largest if self.start is None else self.start
        high = largest if self.end is None else self.end
        return (low, high) if low <= high else (high, low)

    def format(self) -> str:
        first = _format_number(self.start)
        return first if self.start == self.end else f"{first}:{_format_number(self.end)}"


def _format_number(value: int | None) -> str:
    return "*" if value is None else str(value)


@dataclass(frozen=True)
class SequenceSet:
    """A parsed sequence-set, or the saved search result when ``saved`` is true (RFC 5182)."""

    ranges: tuple[SequenceRange, ...] = ()
    saved: bool = False

    @classmethod
    def of(cls, *values: int | tuple[int, int]) -> SequenceSet:
        ranges = tuple(SequenceRange(v, v) if isinstance(v, int) else SequenceRange(*v) for v in values)
        return cls(ranges)

    def format(self) -> str:
        return "$" if self.saved else ",".join(item.format() for item in self.ranges)

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Merged, sorted inclusive intervals, ``*`` replaced by ``largest``.

        With ``largest == 0`` (empty mailbox) every ``*`` becomes 0 and is dropped:
        an empty mailbox has no message to match.  The saved result must be
        substituted by the session before resolving.
        """
        if self.saved:
            raise ValueError("the saved search result ($) must be substituted before resolving")
        intervals = sorted(item.bounds(largest) for item in self.ranges)
        merged: list[tuple[int, int]] = []
        for low, high in intervals:
            low = max(low, 1)
            if high < low:
                continue
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        return merged

    def contains(self, value: int, largest: int) -> bool:
        return any(low <= value <= high for low, high in self.resolve(largest))

    def iter_values(self, largest: int) -> Iterator[int]:
        """Each number in ascending order; callers bound ``largest`` (message count or max UID)."""
        for low, high in self.resolve(largest):
            yield from range(low, high + 1)

    def highest_explicit(self) -> int:
        """The largest number written (not ``*``), to check sequence numbers against EXISTS."""
        return max((n for item in self.ranges for n in (item.start, item.end) if n is not None), default=0)

    def uses_star(self) -> bool:
        return any(item.start is None or item.end is None for item in self.ranges)


def _parse_seq_number(text: bytes, whole: Buffer) -> int | None:
    """RFC 3501 9: seq-number = nz-number / "*"."""
    if text == b"*":
        return None
    if not text.isdigit() or len(text) > 10:
        raise fail("Invalid sequence number", whole)
    value = int(text)
    if value == 0 or value > MAX_NUMBER:
        raise fail("Sequence number out of range", whole)
    return value


def _parse_range(text: bytes, whole: Buffer) -> SequenceRange:
    parts = text.split(b":")
    if len(parts) == 1:
        value = _parse_seq_number(parts[0], whole)
        return SequenceRange(value, value)
    if len(parts) == 2:
        return SequenceRange(_parse_seq_number(parts[0], whole), _parse_seq_number(parts[1], whole))
    raise fail("Invalid sequence range", whole)


def parse_sequence_set(buf: Buffer, *, allow_saved: bool = True) -> tuple[SequenceSet, Buffer]:
    """RFC 3501 9 ``sequence-set``; RFC 5182 2.1 ``seq-last-command = "$"``."""
    match = _SET_TOKEN.match(buf)
    if match is None:
        raise fail("Expected a sequence set", buf)
    token = match.group(0)
    rest = buf[match.end():]
    if token == b"$":
        if not allow_saved:
            raise fail("Saved search result not allowed", buf)
        return SequenceSet(saved=True), rest
    pieces = token.split(b",")
    if len(pieces) > MAX_SET_ITEMS:
        raise fail("Sequence set too long", buf)
    return SequenceSet(tuple(_parse_range(piece, buf) for piece in pieces)), rest


def sequence_set_from_text(text: str) -> SequenceSet:
    """Parse a whole string as a sequence set (tests, configuration)."""
    value, rest = parse_sequence_set(memoryview(text.encode("ascii")))
    if len(rest):
        raise ParseError(f"Unexpected data after sequence set {text!r}")
    return value

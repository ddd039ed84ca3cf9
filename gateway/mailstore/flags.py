"""Flags as stored: system flags as a bit mask, keywords as a space-framed set (see tables.py)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from gateway.mailstore.interface import ANSWERED, DELETED, DRAFT, FLAGGED, RECENT, SEEN, StoreMode

SYSTEM_BITS = {SEEN: 1, ANSWERED: 2, FLAGGED: 4, DELETED: 8, DRAFT: 16}
_CANONICAL = {flag.lower(): flag for flag in SYSTEM_BITS}
# RFC 3501 9 (flag-keyword = atom): no specials, no wildcards, no spaces or controls.
_ATOM_SPECIALS = set('(){ %*"\\]')


def canonical(flag: str) -> str | None:
    """The stored form of a flag, or None for ``\\Recent`` (session state, RFC 3501 2.3.2)."""
    if flag.startswith("\\"):
        if flag.lower() == RECENT.lower():
            return None
        known = _CANONICAL.get(flag.lower())
        if known is None:
            raise ValueError(f"unknown system flag {flag}")
        return known
    if not flag or any(ch in _ATOM_SPECIALS or ord(ch) < 0x21 or ord(ch) > 0x7E for ch in flag):
        raise ValueError(f"invalid keyword {flag!r}")
    return flag


def encode(flags: Iterable[str]) -> tuple[int, frozenset[str]]:
    bits = 0
    keywords: set[str] = set()
    for flag in flags:
        stored = canonical(flag)
        if stored is None:
            continue
        if stored in SYSTEM_BITS:
            bits |= SYSTEM_BITS[stored]
        else:
            keywords.add(stored)
    return bits, frozenset(keywords)


def keywords_column(keywords: Iterable[str]) -> str:
    ordered = sorted(set(keywords))
    return " " + " ".join(ordered) + " " if ordered else " "


def keywords_of(column: str) -> frozenset[str]:
    return frozenset(column.split())


@functools.lru_cache(maxsize=4096)     # a folder has a handful of distinct flag combinations
def decode(bits: int, keywords: str) -> frozenset[str]:
    return frozenset(flag for flag, bit in SYSTEM_BITS.items() if bits & bit) | keywords_of(keywords)


def apply(mode: StoreMode, current_bits: int, current_keywords: frozenset[str], bits: int,
          keywords: frozenset[str]) -> tuple[int, frozenset[str]]:
    """RFC 3501 6.4.6: FLAGS replaces, +FLAGS adds, -FLAGS removes."""
    if mode is StoreMode.REPLACE:
        return bits, keywords
    if mode is StoreMode.ADD:
        return current_bits | bits, current_keywords | keywords
    return current_bits & ~bits, current_keywords - keywords

"""Folder names: UTF-8 in NFC, "/" as the hierarchy separator, INBOX case-insensitive."""

from __future__ import annotations

import unicodedata

from gateway.mailstore.errors import InvalidFolderName
from gateway.mailstore.interface import INBOX, SEPARATOR

MAX_NAME_BYTES = 1000


def normalise(name: str) -> str:
    """The stored form of a folder name; InvalidFolderName when it cannot be one."""
    name = unicodedata.normalize("NFC", name)
    # RFC 3501 5.1: INBOX is case-insensitive; its children follow (as in Dovecot and mox).
    if name.upper() == INBOX:
        return INBOX
    if name[: len(INBOX) + 1].upper() == INBOX + SEPARATOR:
        name = INBOX + name[len(INBOX):]
    _check(name)
    return name


def _check(name: str) -> None:
    if not name or name.startswith(SEPARATOR) or name.endswith(SEPARATOR) or SEPARATOR * 2 in name:
        raise InvalidFolderName(f"invalid folder name {name!r}")
    if any(ch in "*%" or unicodedata.category(ch) in ("Cc", "Cs", "Cn") for ch in name):
        # "*" and "%" are LIST wildcards (RFC 3501 6.3.8): a name holding them could never be listed alone.
        raise InvalidFolderName(f"folder name {name!r} holds a wildcard or control character")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidFolderName("folder name too long")


def parents(name: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = name.split(SEPARATOR)
    return [SEPARATOR.join(parts[:depth]) for depth in range(1, len(parts))]


def is_inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + SEPARATOR)

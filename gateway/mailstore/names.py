"""Folder names: UTF-8 in NFC, "/" as the hierarchy separator, INBOX case-insensitive.

Two checks. Every name looked up (``normalise``) must be well formed: not empty, no leading or trailing
separator, no empty level, no wildcard or control character. A name a folder is about to *take* (CREATE, the
destination of a RENAME: ``new_folder_name``) must also be one no file-based store or export could read as a
path of its own, as Dovecot refuses them (mailbox_list_is_valid_fs_name): no "." or ".." level, no first
level starting with "~" (a home directory); nor may its first level be INBOX in a spelling other than ASCII
case ("ınbox", "ＩＮＢＯＸ"), which is not INBOX (RFC 3501 5.1) yet would be shown beside it. Names already
stored stay reachable, so a folder created before these rules can still be renamed or deleted.
"""

from __future__ import annotations

import unicodedata

from gateway.mailstore.errors import InvalidFolderName
from gateway.mailstore.interface import INBOX, SEPARATOR

MAX_NAME_BYTES = 1000


def fold_inbox(name: str) -> str:
    """RFC 3501 5.1: "INBOX" is case-insensitive, and so is the INBOX of a hierarchy path (as in Dovecot and
    mox). ASCII case only: "ınbox".upper() is "INBOX" in Python, but a dotless i is not an I."""
    head = name[: len(INBOX)]
    if not head.isascii() or head.upper() != INBOX:
        return name
    if len(name) == len(INBOX):
        return INBOX
    return INBOX + name[len(INBOX):] if name[len(INBOX)] == SEPARATOR else name


def normalise(name: str) -> str:
    """The stored form of a folder name; InvalidFolderName when it cannot be one."""
    name = fold_inbox(unicodedata.normalize("NFC", name))
    _check(name)
    return name


def new_folder_name(name: str) -> str:
    """``normalise`` for a name a folder is about to take: also refuses what a file store would read as a
    path (module docstring); the reason names the rule."""
    name = normalise(name)
    levels = name.split(SEPARATOR)
    for level in levels:
        if level in (".", ".."):
            raise InvalidFolderName(f"Invalid mailbox name {name!r}: a level may not be {level!r} (a path)")
    if levels[0].startswith("~"):
        raise InvalidFolderName(f"Invalid mailbox name {name!r}: begins with '~' (a home directory)")
    if levels[0] != INBOX and unicodedata.normalize("NFKC", levels[0]).upper() == INBOX:
        raise InvalidFolderName(f"Invalid mailbox name {name!r}: INBOX in another spelling (RFC 3501 5.1)")
    return name


def _check(name: str) -> None:
    if not name:
        raise InvalidFolderName("Invalid mailbox name: empty")
    if name.startswith(SEPARATOR):
        raise InvalidFolderName(f"Invalid mailbox name {name!r}: begins with the hierarchy separator {SEPARATOR!r}")
    if name.endswith(SEPARATOR) or SEPARATOR * 2 in name:
        raise InvalidFolderName(f"Invalid mailbox name {name!r}: an empty level between separators")
    if any(ch in "*%" or unicodedata.category(ch) in ("Cc", "Cs", "Cn") for ch in name):
        # "*" and "%" are LIST wildcards (RFC 3501 6.3.8): a name holding them could never be listed alone.
        raise InvalidFolderName(f"Invalid mailbox name {name!r}: holds a wildcard or control character")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidFolderName("Invalid mailbox name: too long")


def parents(name: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = name.split(SEPARATOR)
    return [SEPARATOR.join(parts[:depth]) for depth in range(1, len(parts))]


def is_inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + SEPARATOR)

"""Message flags (RFC 3501 2.3.2, 9 ``flag``, ``flag-list``).

System flags are case-insensitive and are normalised to their canonical
spelling; keywords are kept as sent.  ``\\Recent`` is server-managed and may
not be set by a client (RFC 3501 9: ``flag`` excludes it; only ``flag-fetch``
includes it).
"""

from __future__ import annotations

from gateway.imap.protocol.primitives import (
    ATOM, Buffer, fail, parse_atom, parse_char, parse_sp, peek,
)

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
RECENT = "\\Recent"
_CANONICAL = {flag.upper(): flag for flag in (*SYSTEM_FLAGS, RECENT)}
MAX_FLAGS = 256


def canonical_flag(flag: str) -> str:
    """``\\SEEN`` → ``\\Seen``; keywords and unknown flag-extensions unchanged."""
    return _CANONICAL.get(flag.upper(), flag)


def parse_flag(buf: Buffer, *, allow_recent: bool = False) -> tuple[str, Buffer]:
    """RFC 3501 9: flag = system flag / flag-keyword / flag-extension ("\\" atom)."""
    backslash = peek(buf) == b"\\"
    atom, rest = parse_atom(buf[1:] if backslash else buf, ATOM)
    text = ("\\" if backslash else "") + atom.decode("ascii")
    if text.upper() == "NIL":
        # NIL is the nil token, never a keyword (Dovecot refuses it too): storing it would make
        # FLAGS (NIL) read as "no flag list" to clients.
        raise fail("NIL is not a flag", buf)
    flag = canonical_flag(text)
    if flag == RECENT and not allow_recent:
        raise fail("\\Recent cannot be set by a client", buf)
    return flag, rest


def parse_flag_list(buf: Buffer) -> tuple[tuple[str, ...], Buffer]:
    """RFC 3501 9: flag-list = "(" [flag *(SP flag)] ")"; duplicates dropped, order kept."""
    rest = parse_char(buf, b"(")
    flags: list[str] = []
    while peek(rest) != b")":
        if flags:
            rest = parse_sp(rest)
        flag, rest = parse_flag(rest)
        if flag not in flags:
            flags.append(flag)
        if len(flags) > MAX_FLAGS:
            raise fail("Too many flags", buf)
    return tuple(flags), rest[1:]


def parse_flags_unparenthesised(buf: Buffer) -> tuple[tuple[str, ...], Buffer]:
    """RFC 3501 9 store-att-flags: flag *(SP flag) without parentheses."""
    flags: list[str] = []
    rest = buf
    while True:
        flag, rest = parse_flag(rest)
        if flag not in flags:
            flags.append(flag)
        if len(flags) > MAX_FLAGS:
            raise fail("Too many flags", buf)
        if peek(rest) != b" ":
            return tuple(flags), rest
        rest = parse_sp(rest)

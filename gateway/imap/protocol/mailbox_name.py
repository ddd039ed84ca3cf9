"""Mailbox names on the wire (RFC 3501 5.1, 5.1.3; RFC 6855 3).

Without UTF8=ACCEPT, names are 7-bit and international characters travel in
modified UTF-7 (RFC 3501 5.1.3): printable US-ASCII stands for itself except
"&", which is written "&-"; everything else is UTF-16 in modified BASE64
("," instead of "/", no padding) between "&" and "-".  Once the client has
enabled UTF8=ACCEPT (RFC 6855 3) names are plain UTF-8.  Names are decoded to
``str`` at the edge; the rest of the server never sees the wire form.
"""

from __future__ import annotations

import base64
import binascii
import re

from gateway.imap.protocol.errors import CANNOT, ImapNo, ParseError
from gateway.imap.protocol.primitives import (
    LIST_ATOM, Buffer, decode_utf8, parse_astring, parse_atom, parse_string, peek,
)
from gateway.mailstore.names import fold_inbox

MAX_NAME_LENGTH = 1024
_PRINTABLE = re.compile(r"[\x20-\x7e]")
_SHIFTED = re.compile(r"&([^-]*)-")


def normalise_inbox(name: str) -> str:
    """RFC 3501 5.1: "INBOX" is case-insensitive; any ASCII spelling becomes ``INBOX``, as does the first level
    of a hierarchy path (the mail store's rule, ``fold_inbox``)."""
    return fold_inbox(name)


_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _b64_encode_utf16(run: str) -> str:
    """RFC 3501 5.1.3: UTF-16 in modified BASE64 ("," for "/", padding omitted)."""
    return _b64_encode_bytes(run.encode("utf-16-be"))


def _b64_encode_bytes(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode_modified_utf7(name: str) -> str:
    """RFC 3501 5.1.3 encoder: the canonical (shortest) form."""
    out: list[str] = []
    pending: list[str] = []
    for char in name:
        if _PRINTABLE.fullmatch(char):
            if pending:
                out.append(f"&{_b64_encode_utf16(''.join(pending))}-")
                pending = []
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    if pending:
        out.append(f"&{_b64_encode_utf16(''.join(pending))}-")
    return "".join(out)


def _decode_shifted(encoded: str) -> str:
    """The base64 run between "&" and "-"; strict, so each name has one encoding."""
    if not encoded or any(c not in _B64_ALPHABET for c in encoded):
        raise ParseError("Invalid modified UTF-7 in mailbox name")
    padded = encoded.replace(",", "/") + "=" * (-len(encoded) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("Invalid modified UTF-7 in mailbox name") from None
    if len(raw) % 2 or _b64_encode_bytes(raw) != encoded:
        raise ParseError("Non-canonical modified UTF-7 in mailbox name")
    try:
        text = raw.decode("utf-16-be")
    except UnicodeDecodeError:
        raise ParseError("Invalid UTF-16 in modified UTF-7 mailbox name") from None
    if any(_PRINTABLE.fullmatch(ch) for ch in text):
        # RFC 3501 5.1.3: printable US-ASCII "MUST represent themselves".
        raise ParseError("Non-canonical modified UTF-7 in mailbox name")
    return text


def decode_modified_utf7(text: str) -> str:
    """RFC 3501 5.1.3 decoder; rejects 8-bit, stray "&", and non-canonical encodings."""
    if any(not _PRINTABLE.fullmatch(ch) for ch in text):
        raise ParseError("Mailbox name must be printable 7-bit (modified UTF-7)")
    out: list[str] = []
    position = 0
    previous_end = -1
    for match in _SHIFTED.finditer(text):
        literal_part = text[position:match.start()]
        if "&" in literal_part:
            raise ParseError("Unterminated modified UTF-7 in mailbox name")
        out.append(literal_part)
        if match.group(1) == "":
            out.append("&")
        else:
            if match.start() == previous_end:
                # Two adjacent shifted runs should have been one (canonical form).
                raise ParseError("Non-canonical modified UTF-7 in mailbox name")
            out.append(_decode_shifted(match.group(1)))
            previous_end = match.end()
        position = match.end()
    tail = text[position:]
    if "&" in tail:
        raise ParseError("Unterminated modified UTF-7 in mailbox name")
    out.append(tail)
    return "".join(out)


class InvalidMailboxName(ImapNo):
    """A well-formed command naming a mailbox no folder can have (invalid modified UTF-7, a control
    character, too long): RFC 3501 7.1.2 NO [CANNOT] (RFC 5530 3), not BAD, as Dovecot answers."""

    def __init__(self, text: str) -> None:
        super().__init__(text, CANNOT)


def validate_name(name: str) -> str:
    """Refuse control characters and absurd lengths (names end up in paths and logs)."""
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidMailboxName("Mailbox name too long")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise InvalidMailboxName("Control character in mailbox name")
    return name


def decode_mailbox_octets(octets: bytes, *, utf8: bool, pattern: bool = False) -> str:
    """Wire octets to a name: UTF-8 when enabled (RFC 6855 3), else modified UTF-7.

    A name that is not valid modified UTF-7 is refused (``InvalidMailboxName``); a LIST reference or
    pattern (``pattern``) keeps its text as written instead, so it matches only a name spelt that way
    (the command still succeeds, RFC 3501 6.3.8)."""
    if utf8:
        return validate_name(decode_utf8(octets, "mailbox name"))
    try:
        text = octets.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("8-bit mailbox name without UTF8=ACCEPT (use modified UTF-7)") from None
    try:
        decoded = decode_modified_utf7(text)
    except ParseError as error:
        if not pattern:
            raise InvalidMailboxName(error.text) from None
        decoded = text
    return validate_name(decoded)


def encode_mailbox_name(name: str, *, utf8: bool) -> str:
    """A name for the wire: as is under UTF8=ACCEPT, else modified UTF-7."""
    return name if utf8 else encode_modified_utf7(name)


def parse_mailbox(buf: Buffer, *, utf8: bool) -> tuple[str, Buffer]:
    """RFC 3501 9 ``mailbox = "INBOX" / astring``, decoded, INBOX normalised."""
    octets, rest = parse_astring(buf)
    return normalise_inbox(decode_mailbox_octets(octets, utf8=utf8)), rest


def parse_list_mailbox(buf: Buffer, *, utf8: bool) -> tuple[str, Buffer]:
    """RFC 3501 9 ``list-mailbox = 1*list-char / string`` (may hold the wildcards % and *)."""
    if peek(buf) in (b'"', b"{"):
        octets, rest = parse_string(buf)
    else:
        octets, rest = parse_atom(buf, LIST_ATOM)
    return decode_mailbox_octets(octets, utf8=utf8, pattern=True), rest

"""Serialisers for everything the server writes (RFC 3501 7, 9 ``response``).

Strings: a quoted string when every octet is a 7-bit TEXT-CHAR (RFC 3501 9
``quoted``), a literal otherwise (CR, LF, NUL-free 8-bit; RFC 3501 4.3).  Under
UTF8=ACCEPT valid UTF-8 may be quoted too (RFC 6855 3).  Text is given as
``str`` (surrogate-escaped octets from the email package are restored) or
``bytes``.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence

from gateway.imap.protocol.dates import format_date_time
from gateway.imap.protocol.errors import status_line
from gateway.imap.protocol.mailbox_name import encode_mailbox_name
from gateway.imap.protocol.sequence import SequenceSet

CRLF = b"\r\n"
NIL = b"NIL"
_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")
_ATOM = re.compile(rb"[!#$&'+-\[^-z|-~\]]+")     # ASTRING-CHAR (RFC 3501 9)
MAX_QUOTED = 4096


def to_octets(value: str | bytes) -> bytes:
    """``str`` to octets; lone surrogates (8-bit header octets from the email package) become the original bytes."""
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape")


def quoted(value: str | bytes) -> bytes:
    """RFC 3501 9 quoted: DQUOTE, "\\" before each quoted-special, DQUOTE (caller checks it fits)."""
    octets = to_octets(value)
    return b'"' + octets.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(value: str | bytes) -> bytes:
    """RFC 3501 4.3: "{" number "}" CRLF octets."""
    octets = to_octets(value)
    return b"{%d}\r\n" % len(octets) + octets


def literal8(value: bytes) -> bytes:
    """RFC 3516 4.2: "~{" number "}" CRLF octets (BINARY fetch results)."""
    return b"~{%d}\r\n" % len(value) + value


def _is_quotable(octets: bytes, utf8: bool) -> bool:
    if len(octets) > MAX_QUOTED:
        return False
    if _QUOTABLE.fullmatch(octets):
        return True
    if not utf8 or b"\r" in octets or b"\n" in octets or b"\x00" in octets:
        return False
    try:
        octets.decode("utf-8")      # RFC 6855 3: UTF-8 allowed in quoted once enabled
    except UnicodeDecodeError:
        return False
    return True


def string(value: str | bytes, *, utf8: bool = False) -> bytes:
    """RFC 3501 9 ``string``: quoted when possible, literal otherwise."""
    octets = to_octets(value)
    return quoted(octets) if _is_quotable(octets, utf8) else literal(octets)


def nstring(value: str | bytes | None, *, utf8: bool = False) -> bytes:
    """RFC 3501 9 ``nstring = string / nil``."""
    return NIL if value is None else string(value, utf8=utf8)


def astring(value: str | bytes, *, utf8: bool = False) -> bytes:
    """RFC 3501 9 ``astring``: a bare atom when safe (and not the word NIL), else a string."""
    octets = to_octets(value)
    if _ATOM.fullmatch(octets) and octets.upper() != NIL:
        return octets
    return string(octets, utf8=utf8)


def mailbox(name: str, *, utf8: bool = False) -> bytes:
    """A mailbox name: modified UTF-7 (RFC 3501 5.1.3) or UTF-8 (RFC 6855 3), as an astring."""
    return astring(encode_mailbox_name(name, utf8=utf8), utf8=utf8)


def paren_list(items: Iterable[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


def nil_or_list(items: Sequence[bytes]) -> bytes:
    return paren_list(items) if items else NIL


def flag_list(flags: Iterable[str]) -> bytes:
    """RFC 3501 9 flag-list: flags are atoms (system flags with their backslash)."""
    return paren_list(flag.encode("ascii") for flag in flags)


# --- whole responses ---------------------------------------------------------------

def untagged(*parts: bytes) -> bytes:
    """``"*" SP ... CRLF`` (RFC 3501 7)."""
    return b"* " + b" ".join(parts) + CRLF


def tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """RFC 3501 7.1: tag SP ("OK" / "NO" / "BAD") SP ["[" resp-text-code "]" SP] text."""
    return status_line(tag, status, text, code)


def ok(tag: str, text: str, code: str | None = None) -> bytes:
    return tagged(tag, "OK", text, code)


def no(tag: str, text: str, code: str | None = None) -> bytes:
    return tagged(tag, "NO", text, code)


def bad(tag: str | None, text: str, code: str | None = None) -> bytes:
    return status_line(tag, "BAD", text, code)


def untagged_ok(text: str, code: str | None = None) -> bytes:
    """RFC 3501 7.1.1: ``* OK [code] text`` (greeting, UIDVALIDITY, PERMANENTFLAGS...)."""
    return status_line(None, "OK", text, code)


def bye(text: str) -> bytes:
    """RFC 3501 7.1.5."""
    return status_line(None, "BYE", text)


def greeting(text: str, capabilities: Sequence[str] | None = None) -> bytes:
    """RFC 3501 7.1.1 greeting, with the CAPABILITY response code clients use to skip a round trip."""
    code = "CAPABILITY " + " ".join(capabilities) if capabilities else None
    return untagged_ok(text, code)


def continuation(text: str = "Ready") -> bytes:
    """RFC 3501 7.5: ``"+" SP (resp-text / base64) CRLF``."""
    return b"+ " + text.encode("ascii", "replace") + CRLF


def continuation_base64(challenge: bytes) -> bytes:
    """RFC 3501 6.2.2: a SASL challenge, base64 (empty challenge is "+ " alone)."""
    return b"+ " + base64.b64encode(challenge) + CRLF


def capability(capabilities: Iterable[str]) -> bytes:
    """RFC 3501 7.2.1."""
    return untagged(b"CAPABILITY", *(name.encode("ascii") for name in capabilities))


def enabled(capabilities: Iterable[str]) -> bytes:
    """RFC 5161 3.2: ``* ENABLED`` with what was actually enabled (possibly nothing)."""
    return untagged(b"ENABLED", *(name.encode("ascii") for name in capabilities))


def exists(count: int) -> bytes:
    return untagged(b"%d EXISTS" % count)          # RFC 3501 7.3.1


def recent(count: int) -> bytes:
    return untagged(b"%d RECENT" % count)          # RFC 3501 7.3.2


def expunge(sequence_number: int) -> bytes:
    return untagged(b"%d EXPUNGE" % sequence_number)   # RFC 3501 7.4.1


def vanished(uids: SequenceSet, *, earlier: bool = False) -> bytes:
    """RFC 7162 3.2.10: ``* VANISHED [(EARLIER)] known-uids``."""
    prefix = b"VANISHED (EARLIER)" if earlier else b"VANISHED"
    return untagged(prefix, uids.format().encode("ascii"))


def flags(flag_names: Iterable[str]) -> bytes:
    return untagged(b"FLAGS", flag_list(flag_names))   # RFC 3501 7.2.6


def fetch(sequence_number: int, items: Sequence[tuple[str, bytes]]) -> bytes:
    """RFC 3501 7.4.2 ``* n FETCH (name value ...)``.

    UID goes first: Thunderbird (and the ProtonMail bridge issue that
    documented it) mis-assigns unsolicited FETCH data whose UID comes later.
    """
    ordered = sorted(items, key=lambda item: item[0] != "UID")
    body = b" ".join(name.encode("ascii") + b" " + value for name, value in ordered)
    return b"* %d FETCH (" % sequence_number + body + b")" + CRLF


def search(numbers: Iterable[int], *, highest_modseq: int | None = None) -> bytes:
    """RFC 3501 7.2.5 ``* SEARCH n...``; RFC 7162 3.1.5 adds ``(MODSEQ n)``."""
    parts = [b"SEARCH", *(str(n).encode() for n in numbers)]
    if highest_modseq is not None:
        parts.append(b"(MODSEQ %d)" % highest_modseq)
    return untagged(*parts)


def esearch(tag: str, results: Mapping[str, int | SequenceSet], *, uid: bool = False) -> bytes:
    """RFC 4731 3.1: ``* ESEARCH (TAG "t") [UID] MIN n MAX n ALL set COUNT n [MODSEQ n]``."""
    parts = [b'(TAG ' + quoted(tag) + b")"]
    if uid:
        parts.append(b"UID")
    for name, value in results.items():
        shown = value.format() if isinstance(value, SequenceSet) else str(value)
        parts.append(f"{name} {shown}".encode("ascii"))
    return untagged(b"ESEARCH", *parts)


def list_response(attributes: Iterable[str], delimiter: str | None, name: str, *,
                  utf8: bool = False, kind: str = "LIST",
                  extended_items: Sequence[bytes] = ()) -> bytes:
    """RFC 3501 7.2.2 ``* LIST (attrs) "delim" name``; RFC 5258 mbox-list-extended items appended."""
    delimiter_field = NIL if delimiter is None else quoted(delimiter)
    parts = [kind.encode("ascii"), flag_list(attributes), delimiter_field, mailbox(name, utf8=utf8)]
    if extended_items:
        parts.append(paren_list(extended_items))
    return untagged(*parts)


def childinfo(*options: str) -> bytes:
    """RFC 5258 mbox-list-extended item ``"CHILDINFO" ("SUBSCRIBED")`` (RECURSIVEMATCH results)."""
    return b'"CHILDINFO" ' + paren_list(quoted(option) for option in options)


def status(name: str, values: Mapping[str, int], *, utf8: bool = False) -> bytes:
    """RFC 3501 7.2.4 ``* STATUS mailbox (MESSAGES n ...)``."""
    items = b" ".join(f"{key} {value}".encode("ascii") for key, value in values.items())
    return untagged(b"STATUS", mailbox(name, utf8=utf8), b"(" + items + b")")


def id_response(parameters: Mapping[str, str | None] | None) -> bytes:
    """RFC 2971 3.2: ``* ID (...)`` or ``* ID NIL``."""
    if not parameters:
        return untagged(b"ID", NIL)
    return untagged(b"ID", paren_list(string(k) + b" " + nstring(v) for k, v in parameters.items()))


def namespace(personal: Sequence[tuple[str, str | None]], other: Sequence[tuple[str, str | None]] = (),
              shared: Sequence[tuple[str, str | None]] = (), *, utf8: bool = False) -> bytes:
    """RFC 2342 5: ``* NAMESPACE (("" "/")) NIL NIL``; each namespace is (prefix, delimiter)."""
    def group(spaces: Sequence[tuple[str, str | None]]) -> bytes:
        if not spaces:
            return NIL
        return paren_list(
            b"(" + string(encode_mailbox_name(prefix, utf8=utf8), utf8=utf8) + b" "
            + (NIL if delim is None else quoted(delim)) + b")"
            for prefix, delim in spaces)
    return b"* NAMESPACE " + group(personal) + b" " + group(other) + b" " + group(shared) + CRLF


def quota(root: str, resources: Sequence[tuple[str, int, int]]) -> bytes:
    """RFC 9208 5.1: ``* QUOTA root (STORAGE usage limit ...)``; STORAGE in KiB."""
    items = b" ".join(f"{name} {usage} {limit}".encode("ascii") for name, usage, limit in resources)
    return untagged(b"QUOTA", astring(root), b"(" + items + b")")


def quotaroot(name: str, roots: Sequence[str], *, utf8: bool = False) -> bytes:
    """RFC 9208 5.2: ``* QUOTAROOT mailbox root...``."""
    return untagged(b"QUOTAROOT", mailbox(name, utf8=utf8), *(astring(root) for root in roots))


def response_code_uids(code: str, uid_validity: int, *sets: SequenceSet | int) -> str:
    """RFC 4315 3: ``APPENDUID v uid`` / ``COPYUID v source-set dest-set`` codes."""
    shown = [value.format() if isinstance(value, SequenceSet) else str(value) for value in sets]
    return " ".join([code, str(uid_validity), *shown])


def internal_date(value: dt.datetime) -> bytes:
    """RFC 3501 9 date-time for INTERNALDATE (quotes included)."""
    return format_date_time(value).encode("ascii")

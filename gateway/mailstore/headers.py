"""Header fields cached at delivery: SEARCH columns and the RFC 3501 7.4.2 ENVELOPE.

Only the header section is parsed (it is bounded and small), never the body:
caching costs the same for a 1 KB note and a 50 MB imaging report.

Raw 8-bit octets in a field (RFC 6532 UTF-8, or legacy bytes that are no valid UTF-8): the ENVELOPE keeps
them exactly, as Dovecot sends them (a literal; the client chooses how to show them). What SEARCH compares
is text (``octets_text``): UTF-8 where valid, each other octet read as ISO-8859-1, never U+FFFD (the email
package's ``str()`` of such a field replaced every 8-bit octet, valid UTF-8 included, so an RFC 6532
subject "Café" could not be found; Dovecot keeps valid UTF-8 but turns the rest into U+FFFD).
"""

from __future__ import annotations

import codecs
import datetime as dt
import io
import re
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

# The RFC 5322 address parser IMAP's ENVELOPE uses (pure, no I/O): the cached ENVELOPE and the SEARCH
# columns must read addresses exactly as a FETCH of the header would.
from gateway.imap.protocol.envelope import render_envelope
from gateway.imap.protocol.headers import ImapAddress, parse_address_list, unfold

MAX_HEADER_BYTES = 256 * 1024
_ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
ADDRESS_HEADERS = frozenset(_ADDRESS_FIELDS)
_QUOTED_PART = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class CachedHeaders:
    message_id: str | None
    subject: str | None
    from_addr: str | None
    to_addr: str | None
    cc_addr: str | None
    sent_date: dt.datetime | None
    envelope: dict[str, Any]
    # Sealed stores: the ENVELOPE sealed as IMAP sends it (``HeaderSealer.seal``), ``envelope`` then empty.
    envelope_sealed: bytes | None = None

    def envelope_wire(self) -> bytes:
        """The ENVELOPE as IMAP sends it (what a sealed store keeps: one decryption per FETCH, no rendering)."""
        return render_envelope(self.envelope)


def header_section(prefix: bytes) -> bytes:
    """The header section of a message given its first bytes (up to the first empty line)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = prefix.find(separator)
        if end >= 0:
            return prefix[: end + len(separator)]
    return prefix[:MAX_HEADER_BYTES]


def _latin1_octets(error: UnicodeError) -> tuple[str, int]:
    """The ``codecs`` error handler of ``octets_text``: an octet that is not part of valid UTF-8 is ISO-8859-1."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return error.object[error.start:error.end].decode("latin-1"), error.end


codecs.register_error("gateway-latin-1-octets", _latin1_octets)


def octets_text(value: str) -> str:
    """A field as the email package parses bytes (8-bit octets kept as lone surrogates, surrogateescape) as
    text: RFC 6532 3.2 UTF-8 where the octets are valid UTF-8, each other octet ISO-8859-1 (the legacy charset
    of 8-bit French mail): nothing is lost and nothing becomes U+FFFD."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "gateway-latin-1-octets")


def field_texts(message: Message, name: str) -> list[str]:
    """Every ``name`` field of a parsed header section, unfolded, as text (``octets_text``)."""
    wanted = name.lower()
    return [octets_text(unfold(str(value)).strip(" \t")) for key, value in message.raw_items() if key.lower() == wanted]


def decode_text(raw: str | None) -> str | None:
    """RFC 2047 encoded words decoded, for case-insensitive SEARCH on what the user sees."""
    if raw is None:
        return None
    try:
        parts = decode_header(raw)
        if any(charset is None and isinstance(chunk, bytes) and not chunk.isascii() for chunk, charset in parts):
            return _joined(parts)
        return str(make_header(parts))
    except (ValueError, LookupError, UnicodeError):
        return raw


def _joined(parts: list[tuple[str | bytes, str | None]]) -> str:
    """``make_header`` for a field whose text between encoded words holds 8-bit characters (RFC 6532), which
    it would read as ASCII and refuse: that text (raw-unicode-escape bytes from ``decode_header``) decoded as
    itself, the encoded words by their charset; RFC 2047 6.2: no blank shown between two encoded words, one
    between an encoded word and text."""
    joined, after_word = "", False
    for chunk, charset in parts:
        octets = chunk if isinstance(chunk, bytes) else chunk.encode("raw-unicode-escape")
        text = octets.decode("raw-unicode-escape").strip() if charset is None else octets.decode(charset)
        if joined and not (after_word and charset is not None):
            joined += " "
        joined, after_word = joined + text, charset is not None
    return joined


def _address_list(raw: str | None) -> list[list[str | None]] | None:
    """ENVELOPE address structures (name adl mailbox host), RFC 3501 7.4.2, group syntax included:
    (NIL NIL "group" NIL) before a group's members and (NIL NIL NIL NIL) after them (RFC 5322 3.4)."""
    if not raw:
        return None
    addresses = [[a.name, a.adl, a.mailbox, a.host] for a in _addresses(raw)]
    return addresses or None


def _unquoted(local_part: str) -> str:
    """RFC 5322 3.2.4: ``"jean"`` -> ``jean``, ``"a\\"b"`` -> ``a"b``."""
    return _QUOTED_PART.sub(lambda match: re.sub(r"\\(.)", r"\1", match.group(1)), local_part)


# Address fields parsed lately, by their exact text: a mailbox's mail comes from and goes to the same few
# correspondents, and the email grammar is most of what parsing a header section costs (py-spy, delivery).
ADDRESS_CACHE = 2048


@lru_cache(maxsize=ADDRESS_CACHE)
def _addresses(raw: str) -> tuple[ImapAddress, ...]:
    """``parse_address_list``, kept (immutable) for the fields seen last."""
    return tuple(parse_address_list(raw))


@lru_cache(maxsize=ADDRESS_CACHE)
def address_search_text(raw: str | None) -> str | None:
    """What SEARCH FROM / TO / CC / BCC compare (RFC 3501 6.4.4): the field as the user sees it (RFC 2047
    encoded words decoded), then each address it holds in one plain form, ``Name <local@domain>`` (local
    part unquoted, encoded words decoded), and each group's name, one per line, so that a search for the
    address, the name or the group finds the message however the header spells them, as Dovecot does."""
    if raw is None:
        return None
    seen = decode_text(unfold(raw)) or ""
    forms = [seen]
    for address in _addresses(raw):
        if address.mailbox is None:
            continue                                   # a group's end marker
        if address.host is None:
            form = decode_text(address.mailbox) or ""  # a group's name (or an address without a domain)
        else:
            mailbox = f"{_unquoted(address.mailbox)}@{address.host}"
            name = decode_text(address.name) if address.name else None
            form = f"{name} <{mailbox}>" if name else mailbox
        if form and not any(form in known for known in forms):
            forms.append(form)
    return "\n".join(forms)


def _sent_date(raw: str | None) -> dt.datetime | None:
    """The Date field's wall-clock time in its own zone, the zone dropped (kept as if UTC): RFC 3501 6.4.4
    SENTBEFORE/SENTON/SENTSINCE compare that date "disregarding time and timezone", so 23:30 -0500 on
    1 July is 1 July, not 2 July in UTC."""
    if not raw:
        return None
    try:
        parsed = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.replace(tzinfo=dt.timezone.utc)


# email.feedparser's headerRE: a line that goes on the header section (a field, a continuation, a Unix From).
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")


def raw_fields(section: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs ``email.parser.BytesHeaderParser(policy=email.policy.compat32)
    .parsebytes(section).raw_items()`` lists, the same way (its feed parser's header rules and compat32's
    ``header_source_parse``, step for step), without a Message, a feed parser and its line buffer built for
    them: those were half of what a delivery's header parse cost.

    The octets are read as ASCII with surrogate escapes, cut into lines at CRLF, CR or LF (kept); the header
    section is the lines up to the first that is neither a field (``name:``), a continuation (SP or HT
    first) nor a Unix ``From `` line. Continuations before any field are dropped, a ``From `` line is no
    field (the envelope line first, out of place elsewhere), a line with an empty name is dropped; a
    field's value is its first line after the colon with leading SP and HT removed, its continuation lines
    appended as they are, trailing CR and LF removed."""
    fields: list[tuple[str, str]] = []
    value: list[str] = []                   # the open field's lines (empty: none open)
    for line in io.StringIO(section.decode("ascii", "surrogateescape"), newline="").readlines():
        if not _HEADER_LINE.match(line):
            break                           # the header section ends here
        if line[0] in " \t":
            if value:
                value.append(line)
            continue
        if value:
            fields.append(_source_parse(value))
            value = []
        if line.startswith("From ") or line[0] == ":":
            continue
        value = [line]
    if value:
        fields.append(_source_parse(value))
    return fields


def _source_parse(lines: list[str]) -> tuple[str, str]:
    """``email.policy.compat32.header_source_parse``."""
    name, value = lines[0].split(":", 1)
    value = value.lstrip(" \t") + "".join(lines[1:])
    return name, value.rstrip("\r\n")


def parse_headers(section: bytes) -> CachedHeaders:
    # The first field of each name, found in one pass over the section (``header_value`` per name walked
    # every field sixteen times: a quarter of a delivery's parse).
    first: dict[str, Any] = {}
    for key, value in raw_fields(section):
        first.setdefault(key.lower(), value)

    def exact(name: str) -> str | None:
        """As a FETCH of the header reads it (``header_value``: the first field, unfolded, as written): 8-bit
        octets (RFC 6532 UTF-8) kept, not replaced by U+FFFD."""
        value = first.get(name)
        return None if value is None else unfold(str(value)).strip(" \t")

    def raw(name: str) -> str | None:
        """The first ``name`` field unfolded (RFC 5322 2.2.3), its 8-bit octets as text (``octets_text``)."""
        value = exact(name)
        return None if value is None else octets_text(value)

    addresses = {name: _address_list(exact(name)) for name in _ADDRESS_FIELDS}
    # RFC 3501 7.4.2: sender and reply-to default to from when absent.
    addresses["sender"] = addresses["sender"] or addresses["from"]
    addresses["reply-to"] = addresses["reply-to"] or addresses["from"]
    envelope: dict[str, Any] = {
        "date": exact("date"), "subject": exact("subject"), **addresses,
        "in-reply-to": exact("in-reply-to"), "message-id": exact("message-id"),
    }
    message_id = raw("message-id")
    return CachedHeaders(
        message_id=message_id[:998] if message_id else None,
        subject=decode_text(raw("subject")),
        from_addr=address_search_text(raw("from")),
        to_addr=address_search_text(raw("to")),
        cc_addr=address_search_text(raw("cc")),
        sent_date=_sent_date(raw("date")),
        envelope=envelope,
    )

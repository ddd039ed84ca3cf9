"""Header fields cached at delivery: SEARCH columns and the RFC 3501 7.4.2 ENVELOPE.

Only the header section is parsed (it is bounded and small), never the body:
caching costs the same for a 1 KB note and a 50 MB imaging report.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
import re
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

# The RFC 5322 address parser IMAP's ENVELOPE uses (pure, no I/O): the cached ENVELOPE and the SEARCH
# columns must read addresses exactly as a FETCH of the header would.
from gateway.imap.protocol.envelope import render_envelope
from gateway.imap.protocol.headers import ImapAddress, parse_address_list, unfold
from gateway.imap.protocol.mime import header_value

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


def decode_text(raw: str | None) -> str | None:
    """RFC 2047 encoded words decoded, for case-insensitive SEARCH on what the user sees."""
    if raw is None:
        return None
    try:
        return str(make_header(decode_header(raw)))
    except (ValueError, LookupError, UnicodeError):
        return raw


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


def parse_headers(section: bytes) -> CachedHeaders:
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(section)

    def raw(name: str) -> str | None:
        """The first ``name`` field unfolded, as ENVELOPE serves it (RFC 5322 2.2.3)."""
        value = message.get(name)
        return None if value is None else unfold(str(value)).strip(" \t")

    def exact(name: str) -> str | None:
        """As a FETCH of the header reads it: 8-bit octets (RFC 6532 UTF-8) kept, not replaced by U+FFFD."""
        return header_value(message, name)

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

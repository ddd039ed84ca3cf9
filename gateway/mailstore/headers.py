"""Header fields cached at delivery: SEARCH columns and the RFC 3501 7.4.2 ENVELOPE.

Only the header section is parsed (it is bounded and small), never the body:
caching costs the same for a 1 KB note and a 50 MB imaging report.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

MAX_HEADER_BYTES = 256 * 1024
_ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")


@dataclass(frozen=True)
class CachedHeaders:
    message_id: str | None
    subject: str | None
    from_addr: str | None
    to_addr: str | None
    cc_addr: str | None
    sent_date: dt.datetime | None
    envelope: dict[str, Any]


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
    """ENVELOPE address structures: (name adl mailbox host) per RFC 3501 7.4.2."""
    if not raw:
        return None
    addresses: list[list[str | None]] = []
    for name, address in getaddresses([raw]):
        mailbox, _, host = address.rpartition("@") if "@" in address else (address, "", "")
        addresses.append([name or None, None, mailbox or None, host or None])
    return addresses or None


def _sent_date(raw: str | None) -> dt.datetime | None:
    if not raw:
        return None
    try:
        parsed = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def parse_headers(section: bytes) -> CachedHeaders:
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(section)

    def raw(name: str) -> str | None:
        value = message.get(name)
        return None if value is None else str(value).strip()

    addresses = {name: _address_list(raw(name)) for name in _ADDRESS_FIELDS}
    # RFC 3501 7.4.2: sender and reply-to default to from when absent.
    addresses["sender"] = addresses["sender"] or addresses["from"]
    addresses["reply-to"] = addresses["reply-to"] or addresses["from"]
    envelope: dict[str, Any] = {
        "date": raw("date"), "subject": raw("subject"), **addresses,
        "in-reply-to": raw("in-reply-to"), "message-id": raw("message-id"),
    }
    message_id = raw("message-id")
    return CachedHeaders(
        message_id=message_id[:998] if message_id else None,
        subject=decode_text(raw("subject")),
        from_addr=decode_text(raw("from")),
        to_addr=decode_text(raw("to")),
        cc_addr=decode_text(raw("cc")),
        sent_date=_sent_date(raw("date")),
        envelope=envelope,
    )

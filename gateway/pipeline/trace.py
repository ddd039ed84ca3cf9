"""Security and trace step: the header fields the gateway adds, and the ones it removes.

- ``Return-Path`` (RFC 5321 4.4: added at final delivery, the reverse-path);
- ``Received`` (RFC 5321 4.4) with the protocol keyword of RFC 3848
  (ESMTP, ESMTPS, ESMTPA, ESMTPSA), the TLS version and cipher and the
  authenticated user in comments;
- ``Authentication-Results`` (RFC 8601) for what is verified now: SMTP AUTH
  (``auth=pass smtp.auth=<user>``, RFC 8601 2.7.4) and the verified TLS client
  certificate of a peer operator, the DKIM verdict of what a peer relays (RFC 6376, 8601 2.7.1);
  S/MIME results join later;
- ``X-MSS-NIL`` (Ref#2 ECO.2.4.3) on mail our own users send, when missing.

Inbound ``Authentication-Results`` fields that claim our authserv-id are forged
and are removed at delivery (RFC 8601 5).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from email.utils import format_datetime

from gateway.pipeline.origin import Door, Origin
from gateway.pipeline.parse import MessageFacts
from gateway.storage.models import utcnow

FOLD = "\r\n\t"


class _SecondDate:
    """RFC 5322 3.3 date-time of now (``email.utils.format_datetime``), formatted once a second: it has no
    finer part, and formatting it costs more than the rest of a Received field (every message gets one)."""

    def __init__(self) -> None:
        self._last: tuple[dt.datetime | None, str] = (None, "")    # one tuple: replaced whole, read whole

    def now(self) -> str:
        second = utcnow().replace(microsecond=0)
        last_second, text = self._last
        if second != last_second:
            text = format_datetime(second)
            self._last = (second, text)
        return text


_DATE = _SecondDate()


def protocol_keyword(origin: Origin, *, smtputf8: bool = False) -> str:
    """RFC 3848 2: "S" for TLS, "A" for SMTP AUTH; RFC 6531 3.7.3: UTF8SMTP for SMTPUTF8 transactions."""
    if origin.door is Door.WEBMAIL:
        return "HTTPS"
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if origin.tls else "") + ("A" if origin.account else "")


def received_field(origin: Origin, *, hostname: str, queue_id: str, recipients: list[str], smtputf8: bool = False) -> str:
    helo = "".join(c if 32 < ord(c) < 127 or ord(c) > 159 else "?" for c in origin.helo or "") or "unknown"   # one token, one line
    parts = [f"Received: from {helo} ([{origin.client_address}])"]
    details = []
    if origin.tls:
        details.append(f"using {origin.tls.describe()}")
    if origin.account:
        details.append(f"authenticated as {origin.account.address}")
    elif origin.tls and origin.tls.peer_certificate_sha256:
        details.append(f"client certificate {', '.join(origin.tls.peer_names)} verified")
    if details:
        parts.append(f"({'; '.join(details)})")
    parts.append(f"by {hostname} (MSSante gateway) with {protocol_keyword(origin, smtputf8=smtputf8)} id {queue_id}")
    if len(recipients) == 1:
        parts.append(f"for <{recipients[0]}>")                      # RFC 5321 4.4: only for a single recipient
    return FOLD.join(parts) + f"; {_DATE.now()}"


def authentication_results_field(origin: Origin, *, hostname: str, verified: Sequence[str] = ()) -> str | None:
    """RFC 8601 2.2: our authserv-id, then one resinfo per method checked (auth, the peer's certificate,
    and ``verified``: results found while accepting, such as the relay door's dkim=)."""
    results = []
    if origin.account is not None:
        tls = f" ({origin.tls.version} {origin.tls.cipher})" if origin.tls else ""
        results.append(f"auth=pass{tls} smtp.auth={origin.account.address}")
    elif origin.tls and origin.tls.peer_certificate_sha256:
        names = ",".join(origin.tls.peer_names) or "unnamed"
        results.append(f"x-tls=pass ({origin.tls.version} {origin.tls.cipher}; client certificate verified"
                       f" sha256:{origin.tls.peer_certificate_sha256[:16]}) smtp.remote-cert={names}")
    results += [" ".join(result.split()) for result in verified]
    if not results:
        return None
    return f"Authentication-Results: {hostname};" + FOLD + (";" + FOLD).join(results)


def trace_header_block(origin: Origin, *, hostname: str, queue_id: str, sender: str, recipients: list[str],
                       facts: MessageFacts, x_mss_nil: str, smtputf8: bool = False, verified: Sequence[str] = (),
                       added_fields: Sequence[str] = ()) -> str:
    """The fields prepended to the message at delivery, CRLF-terminated, newest first; ``added_fields``
    (a delegate's Sender, RFC 5322 3.6.2) follow the trace fields."""
    received = received_field(origin, hostname=hostname, queue_id=queue_id, recipients=recipients, smtputf8=smtputf8)
    fields = [f"Return-Path: <{sender}>", received]
    results = authentication_results_field(origin, hostname=hostname, verified=verified)
    if results:
        fields.append(results)
    if origin.door.is_submission and x_mss_nil and not facts.has("X-MSS-NIL"):
        fields.append(f"X-MSS-NIL: {x_mss_nil}")
    fields += added_fields
    return "".join(field + "\r\n" for field in fields)

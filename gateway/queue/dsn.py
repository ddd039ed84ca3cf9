"""Delivery status notifications (RFC 3464), for remote and local delivery alike.

A DSN is ``multipart/report; report-type=delivery-status`` (RFC 6522) with
three parts: a human explanation (French and English), the machine-readable
``message/delivery-status`` (per-message fields, then one block per
recipient), and the original message, whole (``message/rfc822``) or its header
only (``text/rfc822-headers``) as the sender's RET parameter asked
(RFC 3461 4.3).

Who gets one (RFC 3461 4.1, 5.2): never for a null reverse-path (no bounce of
a bounce, RFC 5321 4.5.5 / 3461 5.2.1); per recipient, ``NOTIFY=NEVER``
suppresses every DSN, an explicit list allows only its kinds, and no NOTIFY
means failures only, plus the delay warning (our policy, as Postfix and mox).

``write_dsn`` streams into a file (the spool), so returning a 50 MB original
never holds it in memory; ``build_dsn`` returns bytes for small cases and tests.
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import quopri
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Protocol

from gateway.mail.parameters import encode_xtext
from gateway.storage.models import utcnow

CHUNK = 256 * 1024
CRLF = b"\r\n"
INLINE_FULL_LIMIT = 256 * 1024          # RET absent: the whole original only when it is at most this large


class Writable(Protocol):
    """Where a report is written: a file, a BytesIO, or the spool's ``SpoolFile``."""

    def write(self, data: bytes, /) -> object: ...


class Action(str, enum.Enum):
    """RFC 3464 2.3.3."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


NOTIFY_KIND = {Action.FAILED: "FAILURE", Action.DELAYED: "DELAY", Action.DELIVERED: "SUCCESS", Action.RELAYED: "SUCCESS"}


def wants_report(notify: str | None, action: Action) -> bool:
    """RFC 3461 4.1: does this recipient's NOTIFY ask for a report of this kind?"""
    if not notify:
        return action in (Action.FAILED, Action.DELAYED)          # the default: failures (and our delay warning)
    kinds = {kind.strip().upper() for kind in notify.split(",")}
    if "NEVER" in kinds:
        return False
    return NOTIFY_KIND.get(action, "") in kinds


@dataclass(frozen=True)
class RecipientReport:
    """One per-recipient block of ``message/delivery-status`` (RFC 3464 2.3)."""

    final_recipient: str                        # the address we tried (2.3.2), rfc822 type
    action: Action                              # 2.3.3
    status: str                                 # 2.3.4: an RFC 3463 code, e.g. "5.1.1"
    diagnostic: str | None = None               # 2.3.6: the remote reply, "550 5.1.1 no such user"
    remote_mta: str | None = None               # 2.3.5: the MX host that answered
    original_recipient: str | None = None       # 2.3.1: from ORCPT, "rfc822;addr"
    last_attempt: dt.datetime | None = None     # 2.3.7
    will_retry_until: dt.datetime | None = None  # 2.3.8 (delayed only)


@dataclass(frozen=True)
class OriginalMessage:
    """What the report says about the message it is about (RFC 3464 2.2)."""

    sender: str
    path: Path | None = None                    # the spooled message (without our trace fields)
    content: bytes | None = None                # or the bytes themselves
    trace_headers: bytes = b""                  # fields we prepended (Received...), returned with the header
    envid: str | None = None                    # RFC 3461 4.4 -> Original-Envelope-Id (2.2.1)
    ret: str | None = None                      # FULL | HDRS | None
    arrival: dt.datetime | None = None          # 2.2.5
    message_id: str | None = None
    subject: str | None = None
    size: int = 0


@dataclass
class DsnMessage:
    """A finished report: who it goes to, its Message-ID, and whether it carries 8-bit text."""

    recipient: str
    message_id: str
    eight_bit: bool = False
    size: int = 0
    boundary: str = field(default_factory=lambda: "dsn=" + secrets.token_hex(12))


SUMMARIES = {
    Action.FAILED: ("Échec de remise", "Delivery failure",
                    "Votre message n'a pas pu être remis au(x) destinataire(s) ci-dessous ; la remise est abandonnée.",
                    "Your message could not be delivered to the recipient(s) below; delivery has been abandoned."),
    Action.DELAYED: ("Remise retardée", "Delivery delayed",
                     "Votre message n'a pas encore pu être remis ; de nouvelles tentatives auront lieu. "
                     "Vous n'avez rien à faire pour l'instant.",
                     "Your message has not been delivered yet; delivery will be tried again. No action is needed yet."),
    Action.DELIVERED: ("Message remis", "Delivered", "Votre message a été remis.", "Your message was delivered."),
    Action.RELAYED: ("Message transmis", "Relayed",
                     "Votre message a été transmis à un serveur qui ne fournit pas d'avis de remise.",
                     "Your message was relayed to a server that does not send delivery notifications."),
    Action.EXPANDED: ("Message redistribué", "Expanded", "Votre message a été redistribué.", "Your message was expanded."),
}


def write_dsn(out: Writable, *, reporting_mta: str, original: OriginalMessage,
              recipients: Sequence[RecipientReport]) -> DsnMessage:
    """Write an RFC 3464 report about ``original`` for ``recipients`` (all of one action) to ``out``."""
    if not original.sender:
        raise ValueError("no DSN for a null reverse-path (RFC 3461 5.2.1: never bounce a bounce)")
    if not recipients:
        raise ValueError("a DSN reports on at least one recipient")
    action = recipients[0].action
    dsn = DsnMessage(recipient=original.sender, message_id=make_msgid("dsn", domain=reporting_mta))
    headers_only = _returns_headers_only(original, action)
    dsn.eight_bit = _has_8bit(original, headers_only)
    writer = _Counter(out)
    writer.write(_top_header(dsn, reporting_mta, original, action))
    writer.write(_human_part(dsn, original, recipients))
    writer.write(_status_part(dsn, reporting_mta, original, recipients))
    _original_part(writer, dsn, original, headers_only)
    writer.write(f"--{dsn.boundary}--\r\n".encode())
    dsn.size = writer.count
    return dsn


def build_dsn(*, reporting_mta: str, original: OriginalMessage, recipients: Sequence[RecipientReport]) -> bytes:
    """``write_dsn`` into memory (small originals, local delivery failures, tests)."""
    buffer = io.BytesIO()
    write_dsn(buffer, reporting_mta=reporting_mta, original=original, recipients=recipients)
    return buffer.getvalue()


# --------------------------------------------------------------------------- parts

def _returns_headers_only(original: OriginalMessage, action: Action) -> bool:
    """RFC 3461 4.3: RET=HDRS -> header only, RET=FULL -> everything; absent: our choice (small ones whole)."""
    if original.ret == "HDRS":
        return True
    if original.ret == "FULL":
        return False
    return action is not Action.FAILED or original.size > INLINE_FULL_LIMIT


def _has_8bit(original: OriginalMessage, headers_only: bool) -> bool:
    """RFC 6152: 8-bit octets in what we return make the report an 8BITMIME message."""
    if any(byte > 127 for byte in original.trace_headers):
        return True
    chunks = [_header_section(original)] if headers_only else _original_chunks(original)
    for chunk in chunks:
        if any(byte > 127 for byte in chunk):
            return True
    return False


def _top_header(dsn: DsnMessage, reporting_mta: str, original: OriginalMessage, action: Action) -> bytes:
    french, english, _, _ = SUMMARIES[action]
    subject = f"{english} / {french}"
    about = _clean_header_text(original.subject)
    if about:
        subject += f": {about}"
    fields = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original.sender}>",
        f"Subject: {_encode_word(subject)}",
        f"Date: {format_datetime(utcnow())}",
        f"Message-ID: {dsn.message_id}",
        "Auto-Submitted: auto-replied",                  # RFC 3834 5: no automatic answer to this
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{dsn.boundary}\"",
    ]
    return ("\r\n".join(fields) + "\r\n\r\nThis is a MIME-formatted delivery status notification.\r\n").encode()


def _human_part(dsn: DsnMessage, original: OriginalMessage, recipients: Sequence[RecipientReport]) -> bytes:
    _, _, french, english = SUMMARIES[recipients[0].action]
    lines = [french, "", english, ""]
    if original.message_id:
        lines.append(f"Message-ID : {_one_line(original.message_id)}")
    for report in recipients:
        lines.append(f"  <{_one_line(report.final_recipient)}> : {report.status}"
                     + (f" ({_one_line(report.remote_mta)})" if report.remote_mta else ""))
        if report.diagnostic:
            lines.append(f"      {_clean_header_text(report.diagnostic)}")
    text = "\r\n".join(lines) + "\r\n"
    body = quopri.encodestring(text.encode("utf-8")).replace(b"\r\n", b"\n").replace(b"\n", CRLF)
    return (f"--{dsn.boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode() + body + CRLF


def _status_part(dsn: DsnMessage, reporting_mta: str, original: OriginalMessage,
                 recipients: Sequence[RecipientReport]) -> bytes:
    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]                    # RFC 3464 2.2.2
    if original.envid:
        per_message.append(f"Original-Envelope-Id: {_one_line(original.envid)}")           # 2.2.1
    if original.arrival:
        per_message.append(f"Arrival-Date: {format_datetime(original.arrival)}")            # 2.2.5
    blocks = ["\r\n".join(per_message)] + ["\r\n".join(_recipient_fields(r)) for r in recipients]
    body = "\r\n\r\n".join(blocks) + "\r\n"
    return f"--{dsn.boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{body}\r\n".encode("utf-8")


def _recipient_fields(report: RecipientReport) -> list[str]:
    fields = []
    if report.original_recipient:                                            # RFC 3464 2.3.1
        addr_type, _, address = report.original_recipient.partition(";")
        fields.append(f"Original-Recipient: {_one_line(addr_type.strip()) or 'rfc822'}; {_one_line(address.strip())}")
    fields += [
        f"Final-Recipient: rfc822; {_one_line(report.final_recipient)}",    # 2.3.2
        f"Action: {report.action.value}",                                    # 2.3.3
        f"Status: {report.status}",                                          # 2.3.4
    ]
    if report.remote_mta:
        fields.append(f"Remote-MTA: dns; {_one_line(report.remote_mta)}")    # 2.3.5
    if report.diagnostic:
        fields.append(f"Diagnostic-Code: smtp; {_clean_header_text(report.diagnostic)}")   # 2.3.6
    if report.last_attempt:
        fields.append(f"Last-Attempt-Date: {format_datetime(report.last_attempt)}")        # 2.3.7
    if report.will_retry_until and report.action is Action.DELAYED:
        fields.append(f"Will-Retry-Until: {format_datetime(report.will_retry_until)}")     # 2.3.8
    return fields


def _original_part(out: "_Counter", dsn: DsnMessage, original: OriginalMessage, headers_only: bool) -> None:
    kind = "text/rfc822-headers" if headers_only else "message/rfc822"
    encoding = "8bit" if dsn.eight_bit else "7bit"
    out.write(f"--{dsn.boundary}\r\nContent-Type: {kind}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode())
    out.write(original.trace_headers)
    if headers_only:
        out.write(_header_section(original) + CRLF)
        return
    ends_with_newline = True
    for chunk in _original_chunks(original):
        out.write(chunk)
        ends_with_newline = chunk.endswith(b"\n")
    out.write(CRLF if ends_with_newline else CRLF + CRLF)    # RFC 2046 5.1.1: the CRLF before a boundary is the boundary's


def _header_section(original: OriginalMessage) -> bytes:
    """The original's header fields (RFC 6522 text/rfc822-headers), 8-bit bytes kept as they are."""
    collected = bytearray()
    for line in _original_lines(original):
        if line in (b"\r\n", b"\n"):
            break
        collected += line
    if collected and not collected.endswith(b"\n"):
        collected += CRLF
    return bytes(collected)


def _original_lines(original: OriginalMessage) -> Iterable[bytes]:
    if original.content is not None:
        yield from io.BytesIO(original.content)
        return
    assert original.path is not None, "an original message needs a path or its content"
    with original.path.open("rb") as handle:
        yield from handle


def _original_chunks(original: OriginalMessage) -> Iterable[bytes]:
    if original.content is not None:
        yield original.content
        return
    assert original.path is not None, "an original message needs a path or its content"
    with original.path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _one_line(value: str) -> str:
    """A value from the envelope (ORCPT, ENVID, an address, a host) quoted in a report field: as it is when
    it holds no control character, else xtext-encoded (RFC 3461 4), so it can never start a line or field.
    Parameters are validated when they arrive (gateway.mail.parameters); this guards what was stored before."""
    if not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        return value
    return encode_xtext(value)


def _clean_header_text(value: str | None) -> str:
    """One line of header text: no CR/LF (they would start a new field)."""
    return " ".join((value or "").split())


def _encode_word(text: str) -> str:
    """RFC 2047 encoded-word for a non-ASCII Subject."""
    if text.isascii():
        return text
    from email.header import Header
    return Header(text, "utf-8", maxlinelen=76).encode(linesep="\r\n\t")


class _Counter:
    """Counts what goes through to ``out`` (the DSN's size for the queue row)."""

    def __init__(self, out: Writable) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.count += len(data)

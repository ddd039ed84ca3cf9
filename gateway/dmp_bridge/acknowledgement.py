"""Tell the sender what became of their documents, and tell the patient a document arrived.

CI-SIS usage of receipts (mssante.md §1.7, IG volet trans-lps-doc-cda-courriel-mss):

- When the message carries ``Disposition-Notification-To`` equal to its
  ``Return-Path`` (loop prevention: a different address needs a person's
  consent, RFC 8098 2.1), an MDN goes back: ``multipart/report;
  report-type=disposition-notification`` with a human part, a
  ``message/disposition-notification`` part (Reporting-UA, Original-Recipient,
  Final-Recipient, Original-Message-ID, Disposition) in US-ASCII (labels
  without their accents; RFC 6533 ``message/global-disposition-notification``
  only when an address is non-ASCII) and the original message.
  ``Disposition: automatic-action/MDN-sent-automatically; processed`` when
  every document was integrated; ``processed/Error: <code>^<label>`` (CI-SIS
  form) plus the RFC 8098 ``Error:`` field otherwise. The subject is the
  original one on success, ``[KO Intégration système !][<code>] <subject>`` on
  failure.
- Without such a request, a plain RFC 5322 message with the same failure
  subject and the original attached as ``message/rfc822`` goes to the
  Return-Path, on failure only.
- Nothing is sent about reports, auto-submitted mail (RFC 3834) or mail with a
  null reverse-path.

Every notice is keyed (SHA-256 of kind family, message, recipient) in
``filing_notices``, whose row commits with the notice's queue rows (and, from
the worker, with the filing they report on): at most one
acknowledgement per (message, recipient), at most one patient notification per
(message, patient), however often filing runs.

The patient's notification carries no health content, not even a title
(mssante.md §2.1): "Un nouveau document a été ajouté à votre dossier".
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, getaddresses, make_msgid

from sqlalchemy import Table, insert, select
from sqlalchemy.engine import Connection

from gateway.config import Settings
from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.filing import DocumentOutcome, FilingReport
from gateway.dmp_bridge.tables import FilingNotice, NoticeKind
from gateway.queue.generated import GeneratedMailQueue, PreparedMail
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, State, utcnow
from gateway.storage.prepared import Prepared

log = logging.getLogger("gateway.dmp.ack")

NOTICES = cast(Table, FilingNotice.__table__)
MAILBOXES = cast(Table, Mailbox.__table__)
_INSERT_NOTICE = Prepared(insert(NOTICES))
KO_PREFIX = "[KO Intégration système !]"
REPORTING_UA = "MSSante gateway DMP bridge"
NOTIFICATION_SUBJECT = "Un nouveau document a été ajouté à votre dossier"
NOTIFICATION_TEXT = (
    "Bonjour,\n\n"
    "Un nouveau document a été ajouté à votre dossier.\n"
    "Connectez-vous à votre espace pour le consulter.\n\n"
    "Ce message est envoyé automatiquement : merci de ne pas y répondre.\n"
)


@dataclass(frozen=True)
class DeliveredMessage:
    """The delivered copy a filing job examined."""

    job_id: int
    delivery_key: str
    recipient: str  # the mailbox it was delivered to: the MDN's Final-Recipient
    message: EmailMessage
    raw: bytes

    @property
    def message_key(self) -> str:
        return str(self.message.get("Message-ID", "") or "").strip() or self.delivery_key

    @property
    def return_path(self) -> str | None:
        """The envelope sender, from the Return-Path our delivery prepended; None for ``<>``."""
        return _single_address(self.message.get_all("Return-Path", [])[:1])

    @property
    def subject(self) -> str:
        return " ".join(str(self.message.get("Subject", "") or "").split())


@dataclass(frozen=True)
class Failure:
    code: IntegrationCode
    reason: str


class Acknowledger:
    def __init__(self, db: Database, queue: GeneratedMailQueue, settings: Settings) -> None:
        self.db = db
        self.queue = queue
        self.hostname = settings.hostname
        self.patient_domain = settings.directory.patient_domain

    def wanted_in(self, connection: Connection,
                  filings: Sequence[tuple[DeliveredMessage, FilingReport]]) -> list[WantedNotice]:
        """The notices the filings call for and not sent yet, in their order, read in ``connection``'s
        transaction (synchronous): a notice key wanted twice in the batch is wanted once, for the first.
        Their messages are built later, outside the transaction (``WantedNotice.message``)."""
        mailboxes = _patient_mailboxes(connection, {patient_id for _delivered, report in filings
                                                    for patient_id in _filed_patients(report)})
        wanted: list[WantedNotice] = []
        for index, (delivered, report) in enumerate(filings):
            acknowledgement = self._acknowledgement(delivered, report)
            if acknowledgement is not None:
                kind, recipient, build = acknowledgement
                wanted.append(WantedNotice(index, _notice_key("ack", delivered.message_key, delivered.recipient), kind,
                                           delivered.job_id, recipient, build))
            for mailbox in sorted({address for patient_id in _filed_patients(report)
                                   for address in mailboxes.get(patient_id, ())}):
                wanted.append(WantedNotice(index, _notice_key("notify", delivered.message_key, mailbox),
                                           NoticeKind.PATIENT_NOTIFICATION, delivered.job_id, mailbox,
                                           functools.partial(patient_notification, mailbox, self.patient_domain,
                                                             self.hostname)))
        sent = set(connection.execute(select(NOTICES.c.notice_key).where(
            NOTICES.c.notice_key.in_({w.key for w in wanted}))).scalars()) if wanted else set()
        unique = [w for w in {w.key: w for w in reversed(wanted)}.values() if w.key not in sent]
        unique.sort(key=wanted.index)
        return unique

    async def spool(self, wanted: Sequence[WantedNotice]) -> list[SpooledNotice]:
        """Each wanted notice built and durably in the spool (all or none: one route look-up per distinct
        recipient, the files' fsyncs side by side, one fsync of the queue folder), to queue in the transaction
        (``queue_in``). A notice whose recipient cannot receive mail is left out."""
        messages = [want.message() for want in wanted]
        prepared = await self.queue.prepare_many([(message, want.recipient, _message_id_of(message))
                                                  for want, message in zip(wanted, messages)])
        return [SpooledNotice(want, mail) for want, mail in zip(wanted, prepared) if mail is not None]

    @staticmethod
    def queue_in(connection: Connection, spooled: Sequence[SpooledNotice]) -> None:
        """The notice rows (one executemany) and the queue rows of ``spooled``, in the filing transaction."""
        _INSERT_NOTICE.run_many(connection, [
            {"notice_key": notice.wanted.key, "kind": notice.wanted.kind.value, "job_id": notice.wanted.job_id,
             "recipient": notice.wanted.recipient, "queue_id": notice.mail.queue_id, "created_at": utcnow()}
            for notice in spooled])
        for notice in spooled:
            notice.mail.insert_in(connection)

    def _acknowledgement(self, delivered: DeliveredMessage,
                         report: FilingReport) -> tuple[NoticeKind, str, Callable[[], bytes]] | None:
        sender = delivered.return_path
        if sender is None or not _may_answer(delivered.message):
            return None
        failure = first_failure(report)
        if _mdn_requested(delivered.message, sender) and (failure is not None or report.in_record):
            kind = NoticeKind.MDN_ERROR if failure else NoticeKind.MDN_PROCESSED
            return kind, sender, functools.partial(build_mdn, delivered, failure, report, self.hostname)
        if failure is not None:
            return NoticeKind.FAILURE_REPORT, sender, functools.partial(build_failure_report, delivered, failure,
                                                                        report, self.hostname)
        return None

    def dispatch(self, notices: Sequence[SpooledNotice]) -> None:
        """Their transaction committed: deliver them."""
        for notice in notices:
            self.queue.dispatch(notice.mail)
            log.info("%s queued as %s for %s", notice.wanted.kind.value, notice.mail.queue_id,
                     notice.mail.recipient.address)

    def discard(self, notices: Sequence[SpooledNotice]) -> None:
        """Their transaction did not commit: they were never queued."""
        for notice in notices:
            self.queue.discard(notice.mail)



def _patient_mailboxes(connection: Connection, patient_ids: set[int]) -> dict[int, list[str]]:
    """The active hosted mailboxes of each patient, by patient id."""
    if not patient_ids:
        return {}
    rows = connection.execute(
        select(MAILBOXES.c.patient_id, MAILBOXES.c.address).where(
            MAILBOXES.c.patient_id.in_(patient_ids), MAILBOXES.c.type == "PAT", MAILBOXES.c.hosted.is_(True),
            MAILBOXES.c.state == State.ACTIVE.value).order_by(MAILBOXES.c.address)).all()
    found: dict[int, list[str]] = {}
    for patient_id, address in rows:
        if patient_id is not None:
            found.setdefault(patient_id, []).append(address)
    return found


@dataclass(frozen=True)
class WantedNotice:
    """A notice a filing calls for (``filing``: its index in the batch); its message built on demand."""

    filing: int = field(compare=False)
    key: str  # unique per (kind family, message, recipient): ``filing_notices.notice_key``
    kind: NoticeKind
    job_id: int
    recipient: str
    message: Callable[[], bytes] = field(compare=False)


@dataclass(frozen=True)
class SpooledNotice:
    """A wanted notice durably in the spool, to queue in the filing transaction, then dispatch (or discard)."""

    wanted: WantedNotice
    mail: PreparedMail


def _notice_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _filed_patients(report: FilingReport) -> set[int]:
    return {o.patient_id for o in report.filed if o.patient_id is not None}


# ------------------------------------------------------------------------------------ decisions


def first_failure(report: FilingReport) -> Failure | None:
    refusal = report.first_refusal
    if refusal is None:
        return None
    code = refusal.code or IntegrationCode.OTHER
    return Failure(code, refusal.reason or code.label)


def _mdn_requested(message: EmailMessage, sender: str) -> bool:
    """RFC 8098 2.1 and CI-SIS: automatic only when Disposition-Notification-To is the Return-Path."""
    requested = _single_address(message.get_all("Disposition-Notification-To", []))
    return requested is not None and requested.casefold() == sender.casefold()


def _may_answer(message: EmailMessage) -> bool:
    """Never answer a report or auto-submitted mail (RFC 3834 2, RFC 8098 3.1)."""
    auto = str(message.get("Auto-Submitted", "no") or "no").strip().lower()
    return auto.startswith("no") and message.get_content_type() != "multipart/report"


def _single_address(values: Sequence[object]) -> str | None:
    addresses = [address for _name, address in getaddresses([str(v) for v in values]) if "@" in address]
    return addresses[0] if len(addresses) == 1 else None


# ------------------------------------------------------------------------------------ messages


def failure_subject(code: IntegrationCode, subject: str) -> str:
    return f"{KO_PREFIX}[{int(code)}] {subject}".rstrip()


def disposition(failure: Failure | None) -> str:
    base = "automatic-action/MDN-sent-automatically; processed"
    return base if failure is None else f"{base}/Error: {int(failure.code)}^{failure.code.label}"


def build_mdn(delivered: DeliveredMessage, failure: Failure | None, report: FilingReport, hostname: str) -> bytes:
    """RFC 8098 multipart/report with the CI-SIS disposition and subject."""
    boundary = f"=_mdn_{secrets.token_hex(12)}"
    subject = failure_subject(failure.code, delivered.subject) if failure else delivered.subject
    headers = _top_headers(delivered.recipient, delivered.return_path or "", subject, hostname, delivered.message)
    headers.append(f'Content-Type: multipart/report; report-type=disposition-notification; boundary="{boundary}"')
    parts = [_text_part(human_text(delivered, failure, report)), _disposition_part(delivered, failure, hostname),
             _original_part(delivered.raw)]
    return _multipart(headers, boundary, parts)


def build_failure_report(delivered: DeliveredMessage, failure: Failure, report: FilingReport, hostname: str) -> bytes:
    """A plain message (no MDN was requested): the KO subject, the reason, the original attached."""
    boundary = f"=_ko_{secrets.token_hex(12)}"
    headers = _top_headers(delivered.recipient, delivered.return_path or "",
                           failure_subject(failure.code, delivered.subject), hostname, delivered.message)
    headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    return _multipart(headers, boundary, [_text_part(human_text(delivered, failure, report)), _original_part(delivered.raw)])


def patient_notification(mailbox: str, patient_domain: str, hostname: str, *,
                         subject: str = NOTIFICATION_SUBJECT, text: str = NOTIFICATION_TEXT) -> bytes:
    """A content-free notice to a patient's mailbox: no title, no author, nothing medical.

    The message is the same for every notice to a mailbox but for its Date and Message-ID (RFC 5322 3.6:
    header fields in any order), so it is built once and those two fields are put in front."""
    if not hostname.isascii():
        return _patient_notification(mailbox, patient_domain, hostname, subject, text, stamped=True)
    stamp = f"Date: {format_datetime(utcnow())}\r\nMessage-ID: {make_msgid(domain=hostname)}\r\n"
    return stamp.encode("ascii") + _patient_notification(mailbox, patient_domain, hostname, subject, text,
                                                         stamped=False)


@functools.lru_cache(maxsize=4096)
def _patient_notification(mailbox: str, patient_domain: str, hostname: str, subject: str, text: str, *,
                          stamped: bool) -> bytes:
    message = EmailMessage(policy=SMTP)
    if stamped:
        message["Date"] = format_datetime(utcnow())
        message["Message-ID"] = make_msgid(domain=hostname)
    message["From"] = Address("Mon espace santé", "ne-pas-repondre", patient_domain)
    message["To"] = mailbox
    message["Subject"] = subject
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    return message.as_bytes()


def human_text(delivered: DeliveredMessage, failure: Failure | None, report: FilingReport) -> str:
    lines = [f"Message : {delivered.subject or '(sans objet)'}", f"Destinataire : {delivered.recipient}", ""]
    if failure is None:
        lines.append("Le message a été traité : les documents ont été intégrés au dossier du patient.")
    else:
        lines.append(f"Échec de l'intégration : {int(failure.code)}^{failure.code.label}")
        lines.append(f"Motif : {failure.reason}")
        lines.append("Le message a tout de même été remis à son destinataire.")
    lines += ["", "Documents :"] + [_outcome_line(o) for o in report.outcomes]
    return "\r\n".join(lines) + "\r\n"


def _outcome_line(outcome: DocumentOutcome) -> str:
    name = outcome.unique_id or outcome.attachment or "?"
    code = f" {int(outcome.code)}^{outcome.code.label}" if outcome.code else ""
    reason = f" ({outcome.reason})" if outcome.reason else ""
    return f"- {name} : {outcome.outcome.value}{code}{reason}"


def _top_headers(from_address: str, to_address: str, subject: str, hostname: str, original: EmailMessage) -> list[str]:
    holder = EmailMessage(policy=SMTP)
    holder["From"] = Address("Intégration DMP", *from_address.rsplit("@", 1))
    holder["To"] = to_address
    holder["Subject"] = subject
    holder["Date"] = format_datetime(utcnow())
    holder["Message-ID"] = make_msgid(domain=hostname)
    original_id = str(original.get("Message-ID", "") or "").strip()
    if original_id:
        holder["In-Reply-To"] = original_id
        holder["References"] = original_id
    holder["Auto-Submitted"] = "auto-replied"
    holder["MIME-Version"] = "1.0"
    return [line for line in holder.as_bytes().decode("ascii").rstrip("\r\n").split("\r\n")]


def _text_part(text: str) -> bytes:
    part = EmailMessage(policy=SMTP)
    part.set_content(text, charset="utf-8", cte="quoted-printable")
    del part["MIME-Version"]
    return part.as_bytes()


def _disposition_part(delivered: DeliveredMessage, failure: Failure | None, hostname: str) -> bytes:
    """The machine-readable part: RFC 8098 ``message/disposition-notification`` in ASCII.

    RFC 8098 3.1.1 fields are US-ASCII: the CI-SIS labels (``904^INS ou traits
    d'identité...``) are written there without their accents. Only when an address
    itself is non-ASCII (SMTPUTF8) is the part RFC 6533 6
    ``message/global-disposition-notification``, in UTF-8, addresses typed ``utf-8``.
    """
    original_recipient, final_recipient = _original_recipient(delivered), delivered.recipient
    original_id = str(delivered.message.get("Message-ID", "") or "").strip()
    global_form = not all(value.isascii() for value in (original_recipient, final_recipient, original_id, hostname))
    text: Callable[[str], str] = (lambda value: value) if global_form else to_ascii
    address_type = "utf-8" if global_form else "rfc822"  # RFC 6533 3.2: utf-8-type-addr
    fields = [f"Reporting-UA: {hostname}; {REPORTING_UA}",
              f"Original-Recipient: {address_type};{original_recipient}",
              f"Final-Recipient: {address_type};{final_recipient}"]
    if original_id:
        fields.append(f"Original-Message-ID: {original_id}")
    fields.append(f"Disposition: {text(disposition(failure))}")
    if failure is not None:
        fields.append(f"Error: {text(f'{int(failure.code)}^{failure.code.label}')}")  # RFC 8098 3.2.7
    body = "\r\n".join(fields) + "\r\n"
    if global_form:
        return (b"Content-Type: message/global-disposition-notification\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                + body.encode("utf-8"))
    return (b"Content-Type: message/disposition-notification\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            + body.encode("ascii"))


_ASCII_LETTERS = str.maketrans({"œ": "oe", "Œ": "OE", "æ": "ae", "Æ": "AE", "\u2019": "'", "\u00a0": " "})


def to_ascii(text: str) -> str:
    """``text`` in US-ASCII for an RFC 8098 field: accents dropped ("identité" -> "identite"), others as '?'."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_ASCII_LETTERS))
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return stripped.encode("ascii", errors="replace").decode("ascii")


def _original_recipient(delivered: DeliveredMessage) -> str:
    """RFC 8098 3.2.3: from the Original-Recipient header an MTA may add (ORCPT), else the mailbox."""
    header = str(delivered.message.get("Original-Recipient", "") or "")
    _kind, _, address = header.partition(";")
    return address.strip() or delivered.recipient


def _original_part(raw: bytes) -> bytes:
    encoding = "8bit" if any(byte > 0x7F for byte in raw) else "7bit"
    body = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return (b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n"
            + f"Content-Transfer-Encoding: {encoding}\r\n\r\n".encode() + body)


def _multipart(headers: list[str], boundary: str, parts: list[bytes]) -> bytes:
    out = bytearray("\r\n".join(headers).encode("ascii") + b"\r\n\r\n")
    out += b"This is a MIME-encapsulated message.\r\n"
    for part in parts:
        out += f"\r\n--{boundary}\r\n".encode() + part.rstrip(b"\r\n") + b"\r\n"
    out += f"\r\n--{boundary}--\r\n".encode()
    return bytes(out)


def _message_id_of(message: bytes) -> str | None:
    head = message.split(b"\r\n\r\n", 1)[0].decode("ascii", errors="replace")
    for line in head.split("\r\n"):
        if line.lower().startswith("message-id:"):
            return line.split(":", 1)[1].strip()
    return None

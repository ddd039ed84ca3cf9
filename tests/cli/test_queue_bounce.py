"""`gateway queue delete --bounce` on a sealed message, through the real CLI beside a real `gateway serve`.

The message is small: it is kept, sealed, in its queue row rather than a spool file of its own.

The CLI must use the same sealed spool as ``serve``: the failure DSN (RFC 3464) quotes the original's
header section in clear (read through the spool cipher, not the sealed file's ciphertext), and the DSN's
own spool file is sealed like every other (no plaintext of either message on disk). Once ``serve`` runs
again, local delivery hands the DSN to the sender's INBOX, where it reads as a report on the original.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import json
import re
import smtplib
import sqlite3
import ssl
from contextlib import closing
from email.message import EmailMessage
from pathlib import Path

from gateway.security.at_rest import SPOOL_MAGIC
from tests.harness import GatewayProcess, free_ports, read_inbox, wait_until

REMOTE = "dr.martin@autre-operateur.mssante.localhost"     # the demo's trusted other operator
SUBJECT = "Compte rendu opératoire 7f3c9e"
BODY_MARKER = "Hémoglobine glyquée 7,2 %"


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _submit(gateway: GatewayProcess, sender: dict[str, str]) -> str:
    """Submission with STARTTLS and AUTH; the queue id from the 250."""
    message = EmailMessage()
    message["From"] = sender["address"]
    message["To"] = REMOTE
    message["Subject"] = SUBJECT
    message.set_content(f"{BODY_MARKER}\n")
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=60) as client:
        client.starttls(context=_tls(gateway))
        client.login(sender["address"], sender["password"])
        client.mail(sender["address"])
        assert client.rcpt(REMOTE)[0] == 250
        code, reply = client.data(message.as_bytes(policy=email.policy.SMTP))
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def _returned_subject(part: EmailMessage) -> str:
    """The Subject of the returned original (RFC 3464 2: message/rfc822 or text/rfc822-headers), decoded."""
    if part.get_content_type() in ("message/rfc822", "message/global"):
        inner = part.get_payload(0)
        assert isinstance(inner, EmailMessage)
        return str(inner["Subject"])
    return str(email.message_from_string(part.get_content(), policy=email.policy.default)["Subject"])


def _row_content(gateway: GatewayProcess, queue_id: str) -> bytes | None:
    with closing(sqlite3.connect(gateway.data_dir / "gateway.db")) as db:
        row = db.execute("SELECT content FROM queue_messages WHERE id = ?", (queue_id,)).fetchone()
    return bytes(row[0]) if row is not None and row[0] is not None else None


def _spool_files(gateway: GatewayProcess) -> list[Path]:
    return sorted((gateway.data_dir / "spool" / "queue").glob("*.eml"))


def test_bounce_of_a_sealed_message_quotes_its_headers_and_stays_sealed(tmp_path: Path) -> None:
    closed_port = free_ports(1)[0]           # the other operator does not answer: the message stays queued
    gateway = GatewayProcess(tmp_path / "gw", extra_env={
        "GATEWAY_OUTBOUND_TRANSPORT_MAP": json.dumps([f"autre-operateur.mssante.localhost=127.0.0.1:{closed_port}"])})
    gateway.start()
    try:
        sender = gateway.account("PER")
        queue_id = _submit(gateway, sender)
        held = gateway.cli("queue", "hold", queue_id)
        assert held.returncode == 0, held.stderr
    finally:
        gateway.stop()
    # A small message is kept in its queue row (gateway.queue.spool, "in its row"), sealed as its file would be.
    assert _spool_files(gateway) == []
    sealed = _row_content(gateway, queue_id)
    assert sealed is not None and sealed.startswith(SPOOL_MAGIC)
    for plaintext in (SUBJECT.encode(), BODY_MARKER.encode(), b"Subject:", REMOTE.encode()):
        assert plaintext not in sealed, f"{plaintext!r} in clear in the queue row"

    deleted = gateway.cli("queue", "delete", "--bounce", queue_id)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"{queue_id} deleted, sender notified"

    dsn_files = _spool_files(gateway)
    assert len(dsn_files) == 1 and dsn_files[0].stem != queue_id     # the DSN waits in its own sealed file
    assert _row_content(gateway, queue_id) is None                   # the original's row is gone
    on_disk = dsn_files[0].read_bytes()
    for plaintext in (SUBJECT.encode(), b"Subject:", b"delivery-status", sender["address"].encode(),
                      REMOTE.encode(), b"Final-Recipient"):
        assert plaintext not in on_disk, f"{plaintext!r} in clear in the DSN's spool file"

    gateway.start()                                                  # local delivery takes the DSN to the sender
    try:
        def the_report() -> EmailMessage | None:
            with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=_tls(gateway)) as imap:
                reports = [m for m in read_inbox(imap, sender) if m.get_content_type() == "multipart/report"]
            return reports[0] if reports else None
        report = wait_until(the_report, timeout=120, what="the failure DSN in the sender's INBOX")
    finally:
        gateway.stop()
    raw = report.as_bytes()
    status = next(part for part in report.walk() if part.get_content_type() == "message/delivery-status")
    assert re.search(rf"Final-Recipient: rfc822;\s*{re.escape(REMOTE)}", status.as_string(), re.IGNORECASE)
    assert b"Status: 5.3.0" in raw and b"deleted from the queue by the administrator" in raw
    returned = next(part for part in report.walk()
                    if part.get_content_type() in ("message/rfc822", "text/rfc822-headers", "message/global",
                                                   "message/global-headers"))
    quoted = returned.as_string()
    # The original's header section in clear (the Subject is RFC 2047-encoded, so compare decoded).
    assert f"To: {REMOTE}" in quoted and "Subject:" in quoted
    assert _returned_subject(returned) == SUBJECT

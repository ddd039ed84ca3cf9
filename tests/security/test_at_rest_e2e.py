"""Encryption at rest, end to end: a message delivered through the real gateway leaves no plaintext
anywhere under the data directory (database and its WAL, blobs, spool, keys...), while IMAP still
reads it, searches its subject and shows its envelope."""

from __future__ import annotations

import base64
import email.policy
import imaplib
import secrets
import smtplib
import sqlite3
import ssl
import time
from email.message import EmailMessage
from pathlib import Path

from tests.harness import GatewayProcess

PATIENCE = 60.0  # a bound on a hang, not a timing assertion


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _known_message(sender: str, recipient: str, marker: str) -> tuple[EmailMessage, dict[str, bytes]]:
    subject = f"Compte rendu operatoire {marker}-SUBJECT"
    body = f"Patient presente une fracture du scaphoide {marker}-BODY. Controle a J15."
    attachment = b"%PDF-1.4\n" + f"{marker}-ATTACHMENT radiographie du poignet gauche ".encode() * 40
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = f"<{marker}@demo.test>"
    message.set_content(body)
    message.add_attachment(attachment, maintype="application", subtype="pdf", filename="cr.pdf")
    encoded = base64.b64encode(attachment)
    needles = {
        "subject": f"{marker}-SUBJECT".encode(),
        "body": f"{marker}-BODY".encode(),
        "attachment bytes": f"{marker}-ATTACHMENT".encode(),
        "attachment base64": encoded[:60],       # the first base64 line as the message carries it
    }
    return message, needles


def _submit(gateway: GatewayProcess, account: dict[str, str], message: EmailMessage, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=30) as smtp:
        smtp.starttls(context=_tls(gateway))
        smtp.login(account["address"], account["password"])
        smtp.send_message(message, from_addr=account["address"], to_addrs=[recipient])


def _imap(gateway: GatewayProcess, account: dict[str, str]) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", gateway.ports["imap_port"], timeout=30)
    imap.starttls(ssl_context=_tls(gateway))
    imap.login(account["address"], account["password"])
    return imap


def _wait_for_subject(gateway: GatewayProcess, account: dict[str, str], marker: str) -> bytes:
    """Poll IMAP until the message is there; SEARCH SUBJECT works on the sealed columns."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        imap = _imap(gateway, account)
        try:
            if imap.select("INBOX", readonly=True)[0] == "OK":
                _, found = imap.uid("SEARCH", "SUBJECT", f"{marker}-SUBJECT")
                if found[0]:
                    _, data = imap.uid("FETCH", found[0].split()[0], "(ENVELOPE BODY.PEEK[])")
                    return b"".join(part[0] + part[1] if isinstance(part, tuple) else part for part in data)
        finally:
            imap.logout()
        time.sleep(0.2)
    raise AssertionError(f"message {marker} never arrived:\n{gateway.log_text()[-3000:]}")


def _plaintext_hits(root: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for name, needle in needles.items():
            if needle in data or needle.lower() in data.lower():
                hits.append(f"{name} in {path.relative_to(root)}")
    return hits


def test_delivered_message_leaves_no_plaintext_on_disk(gateway: GatewayProcess) -> None:
    sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
    marker = "MK" + secrets.token_hex(8).upper()
    message, needles = _known_message(sender["address"], recipient["address"], marker)
    _submit(gateway, sender, message, recipient["address"])

    fetched = _wait_for_subject(gateway, recipient, marker)
    assert needles["subject"] in fetched and needles["body"] in fetched        # readable through IMAP
    assert needles["attachment base64"] in fetched

    # While the gateway runs (SQLite WAL present), then after it stopped (WAL checkpointed).
    assert (gateway.data_dir / "gateway.db-wal").exists()
    live = _plaintext_hits(gateway.data_dir, needles)
    gateway.stop()
    hits = sorted(set(live + _plaintext_hits(gateway.data_dir, needles)))
    outside_database = [hit for hit in hits if not hit.endswith(("gateway.db", "gateway.db-wal"))]
    assert outside_database == [], f"plaintext on disk: {outside_database}"
    in_rows = _plaintext_in_rows(gateway.data_dir / "gateway.db", needles)
    assert in_rows == [], f"plaintext in database rows: {in_rows}"
    assert hits == [], f"plaintext in the database file outside any live row (free pages, WAL): {hits}"


def _plaintext_in_rows(database: Path, needles: dict[str, bytes]) -> list[str]:
    """Every text and binary column of every table, row by row: which hold a needle."""
    hits = []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]
            for values in connection.execute(f'SELECT * FROM "{table}"'):
                for column, value in zip(columns, values):
                    data = value.encode() if isinstance(value, str) else value if isinstance(value, bytes) else b""
                    hits += [f"{name} in {table}.{column}" for name, needle in needles.items() if needle in data]
    return sorted(set(hits))

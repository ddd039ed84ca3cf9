"""A committed local delivery survives a SIGKILL, read back byte for byte over IMAP, its body sealed at rest.

Small bodies are kept sealed in the database (``inline_blobs``), made durable by the delivery's commit
instead of a blob file of their own: what the mailbox shows after a crash is what that commit held."""

from __future__ import annotations

import imaplib
import smtplib
import sqlite3
import ssl
from pathlib import Path

import pytest

from tests.harness import GatewayProcess, wait_until

MESSAGES = 12


def _delivered(gateway: GatewayProcess) -> int:
    with sqlite3.connect(f"file:{gateway.data_dir / 'gateway.db'}?mode=ro", uri=True) as connection:
        return int(connection.execute("SELECT count(*) FROM queue_recipients WHERE state = 'delivered'").fetchone()[0])


def _message(number: int, sender: str, recipient: str) -> bytes:
    return (f"From: {sender}\r\nTo: {recipient}\r\nSubject: durable {number:03d}\r\n"
            f"Message-ID: <durable-{number:03d}@test>\r\n\r\n"
            + f"Compte rendu {number}, adenocarcinome confirme.\r\n" * 40).encode()


@pytest.mark.slow
def test_a_committed_delivery_is_in_the_mailbox_after_sigkill_byte_for_byte(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw")
    gateway.start()
    sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
    sent = {f"<durable-{n:03d}@test>": _message(n, sender["address"], recipient["address"]) for n in range(MESSAGES)}
    try:
        context = ssl.create_default_context(cafile=gateway.ca_file)
        with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["smtp_submissions_port"], context=context,
                              timeout=30) as client:
            client.login(sender["address"], sender["password"])
            for data in sent.values():
                client.sendmail(sender["address"], [recipient["address"]], data)
        wait_until(lambda: _delivered(gateway) >= MESSAGES or None, timeout=120, what="the deliveries committed")
    finally:
        gateway.kill()                       # SIGKILL right after the commits: no clean shutdown, no checkpoint

    with sqlite3.connect(gateway.data_dir / "gateway.db") as connection:      # WAL replayed by this open
        inline = connection.execute("SELECT sealed FROM inline_blobs").fetchall()
    assert len(inline) >= MESSAGES, "the small bodies are kept in the database, not in blob files"
    assert all(b"adenocarcinome" not in bytes(row[0]) for row in inline)      # sealed at rest

    gateway.start()
    try:
        with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=context) as imap:
            imap.login(recipient["address"], recipient["password"])
            imap.select("INBOX", readonly=True)
            _, found = imap.uid("SEARCH", "ALL")
            _, data = imap.uid("FETCH", b",".join(found[0].split()).decode(), "(RFC822.SIZE BODY.PEEK[])")
        bodies = [part[1] for part in data if isinstance(part, tuple)]
        assert len(bodies) == MESSAGES
        for body in bodies:
            message_id = next(line.split(b":", 1)[1].strip().decode() for line in body.split(b"\r\n")
                              if line.lower().startswith(b"message-id:"))
            # What was sent, after the trace fields delivery prepends (Return-Path, Received, ...).
            assert body.endswith(sent.pop(message_id))
        assert sent == {}
    finally:
        gateway.stop()

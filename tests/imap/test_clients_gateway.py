"""The whole gateway (``gateway init --demo`` + ``gateway serve``): a message submitted over SMTP
reaches the recipient's IMAP session, which is IDLE, with the certificate verified for ``localhost``."""

from __future__ import annotations

import email.utils
import imaplib
import smtplib
import ssl
import time

from tests.harness import GatewayProcess


def _context(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)     # host name checked: "localhost"


def test_submitted_mail_wakes_the_recipients_idle(gateway: GatewayProcess) -> None:
    doctor, pharmacist = gateway.account("PER", 0), gateway.account("PER", 1)
    reader = imaplib.IMAP4("localhost", gateway.ports["imap_port"], timeout=30)
    reader.starttls(_context(gateway))
    reader.login(pharmacist["address"], pharmacist["password"])
    reader.select("INBOX")
    tag = reader._new_tag().decode()
    reader.send(f"{tag} IDLE\r\n".encode())
    assert reader.readline().startswith(b"+ ")

    subject = f"Avis pharmaceutique {time.time_ns()}"
    message = (f"From: {doctor['address']}\r\nTo: {pharmacist['address']}\r\nSubject: {subject}\r\n"
               f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n\r\nBonjour.\r\n")
    started = time.monotonic()
    with smtplib.SMTP("localhost", gateway.ports["smtp_submission_port"], timeout=30) as smtp:
        smtp.starttls(context=_context(gateway))
        smtp.login(doctor["address"], doctor["password"])
        smtp.sendmail(doctor["address"], [pharmacist["address"]], message.encode())
    line = reader.readline()
    latency = time.monotonic() - started
    assert line.rstrip() == b"* 1 EXISTS", line
    print(f"submission to IDLE wake-up: {latency * 1000:.0f} ms")
    reader.send(b"DONE\r\n")
    while not reader.readline().startswith(tag.encode()):
        pass
    _, data = reader.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    fetched = data[0]
    assert isinstance(fetched, tuple) and subject.encode() in fetched[1]
    reader.logout()


def test_imaps_with_a_verified_certificate(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER", 0)
    client = imaplib.IMAP4_SSL("localhost", gateway.ports["imaps_port"], ssl_context=_context(gateway), timeout=30)
    client.login(doctor["address"], doctor["password"])
    _, folders = client.list()
    names = b"\n".join(folder for folder in folders if isinstance(folder, bytes))
    assert b"\\Sent" in names and b"\\Trash" in names and b"Shared/secretariat.cardiologie@" in names
    client.logout()

"""The attacker's side of the three SMTP doors of a running ``gateway serve``: raw sockets, one
transcript per connection, and the IMAP view of what was really delivered.

A ``doors_gateway`` is the demo directory plus one trusted peer operator whose MX certificate
(``peer-mx``, named ``mx.peer.mssante.localhost``) is issued under the test PKI, so the relay door
can be reached exactly as another operator reaches it.
"""

from __future__ import annotations

import base64
import imaplib
import json
import ssl
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from tests.harness import GatewayProcess, read_inbox
from tests.smtp.conftest import Transcript

OURS = "demo.mssante.localhost"
PEER = "peer.mssante.localhost"
DOORS = ("smtp_submission_port", "smtp_submissions_port", "smtp_relay_port")


def doors_gateway(data_dir: Path, extra_env: dict[str, str] | None = None) -> GatewayProcess:
    """The peer's mail is routed back to our own relay door (transport map), which refuses a sender of our
    domain with a permanent 550: a way to get a failure DSN at once, without a second operator."""
    gateway = GatewayProcess(data_dir)
    gateway.init_demo()
    gateway.extra_env.update({
        "GATEWAY_OUTBOUND_TRANSPORT_MAP": json.dumps([f"{PEER}=127.0.0.1:{gateway.ports['smtp_relay_port']}"]),
        "GATEWAY_OUTBOUND_POLL_SECONDS": "0.5",
    })
    gateway.extra_env.update(extra_env or {})
    gateway.cli("domain", "trust", "add", PEER, "--operator", "Peer operator", check=True)
    gateway.cli("certs", "issue", "server", "--name", "peer-mx", "--dns", f"mx.{PEER}", check=True)
    gateway.start()
    return gateway


def tls_client(gw: GatewayProcess, cert: str | None = None) -> ssl.SSLContext:
    """A client context trusting the gateway's CA; ``cert``: an issued certificate name (``peer-mx``)."""
    context = ssl.create_default_context(cafile=gw.ca_file)
    if cert:
        issued = gw.data_dir / "pki" / "issued"
        context.load_cert_chain(issued / f"{cert}.chain.pem", issued / f"{cert}.key")
    return context


def open_door(gw: GatewayProcess, door: str, *, cert: str | None = None, ehlo: str = "probe.example") -> Transcript:
    """Connected, greeted, EHLO'd and under TLS (STARTTLS, or implicit on submissions)."""
    implicit = tls_client(gw, cert) if door == "smtp_submissions_port" else None
    t = Transcript("127.0.0.1", gw.ports[door], implicit_tls=implicit)
    t.s(r"220 .*")
    t.c(f"EHLO {ehlo}");  t.s(r"250 .*")
    if door != "smtp_submissions_port":
        t.starttls(tls_client(gw, cert))
        t.c(f"EHLO {ehlo}");  t.s(r"250 .*")
    return t


def login(t: Transcript, account: dict[str, Any]) -> None:
    token = base64.b64encode(f"\0{account['address']}\0{account['password']}".encode()).decode()
    t.c(f"AUTH PLAIN {token}");  t.s(r"235 2\.7\.0 .*")


def sender_on(gw: GatewayProcess, door: str) -> tuple[str, str | None]:
    """The envelope sender a legitimate client uses on ``door``, and the peer certificate it needs."""
    if door == "smtp_relay_port":
        return f"dr.martin@{PEER}", "peer-mx"
    return gw.account("PER", 0)["address"], None


def start_transaction(gw: GatewayProcess, door: str, recipient: str) -> Transcript:
    """An accepted MAIL and RCPT on ``door`` as a legitimate client, ready for DATA."""
    sender, cert = sender_on(gw, door)
    t = open_door(gw, door, cert=cert)
    if door != "smtp_relay_port":
        login(t, gw.account("PER", 0))
    t.c(f"MAIL FROM:<{sender}>");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<{recipient}>");  t.s(r"250 2\.1\.5 .*")
    return t


def inbox(gw: GatewayProcess, account: dict[str, Any]) -> list[EmailMessage]:
    """Every message in the account's INBOX, read over IMAPS as a mail client would."""
    with imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps_port"], ssl_context=tls_client(gw), timeout=30) as imap:
        return read_inbox(imap, account)


def wait_for_subject(gw: GatewayProcess, account: dict[str, Any], subject: str, timeout: float = 30.0) -> EmailMessage:
    deadline = time.monotonic() + timeout
    while True:
        messages = inbox(gw, account)
        found = [m for m in messages if m["Subject"] == subject]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{subject!r} not delivered to {account['address']} in {timeout}s; "
                                 f"there: {[m['Subject'] for m in messages]}")
        time.sleep(0.2)


def settle(gw: GatewayProcess, timeout: float = 30.0) -> None:
    """Wait until the gateway's queue holds nothing pending for local delivery (what was accepted is delivered)."""
    deadline = time.monotonic() + timeout
    while json.loads(gw.cli("queue", "list", "--json", "--state", "pending", check=True).stdout):
        if time.monotonic() > deadline:
            raise AssertionError("local deliveries still pending")
        time.sleep(0.2)

"""SIGTERM through the real ``gateway serve``: it ends (bounded), a DATA in flight gets its 250, IMAP clients
hear BYE, and a load interrupted by SIGTERM loses, duplicates and half-writes nothing it acknowledged.

What this guards: after a load of submissions, a SIGTERM logged "gateway stopping" and the process then waited
for ever in asyncio's cancellation of its remaining tasks (aiosqlite's close() stranded by SQLAlchemy's
terminate, see tests/storage/test_sqlite_close.py).
"""

from __future__ import annotations

import base64
import imaplib
import json
import re
import signal
import smtplib
import socket
import ssl
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GatewayProcess, wait_until

UNLIMITED = {"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0", "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0"}


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _exited(gateway: GatewayProcess) -> int | None:
    assert gateway.process is not None
    return gateway.process.poll()


def _sigterm_and_wait_for_exit(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    try:
        return wait_until(lambda: _exited(gateway), timeout=60, what="gateway serve exited after SIGTERM")
    except AssertionError:
        gateway.kill()
        raise AssertionError(f"gateway serve still running 60 s after SIGTERM:\n{gateway.log_text()}") from None


def _body(marker: str) -> str:
    return "".join(f"{marker} line {n}: Lorem ipsum dolor sit amet, consectetur.\r\n" for n in range(60))


def _delivered(gateway: GatewayProcess, accounts: list[dict[str, Any]]) -> Counter[str]:
    """marker -> copies found whose body is whole (a torn or half-written one does not count)."""
    counts: Counter[str] = Counter()
    for account in accounts:
        with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=_tls(gateway)) as imap:
            imap.login(account["address"], account["password"])
            if imap.select("INBOX", readonly=True)[0] != "OK":
                continue
            _, found = imap.uid("SEARCH", "ALL")
            for uid in found[0].split():
                _, data = imap.uid("FETCH", uid.decode(), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT])")
                parts = [part[1] for part in data if isinstance(part, tuple)]
                match = re.search(rb"term-test-\d{4}", parts[0])
                if match:
                    marker = match.group(0).decode()
                    whole = parts[1].rstrip(b"\r\n") == _body(marker).encode().rstrip(b"\r\n")
                    counts[marker if whole else f"torn:{marker}"] += 1
    return counts


@pytest.mark.slow
def test_sigterm_during_load_exits_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    total, workers = 400, 16
    gateway = GatewayProcess(tmp_path / "gw", extra_env=UNLIMITED)
    gateway.start()
    senders = [gateway.account("PER", n) for n in range(3)]
    recipients = [gateway.account("PER", (n + 1) % 3) for n in range(3)]
    acknowledged: set[str] = set()
    lock = threading.Lock()
    stop_at = total // 3

    def worker(number: int) -> None:
        sender, recipient = senders[number % 3], recipients[number % 3]["address"]
        try:
            with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["smtp_submissions_port"], context=_tls(gateway),
                                  timeout=60) as client:
                client.login(sender["address"], sender["password"])
                for index in range(number, total, workers):
                    marker = f"term-test-{index:04d}"
                    data = (f"From: {sender['address']}\r\nTo: {recipient}\r\nSubject: {marker}\r\n"
                            f"Message-ID: <{marker}@test>\r\n\r\n{_body(marker)}").encode()
                    client.sendmail(sender["address"], [recipient], data)
                    with lock:
                        acknowledged.add(marker)
        except (smtplib.SMTPException, OSError):
            return                                       # 421 or closed: the gateway is stopping

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    wait_until(lambda: True if len(acknowledged) >= stop_at else None, timeout=300, what=f"{stop_at} messages accepted")
    assert _sigterm_and_wait_for_exit(gateway) == 0, gateway.log_text()
    for thread in threads:
        thread.join(60)
    after_stop = gateway.log_text().split("gateway stopping", 1)[-1]
    assert "Traceback" not in after_stop, gateway.log_text()
    assert "still running after" not in after_stop, gateway.log_text()   # every task ended by itself

    gateway.start()                                      # the recovery pass delivers what was queued
    try:
        def all_delivered() -> Counter[str] | None:
            counts = _delivered(gateway, recipients)
            return counts if all(counts[m] for m in acknowledged) else None

        counts = wait_until(all_delivered, timeout=180, what="every acknowledged message delivered", interval=1)
        assert not [m for m in counts if m.startswith("torn:")], "a delivered message is not whole"
        assert not [m for m, n in counts.items() if n > 1], "a message was delivered twice"
        assert list((tmp_path / "gw" / "spool" / "incoming").iterdir()) == []
    finally:
        gateway.stop()


def _read_reply(sock: ssl.SSLSocket) -> bytes:
    """One complete SMTP reply (every line up to the one with a space after the code)."""
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("acceptors", [0, 2], ids=["one-process", "acceptor-processes"])
def test_sigterm_lets_a_data_in_flight_finish_and_says_bye_to_imap(tmp_path: Path, acceptors: int) -> None:
    """With smtp.acceptor_processes, the DATA in flight is an acceptor's: the main process stops it first,
    and it finishes the transaction before it ends."""
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"GATEWAY_SMTP_ACCEPTOR_PROCESSES": str(acceptors)})
    gateway.start()
    sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
    imap = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=_tls(gateway))
    imap.login(recipient["address"], recipient["password"])
    raw = socket.create_connection(("127.0.0.1", gateway.ports["smtp_submissions_port"]), timeout=60)
    smtp = _tls(gateway).wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        assert _read_reply(smtp).startswith(b"220")
        credentials = base64.b64encode(f"\0{sender['address']}\0{sender['password']}".encode()).decode()
        for command, expected in ((b"EHLO test", b"250"), (f"AUTH PLAIN {credentials}".encode(), b"235"),
                                  (f"MAIL FROM:<{sender['address']}>".encode(), b"250"),
                                  (f"RCPT TO:<{recipient['address']}>".encode(), b"250"), (b"DATA", b"354")):
            smtp.sendall(command + b"\r\n")
            assert _read_reply(smtp).startswith(expected), command
        marker = "term-test-0001"
        message = (f"From: {sender['address']}\r\nTo: {recipient['address']}\r\nSubject: {marker}\r\n\r\n"
                   f"{_body(marker)}").encode()
        smtp.sendall(message[:200])                      # the DATA is in flight when SIGTERM arrives
        ready = json.loads((gateway.data_dir / "run" / "ready.json").read_text())
        children = [acceptor["pid"] for acceptor in ready.get("acceptors", [])]
        assert len(children) == acceptors

        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        wait_until(lambda: True if "gateway stopping" in gateway.log_text() else None, timeout=60,
                   what="the gateway logged that it is stopping")
        bye = imap.readline()                            # the IMAP client, idle, is told why
        assert bye.startswith(b"* BYE"), bye

        smtp.sendall(message[200:] + b".\r\n")
        accepted = _read_reply(smtp)
        assert accepted.startswith(b"250"), accepted    # RFC 5321 4.1.1.4: the transaction finished
        closing = _read_reply(smtp)
        assert closing.startswith(b"421 4.3.2"), closing  # then the connection is closed (RFC 5321 3.8)
        assert wait_until(lambda: _exited(gateway), timeout=60, what="gateway exited") == 0
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "an acceptor outlived the gateway"
    finally:
        smtp.close()
        gateway.kill()

    gateway.start()
    try:
        counts = wait_until(lambda: _delivered(gateway, [recipient]) or None, timeout=120,
                            what="the message accepted during shutdown delivered", interval=1)
        assert counts == Counter({marker: 1})
    finally:
        gateway.stop()

"""What a 250 promises, checked against the real ``gateway serve`` (made by ``gateway init --demo``)
and read back over IMAP: a 50 MB message streams through without the server holding it in
memory, and a SIGKILL in the middle of a load loses and duplicates nothing acknowledged."""

from __future__ import annotations

import imaplib
import re
import smtplib
import sqlite3
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GatewayProcess

MIB = 1024 * 1024


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _peak_rss_kib(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    status = Path(f"/proc/{gateway.process.pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def _inbox(gateway: GatewayProcess, account: dict[str, Any], items: str) -> list[bytes]:
    """Every INBOX message's ``items`` (a FETCH attribute list), read with imaplib over IMAPS."""
    with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=_tls(gateway)) as imap:
        imap.login(account["address"], account["password"])
        imap.select("INBOX", readonly=True)
        _, found = imap.uid("SEARCH", "ALL")
        uids = found[0].split()
        if not uids:
            return []
        _, data = imap.uid("FETCH", b",".join(uids).decode(), items)
        return [part[1] for part in data if isinstance(part, tuple)]


def _wait_for(condition: Callable[[], bool], seconds: float = 180.0) -> None:
    """A bounded wait for background delivery (a wait, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("not delivered in time")
        time.sleep(0.5)


def test_50_mb_message_streams_without_50_mb_of_memory(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"GATEWAY_SMTP_MAX_MESSAGE_SIZE": str(60 * MIB)})
    gateway.start()
    try:
        doctor, pharmacist = gateway.account("PER", 0), gateway.account("PER", 1)
        with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=120) as client:
            client.starttls(context=_tls(gateway))
            client.login(doctor["address"], doctor["password"])
            author = f"From: <{doctor['address']}>\r\n".encode()
            warm_up = author + b"Subject: warm-up\r\n\r\n" + (b"w" * 76 + b"\r\n") * 2000
            client.sendmail(doctor["address"], [pharmacist["address"]], warm_up)
            before = _peak_rss_kib(gateway)
            line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"   # base64-like
            big = author + b"Subject: fifty megabytes\r\nContent-Type: application/octet-stream\r\n\r\n" + line * (50 * MIB // len(line))
            assert client.mail(doctor["address"], [f"SIZE={len(big)}"])[0] == 250
            assert client.rcpt(pharmacist["address"])[0] == 250
            code, reply = client.data(big)
            assert code == 250, reply
            del big
        after = _peak_rss_kib(gateway)
        growth_mib = (after - before) / 1024
        print(f"gateway serve peak RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB for a 50 MiB message")
        # Buffered whole (aiosmtpd's default), the body alone would add 50 MiB, and more with copies.
        assert growth_mib < 25, f"peak RSS grew by {growth_mib:.1f} MiB while receiving a 50 MiB message"

        _wait_for(lambda: len(_sizes(gateway, pharmacist)) == 1)
        assert _sizes(gateway, pharmacist)[0] > 50 * MIB - 100
    finally:
        gateway.stop()


def _sizes(gateway: GatewayProcess, account: dict[str, Any]) -> list[int]:
    """RFC822.SIZE of each INBOX message whose subject is "fifty megabytes"."""
    with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=_tls(gateway)) as imap:
        imap.login(account["address"], account["password"])
        imap.select("INBOX", readonly=True)
        _, found = imap.uid("SEARCH", "SUBJECT", '"fifty megabytes"')
        sizes = []
        for uid in found[0].split():
            _, data = imap.uid("FETCH", uid.decode(), "(RFC822.SIZE)")
            sizes.append(int(re.search(rb"RFC822\.SIZE (\d+)", data[0]).group(1)))  # type: ignore[arg-type,union-attr]
        return sizes


@pytest.mark.slow
def test_sigkill_during_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    total, workers = 300, 10
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0",
                                                         "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0"})
    gateway.start()
    senders = [gateway.account("PER", n) for n in range(3)]
    recipients = [gateway.account("PER", (n + 1) % 3) for n in range(3)]
    acknowledged: dict[str, str] = {}          # marker -> recipient address
    lock = threading.Lock()
    kill_at = total // 3

    def worker(number: int) -> None:
        sender, recipient = senders[number % 3], recipients[number % 3]["address"]
        try:
            with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["smtp_submissions_port"], context=_tls(gateway),
                                  timeout=30) as client:
                client.login(sender["address"], sender["password"])
                for index in range(number, total, workers):
                    marker = f"kill-test-{index:04d}"
                    data = (f"From: {sender['address']}\r\nTo: {recipient}\r\nSubject: {marker}\r\n"
                            f"Message-ID: <{marker}@test>\r\n\r\n" + "Lorem ipsum dolor sit amet.\r\n" * 100).encode()
                    client.sendmail(sender["address"], [recipient], data)
                    with lock:
                        acknowledged[marker] = recipient
                        if len(acknowledged) == kill_at:
                            gateway.kill()               # SIGKILL: no cleanup, as a crash would leave it
        except (smtplib.SMTPException, OSError):
            return                                       # the gateway died under us: expected

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    gateway.kill()
    assert len(acknowledged) >= kill_at
    # Every message here is small: each was made durable in its queue row (sealed content committed with
    # the rows before its 250), none in a spool file; the restart below delivers them from the rows alone.
    assert list((tmp_path / "gw" / "spool" / "queue").glob("*.eml")) == []

    gateway.start()                                      # restart: the recovery pass runs before the listeners open
    try:
        def delivered() -> Counter[str]:
            counts: Counter[str] = Counter()
            for account in recipients:
                for header in _inbox(gateway, account, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"):
                    match = re.search(rb"kill-test-\d{4}", header)
                    if match:
                        counts[match.group(0).decode()] += 1
            return counts

        _wait_for(lambda: all(delivered()[m] for m in acknowledged))
        counts = delivered()
        duplicated = sorted(m for m, count in counts.items() if count > 1)
        assert not duplicated, f"delivered twice: {duplicated[:10]}"
        assert list((tmp_path / "gw" / "spool" / "incoming").iterdir()) == []
    finally:
        gateway.stop()
    with closing(sqlite3.connect(tmp_path / "gw" / "gateway.db")) as db:   # finished: no content left in a row
        assert db.execute("SELECT count(*) FROM queue_messages WHERE state = 'done' AND content IS NOT NULL"
                          ).fetchone()[0] == 0

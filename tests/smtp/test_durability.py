"""What a 250 promises, checked against a gateway process: a 50 MB message streams through
without the server holding it in memory, and a SIGKILL in the middle of a load loses and
duplicates nothing that was acknowledged."""

from __future__ import annotations

import re
import smtplib
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.smtp.conftest import client_context
from tests.smtp.gateway_thread import GatewayThread
from tests.smtp.server_process import ServerProcess

MIB = 1024 * 1024


def test_50_mb_message_streams_without_50_mb_of_memory(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", overrides={"smtp": {"max_message_size": 60 * MIB}}).start()
    try:
        doctor, pharmacist = server.account("PER", 0), server.account("PER", 1)
        context = client_context(server.ca_file)
        with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=120) as client:
            client.starttls(context=context)
            client.login(doctor["address"], doctor["password"])
            warm_up = b"Subject: warm-up\r\n\r\n" + (b"w" * 76 + b"\r\n") * 2000
            client.sendmail(doctor["address"], [pharmacist["address"]], warm_up)
            before = server.memory_kib("VmHWM")
            line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"   # base64-like
            body = line * (50 * MIB // len(line))
            big = b"Subject: fifty megabytes\r\nContent-Type: application/octet-stream\r\n\r\n" + body
            assert client.mail(doctor["address"], [f"SIZE={len(big)}"])[0] == 250
            assert client.rcpt(pharmacist["address"])[0] == 250
            code, reply = client.data(big)
            assert code == 250, reply
            del big, body
        after = server.memory_kib("VmHWM")
        growth_mib = (after - before) / 1024
        print(f"server peak RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB for a 50 MiB message")
        # Buffered whole (aiosmtpd's default), the body alone would add 50 MiB, and more with copies.
        assert growth_mib < 25, f"peak RSS grew by {growth_mib:.1f} MiB while receiving a 50 MiB message"
    finally:
        server.stop()
    gateway = GatewayThread(tmp_path / "data").start()
    try:
        gateway.wait_delivered()
        sizes = [len(m) for m in gateway.inbox(pharmacist["address"]) if b"Subject: fifty megabytes" in m]
        assert len(sizes) == 1 and sizes[0] > 50 * MIB - 100
    finally:
        gateway.stop()


@pytest.mark.slow
def test_sigkill_during_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    total, workers = 300, 10
    server = ServerProcess(tmp_path / "data", overrides={"smtp": {"messages_per_minute_per_user": 0,
                                                                  "messages_per_minute_per_ip": 0}}).start()
    senders = [server.account("PER", n) for n in range(3)]
    recipients = [server.account("PER", (n + 1) % 3)["address"] for n in range(3)]
    acknowledged: dict[str, str] = {}          # marker -> recipient
    lock = threading.Lock()
    kill_at = total // 3

    def worker(number: int) -> None:
        sender = senders[number % 3]
        recipient = recipients[number % 3]
        try:
            with smtplib.SMTP_SSL("127.0.0.1", server.port("submissions"), context=client_context(server.ca_file),
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
                            server.kill()
        except (smtplib.SMTPException, OSError):
            return                                   # the gateway died under us: expected

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    server.kill()
    assert len(acknowledged) >= kill_at

    gateway = GatewayThread(tmp_path / "data").start()       # restart: the recovery pass runs first
    try:
        gateway.wait_delivered()
        delivered: Counter[str] = Counter()
        for address in set(recipients):
            for raw in gateway.inbox(address):
                match = re.search(rb"Subject: (kill-test-\d{4})", raw)
                if match:
                    delivered[match.group(1).decode()] += 1
        missing = sorted(m for m in acknowledged if delivered[m] == 0)
        duplicated = sorted(m for m, count in delivered.items() if count > 1)
        assert not missing, f"{len(missing)} acknowledged messages lost: {missing[:10]}"
        assert not duplicated, f"delivered twice: {duplicated[:10]}"
        assert list((tmp_path / "data" / "spool" / "incoming").iterdir()) == []
    finally:
        gateway.stop()

"""SMTP acceptor processes (``smtp.acceptor_processes``, gateway.smtp.acceptors) through the real ``gateway serve``:
mail accepted by a child is delivered by the main process (IDLE wakes there), the SMTP limits hold across
processes, back-pressure crosses the channel, a killed child is started again and loses nothing it
acknowledged, children end with their parent, and the audit chain stays whole with both appending.

Which child takes a connection is made certain by stopping the other one (SIGSTOP) while it connects: a
stopped process cannot accept, so the kernel's queue goes to the one that runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import sqlite3
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GatewayProcess, run_cli, wait_until
from tests.ops.test_multinode import Doors, _body, _delivered, _idle_wakes_on_mail_from_another_node, _load, _submit

UNLIMITED = {"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0", "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0"}


def _acceptors(count: int, **env: str) -> dict[str, str]:
    return {"GATEWAY_SMTP_ACCEPTOR_PROCESSES": str(count), **env}


def _acceptor_pids(gateway: GatewayProcess) -> list[int]:
    ready = json.loads((gateway.data_dir / "run" / "ready.json").read_text())
    return [int(acceptor["pid"]) for acceptor in ready.get("acceptors", [])]


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block: it accepts no connection meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _greeting(gateway: GatewayProcess) -> tuple[ssl.SSLSocket, bytes]:
    """A connection to the submissions port (implicit TLS, handshaken by the child that accepted it) and the
    first reply: 220, or 421 when a limit refuses it."""
    raw = socket.create_connection(("127.0.0.1", gateway.ports["smtp_submissions_port"]), timeout=60)
    sock = _tls(gateway).wrap_socket(raw, server_hostname="localhost")
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return sock, reply


def _client(gateway: GatewayProcess) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL("localhost", gateway.ports["smtp_submissions_port"], context=_tls(gateway), timeout=60)


def _message(sender: str, recipient: str, subject: str) -> bytes:
    return f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nBonjour.\r\n".encode()


@pytest.fixture
def two_acceptors(tmp_path: Path) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp_path / "data", extra_env=_acceptors(2, GATEWAY_SMTP_MAX_CONNECTIONS_PER_IP="3",
                                                                      GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER="2",
                                                                      GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP="0"))
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.mark.slow
def test_mail_accepted_by_an_acceptor_wakes_idle_in_the_main_process(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "data", extra_env=_acceptors(2, **UNLIMITED))
    gateway.start()
    try:
        pids = _acceptor_pids(gateway)
        assert gateway.process is not None
        assert len(set(pids)) == 2 and gateway.process.pid not in pids and all(_running(pid) for pid in pids)
        status = json.loads(gateway.cli("status", "--json").stdout)["gateway"]
        assert status["state"] == "serving", status
        assert [(a["pid"], a["alive"]) for a in status["acceptors"]] == [(pid, True) for pid in pids], status
        doors = Doors(smtp=[("localhost", gateway.ports["smtp_submissions_port"])],
                      imaps=[("localhost", gateway.ports["imaps_port"])])
        waited = _idle_wakes_on_mail_from_another_node(doors, doors, _tls(gateway), gateway.account("PER", 0),
                                                       gateway.account("PER", 1), timeout=20)
        print(f"accepted by an acceptor process, IDLE in the main process woken after {waited * 1000:.0f} ms")
        assert "queued " in gateway.log_text()
        gateway.process.send_signal(signal.SIGHUP)      # passed on: each acceptor reloads as its parent does
        log = gateway.data_dir / "serve.log"
        wait_until(lambda: True if log.read_text(errors="replace").count("SIGHUP: reloaded") == 3 else None,
                   timeout=30, what="the main process and both acceptors reloaded")
        assert _acceptor_pids(gateway) == pids and all(_running(pid) for pid in pids)
    finally:
        assert gateway.stop() == 0
    assert not any(_running(pid) for pid in pids)


def test_the_connection_limit_per_ip_holds_across_acceptors(two_acceptors: GatewayProcess) -> None:
    """smtp.max_connections_per_ip = 3: two connections on one child, the third on the other, the fourth
    refused there (that child alone holds one: the main process counts three)."""
    first, second = _acceptor_pids(two_acceptors)
    opened: list[ssl.SSLSocket] = []
    try:
        with _stopped(first):
            for _ in range(2):
                sock, reply = _greeting(two_acceptors)
                opened.append(sock)
                assert reply.startswith(b"220"), reply
        with _stopped(second):
            sock, reply = _greeting(two_acceptors)
            opened.append(sock)
            assert reply.startswith(b"220"), reply
            sock, reply = _greeting(two_acceptors)
            opened.append(sock)
            assert reply.startswith(b"421 4.7.0"), reply
        opened.pop(0).close()                     # a slot of the second child given back, through the channel

        def one_more() -> bool | None:
            with _stopped(second):
                sock, reply = _greeting(two_acceptors)
            sock.close()
            return True if reply.startswith(b"220") else None

        wait_until(one_more, timeout=30, what="a connection accepted once another closed")
    finally:
        for sock in opened:
            sock.close()


def test_the_message_rate_per_user_holds_across_acceptors(two_acceptors: GatewayProcess) -> None:
    """smtp.messages_per_minute_per_user = 2: one message through each child, the third refused (450 4.7.1)."""
    first, second = _acceptor_pids(two_acceptors)
    sender, recipient = two_acceptors.account("PER", 0), two_acceptors.account("PER", 1)
    with _stopped(first):
        on_second = _client(two_acceptors)
    with _stopped(second):
        on_first = _client(two_acceptors)
    with on_first, on_second:
        for client in (on_first, on_second):
            client.login(sender["address"], sender["password"])
        on_first.sendmail(sender["address"], [recipient["address"]], _message(sender["address"], recipient["address"], "1"))
        on_second.sendmail(sender["address"], [recipient["address"]], _message(sender["address"], recipient["address"], "2"))
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            on_first.sendmail(sender["address"], [recipient["address"]],
                              _message(sender["address"], recipient["address"], "3"))
        assert refused.value.smtp_code == 450 and refused.value.smtp_error.startswith(b"4.7.1"), refused.value


@pytest.mark.slow
def test_back_pressure_crosses_to_the_acceptor(tmp_path: Path) -> None:
    """local_backlog_limit = 1: while the main process's one delivery waits (SQLite's write lock held by the
    test), the acceptor's next DATA waits and is answered 451 4.3.2, nothing queued; once delivery goes on,
    the same message is accepted and both reach the mailbox."""
    gateway = GatewayProcess(tmp_path / "data", extra_env=_acceptors(
        1, GATEWAY_SMTP_LOCAL_BACKLOG_LIMIT="1", GATEWAY_SMTP_LOCAL_BACKLOG_WAIT_SECONDS="1",
        GATEWAY_LOG_LEVEL="DEBUG", **UNLIMITED))
    gateway.start()
    assert gateway.process is not None
    main = gateway.process.pid
    sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
    database = gateway.data_dir / "gateway.db"
    lock: sqlite3.Connection | None = None
    try:
        with _client(gateway) as first, _client(gateway) as second:
            for client in (first, second):
                client.login(sender["address"], sender["password"])
                assert client.mail(sender["address"])[0] == 250
                assert client.rcpt(recipient["address"])[0] == 250
            with _stopped(main):                  # the announcement of the first message waits in the channel
                assert first.data(_message(sender["address"], recipient["address"], "avant"))[0] == 250
                lock = sqlite3.connect(database, isolation_level=None, timeout=30)
                lock.execute("BEGIN IMMEDIATE")   # its delivery will wait for this lock (busy_timeout 10 s)
            log = gateway.data_dir / "serve.log"
            wait_until(lambda: True if "backlog is full" in log.read_text(errors="replace") else None, timeout=8,
                       what="the acceptor told that the backlog is full")
            code, reply = second.data(_message(sender["address"], recipient["address"], "pendant"))
            assert code == 451 and reply.startswith(b"4.3.2"), reply
            queued = lock.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
            lock.execute("ROLLBACK")
            lock.close()
            lock = None
            assert queued == 1                    # the refused message was not queued

            def accepted_again() -> bool | None:
                second.rset()
                second.mail(sender["address"])
                second.rcpt(recipient["address"])
                return True if second.data(_message(sender["address"], recipient["address"], "apres"))[0] == 250 else None

            wait_until(accepted_again, timeout=60, what="the message accepted once delivery went on")

        def both_delivered() -> bool | None:
            with sqlite3.connect(database, timeout=30) as conn:
                count = conn.execute("SELECT count(*) FROM queue_recipients WHERE state = 'delivered'").fetchone()[0]
            return True if count == 2 else None

        wait_until(both_delivered, timeout=60, what="both accepted messages delivered")
    finally:
        if lock is not None:
            lock.close()
        gateway.stop()


@pytest.mark.slow
def test_a_killed_acceptor_loses_nothing_acknowledged_and_is_started_again(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "data", extra_env=_acceptors(2, **UNLIMITED))
    gateway.start()
    try:
        tls = _tls(gateway)
        senders = [gateway.account("PER", n) for n in range(3)]
        readers = [gateway.account("PER", (n + 1) % 3) for n in range(3)]
        door = ("localhost", gateway.ports["smtp_submissions_port"])
        acknowledged: set[str] = set()
        failed: list[str] = []
        total = 200
        workers = _load([door], tls, senders, [r["address"] for r in readers], total, 8, acknowledged, failed)
        wait_until(lambda: True if len(acknowledged) >= total // 2 else None, timeout=600, what="half the load")
        victim, survivor = _acceptor_pids(gateway)
        os.kill(victim, signal.SIGKILL)
        for worker in workers:
            worker.join(600)
        assert len(acknowledged) + len(failed) == total
        restarted = wait_until(lambda: next((pid for pid in _acceptor_pids(gateway) if pid not in (victim, survivor)),
                                            None), timeout=60, what="the killed acceptor started again")
        assert "starting it again" in (gateway.data_dir / "serve.log").read_text(errors="replace")
        with _stopped(survivor):                  # served by the new child
            _submit(door, tls, senders[0], readers[0]["address"], "load-9999", _body("load-9999"))
        assert _running(restarted)

        def everything_delivered() -> Any:
            counts = _delivered(("localhost", gateway.ports["imaps_port"]), tls, readers)
            return counts if all(counts[marker] for marker in acknowledged | {"load-9999"}) else None

        counts = wait_until(everything_delivered, timeout=300, what="every acknowledged message delivered", interval=2)
        assert {m: n for m, n in counts.items() if n > 1} == {}, "a message was delivered twice"
        print(f"{len(acknowledged)} acknowledged, {len(failed)} cut by the kill")
    finally:
        gateway.stop()


@pytest.mark.slow
def test_acceptors_end_when_the_main_process_is_killed(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "data", extra_env=_acceptors(2, **UNLIMITED))
    gateway.start()
    pids = _acceptor_pids(gateway)
    gateway.kill()
    wait_until(lambda: True if not any(_running(pid) for pid in pids) else None, timeout=30,
               what="the acceptor processes ended after their parent was killed")
    gateway.start()                               # the ports are free again: nobody holds them
    try:
        sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
        with _client(gateway) as client:
            client.login(sender["address"], sender["password"])
            client.sendmail(sender["address"], [recipient["address"]],
                            _message(sender["address"], recipient["address"], "encore"))
    finally:
        gateway.stop()


@pytest.mark.slow
def test_the_audit_chain_stays_whole_with_acceptors_and_the_main_process_appending(tmp_path: Path) -> None:
    """Failed SMTP sign-ins are audited by the acceptors, failed IMAP sign-ins by the main process, at once."""
    gateway = GatewayProcess(tmp_path / "data", extra_env=_acceptors(2, **UNLIMITED))
    gateway.start()
    try:
        account = gateway.account("PER", 0)

        def smtp_failures(number: int) -> None:
            for _ in range(5):
                with _client(gateway) as client, contextlib.suppress(smtplib.SMTPException):
                    client.login(f"{number}-{account['address']}", "wrong")

        def imap_failures(number: int) -> None:
            import imaplib
            for _ in range(5):
                with imaplib.IMAP4_SSL("localhost", gateway.ports["imaps_port"], ssl_context=_tls(gateway)) as imap, \
                        contextlib.suppress(imaplib.IMAP4.error):
                    imap.login(f"{number}-{account['address']}", "wrong")

        threads = [threading.Thread(target=target, args=(n,)) for n in range(3)
                   for target in (smtp_failures, imap_failures)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        result = gateway.cli("audit", "verify", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] and report["complete"] and report["checked"] >= 2, report
    finally:
        gateway.stop()


@pytest.mark.parametrize("specs, said", [
    (["bogus=5"], "bad --acceptor-socket 'bogus=5': DOOR=FD"),
    (["submission=five"], "bad --acceptor-socket 'submission=five': DOOR=FD"),
    (["submission=7"], "--acceptor-socket missing for submissions, relay"),
])
def test_a_bad_acceptor_socket_is_refused_naming_the_option(tmp_path: Path, specs: list[str], said: str) -> None:
    # The hidden options only ``gateway serve`` passes its children: a wrong one is refused before any
    # descriptor is taken as a socket, and nothing starts.
    args = ["serve", "--acceptor-channel", "9"] + [arg for spec in specs for arg in ("--acceptor-socket", spec)]
    result = run_cli(*args, data_dir=tmp_path / "data")
    assert result.returncode == 1
    assert said in result.stderr and "--acceptor-socket" in result.stderr
    assert not (tmp_path / "data" / "run" / "ready.json").exists()

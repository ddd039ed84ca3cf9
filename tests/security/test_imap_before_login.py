"""IMAP before login, from the attacker's side, against a running ``gateway serve``: one address cannot hold
every socket (its connections not logged in are capped, the rest get ``* BYE`` with the reason, and another
address is served meanwhile), and a stranger's 25 MB literal is refused without being read, so the server's
memory comes back close to where it was once 60 such connections have closed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness import GatewayProcess, wait_until

LITERAL = 25 * 1024 * 1024
PER_IP = 20


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("imap-pre-auth") / "data", extra_env={
        "GATEWAY_IMAP_MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP": str(PER_IP)})
    process.start()
    yield process
    process.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connect(gateway: GatewayProcess, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.ports["imap_port"]), timeout=30,
                                    source_address=(source, 0))
    return sock


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def test_one_address_cannot_starve_another(gateway: GatewayProcess) -> None:
    held: list[socket.socket] = []
    try:
        greetings = []
        for _ in range(PER_IP + 30):
            sock = connect(gateway, "127.0.0.6")
            held.append(sock)
            greetings.append(read_line(sock))
        assert all(line.startswith(b"* OK") for line in greetings[:PER_IP])
        refused = greetings[PER_IP:]
        assert all(line.startswith(b"* BYE Too many connections from 127.0.0.6 not logged in") for line in refused)
        # Another address is greeted, and logs in, while the first still holds its share.
        other = connect(gateway, "127.0.0.7")
        assert read_line(other).startswith(b"* OK")
        other.sendall(b"a1 CAPABILITY\r\n")
        while not (line := read_line(other)).startswith(b"a1 "):
            assert line
        assert line.startswith(b"a1 OK")
        other.close()
        # A connection that ends gives its slot back (once the server has seen it close).
        held.pop(0).close()

        def greeted() -> socket.socket | None:
            sock = connect(gateway, "127.0.0.6")
            if read_line(sock).startswith(b"* OK"):
                return sock
            sock.close()
            return None

        held.append(wait_until(greeted, timeout=30, what="a slot of 127.0.0.6 given back"))
    finally:
        for sock in held:
            sock.close()


def _try_huge_literal(gateway: GatewayProcess, number: int) -> bytes:
    """One stranger: APPEND (whose literal may be 25 MB once logged in) before login, synchronising or
    LITERAL+; returns what the server said."""
    source = f"127.0.1.{number + 1}"
    sock = connect(gateway, source)
    try:
        assert read_line(sock).startswith(b"* OK")
        if number % 2:
            sock.sendall(f"a{number} APPEND INBOX {{{LITERAL}}}\r\n".encode())
            return read_line(sock)            # NO [TOOBIG], never "+": nothing more is sent
        sock.sendall(f"a{number} APPEND INBOX {{{LITERAL}+}}\r\n".encode())
        said = b""
        chunk = b"x" * 65536
        try:
            for _ in range(LITERAL // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass                               # the server closed the connection, as it should
        sock.settimeout(10)
        try:
            while data := sock.recv(65536):
                said += data
        except OSError:
            pass
        return said
    finally:
        sock.close()


def test_huge_literals_before_login_are_refused_unread(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    pid = gateway.process.pid
    _try_huge_literal(gateway, 0)              # warm up code paths before the baseline
    _try_huge_literal(gateway, 1)
    baseline = rss_kib(pid)
    with ThreadPoolExecutor(max_workers=60) as pool:
        answers = list(pool.map(lambda n: _try_huge_literal(gateway, n), range(60)))
    for number, answer in enumerate(answers):
        if number % 2:
            assert answer.startswith(f"a{number} NO [TOOBIG] Literal too large ({LITERAL} octets, limit 8192) "
                                     "before login".encode()), answer
        else:
            assert b"[TOOBIG]" in answer and b"* BYE" in answer, answer[:200]
    # Generous: a 25 MB literal read by even a few of the 60 connections would exceed it many times over.
    def settled() -> int | None:
        after = rss_kib(pid)
        return after if after - baseline < 64 * 1024 else None

    wait_until(settled, timeout=30, what=f"RSS back within 64 MiB of its {baseline} KiB baseline")
    # The server still serves.
    sock = connect(gateway, "127.0.0.8")
    assert read_line(sock).startswith(b"* OK")
    sock.close()

"""Fixtures of the SMTP tests: a real gateway on loopback, and a transcript client."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.smtp.gateway_thread import GatewayThread


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """One gateway per test module (tests that change shared state use their own addresses)."""
    # Many tests of a module fail to sign in on purpose, all from 127.0.0.1: the sign-in limiter is kept out of
    # their way here (its own tests: tests/security/test_auth_limiter.py, test_auth_doors.py, test_auth.py).
    gateway = GatewayThread(tmp_path_factory.mktemp("smtp") / "data",
                            overrides={"auth": {"failures_before_delay": 100, "source_failures_before_delay": 1000}}).start()
    yield gateway
    gateway.stop()


def client_context(ca_file: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if cert:
        context.load_cert_chain(cert, key)
    return context


class Transcript:
    """Talk SMTP line by line: ``c("EHLO x")`` sends, ``s(r"250 .*")`` expects one full reply.

    ``s`` matches the *last* line of a (possibly multi-line) reply against the regex and
    returns every line, so tests read like a transcript: client lines and server lines side by side.
    """

    def __init__(self, host: str, port: int, *, implicit_tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=30)
        self.sock: socket.socket = implicit_tls.wrap_socket(sock, server_hostname="localhost") if implicit_tls else sock
        self.file = self.sock.makefile("rb")

    def c(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode()
        self.sock.sendall(data + b"\r\n")

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        lines = []
        while True:
            line = self.file.readline().decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                raise ConnectionError(f"connection closed; got {lines}")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def s(self, pattern: str) -> list[str]:
        lines = self.reply()
        assert re.fullmatch(pattern, lines[-1]), f"expected {pattern!r}, got {lines}"
        return lines

    def starttls(self, context: ssl.SSLContext) -> None:
        self.c("STARTTLS")
        self.s(r"220 2\.0\.0 .*")
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def transcript(gw: GatewayThread) -> Iterator[type[Transcript]]:
    opened: list[Transcript] = []

    class Tracked(Transcript):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            opened.append(self)

    yield Tracked
    for t in opened:
        t.close()


def logged_in(gw: GatewayThread, address: str, password: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=30)
    client.starttls(context=client_context(gw.ca_file))
    client.login(address, password)
    return client


def message(sender: str, to: str, subject: str = "test", body: str = "Bonjour.\r\n", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{abs(hash((sender, to, subject)))}@test>\r\n"
            f"{extra}\r\n{body}").encode()


def data_path(gw: GatewayThread) -> Path:
    return gw.data_dir

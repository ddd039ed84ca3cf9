"""Behind HAProxy: a running ``gateway serve`` with ``listen.proxy_protocol_from = ["127.0.0.1/32"]``.

HAProxy (Debian's package, tests/haproxy.py) connects to the gateway from 127.0.0.1 with send-proxy-v2 or
send-proxy (v1); clients connect to HAProxy from other loopback addresses (127.0.0.2 and up), which the
gateway must then see everywhere: Received:, logs, audit entries and the sign-in limiter. From the
attacker's side: a direct connection from an untrusted address with a forged PROXY header is not believed,
and one from the proxy's address without a valid header is closed and audited while the gateway keeps serving.
"""

from __future__ import annotations

import base64
import email
import email.policy
import http.client
import imaplib
import json
import shutil
import smtplib
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.ops.proxy_protocol import encode_v1, encode_v2
from tests.harness import GatewayProcess, wait_until
from tests.haproxy import HAPROXY, HAProxy, SourcedIMAP, SourcedIMAPS, frontends_for, smtp_from, trusting

pytestmark = pytest.mark.skipif(shutil.which(HAPROXY) is None and not Path(HAPROXY).exists(),
                                reason="haproxy is not installed (scripts/install-deps.sh)")

PROXY_HOST = "127.0.0.1"                        # HAProxy connects to the gateway from here: trusted
CLIENT = {"v2": "127.0.0.2", "v1": "127.0.0.12"}  # where clients connect to HAProxy from
UNTRUSTED = "127.0.0.3"                         # a direct client that forges a PROXY header
FORGED = "203.0.113.66"                         # the address it claims


@pytest.fixture(scope="module")
def behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("proxied") / "data", extra_env={
        **trusting(PROXY_HOST),
        "GATEWAY_LISTEN_PROXY_PROTOCOL_TIMEOUT_SECONDS": "3",
        "GATEWAY_AUTH_FAILURES_BEFORE_DELAY": "2",
        "GATEWAY_AUTH_FIRST_DELAY_SECONDS": "600",
        "GATEWAY_AUTH_MAX_DELAY_SECONDS": "3600",
        "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "2",
    })
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module", params=["v2", "v1"])
def haproxy(request: pytest.FixtureRequest, behind: GatewayProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    with HAProxy(frontends_for([behind]), directory=tmp_path_factory.mktemp(f"haproxy-{request.param}"),
                 proxy_protocol=request.param, source=PROXY_HOST) as proxy:
        yield proxy


# ------------------------------------------------------------------ clients bound to a source address

def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _smtp(address: tuple[str, int], source: str) -> smtplib.SMTP:
    return smtp_from(address, source)


def _log(gateway: GatewayProcess) -> str:
    """The whole serve.log (GatewayProcess.log_text keeps only its end)."""
    return (gateway.data_dir / "serve.log").read_text(errors="replace")


def _audit(gateway: GatewayProcess, event: str) -> list[dict[str, Any]]:
    listed = gateway.cli("audit", "list", "--event", event, "--limit", "200", "--json", check=True)
    entries: list[dict[str, Any]] = json.loads(listed.stdout)
    return entries


def _inbox_message(gateway: GatewayProcess, imap: imaplib.IMAP4, account: dict[str, Any],
                   subject: str) -> email.message.EmailMessage | None:
    typ, _ = imap.select("INBOX", readonly=True)
    if typ != "OK":
        return None
    typ, data = imap.uid("SEARCH", "SUBJECT", f"\"{subject}\"")
    uids = (data[0] or b"").split()
    if not uids:
        return None
    typ, parts = imap.uid("FETCH", uids[-1].decode(), "(BODY.PEEK[])")
    raw = next(part[1] for part in parts if isinstance(part, tuple))
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


# ------------------------------------------------------------------ the client HAProxy saw, everywhere

def test_smtp_submission_and_imap_see_the_client_haproxy_saw(behind: GatewayProcess, haproxy: HAProxy) -> None:
    client = CLIENT[haproxy.proxy_protocol or ""]
    doctor, pharmacist = behind.account("PER", 0), behind.account("PER", 1)
    subject = f"proxied {haproxy.proxy_protocol} {uuid.uuid4().hex[:8]}"
    with _smtp(haproxy.address("smtp_submission"), client) as smtp:
        smtp.starttls(context=_tls(behind))
        smtp.login(doctor["address"], doctor["password"])
        smtp.sendmail(doctor["address"], [pharmacist["address"]],
                      f"From: {doctor['address']}\r\nTo: {pharmacist['address']}\r\nSubject: {subject}\r\n\r\nhi\r\n")
    with SourcedIMAPS(haproxy.address("imaps"), client, _tls(behind)) as imap:
        imap.login(pharmacist["address"], pharmacist["password"])
        message = wait_until(lambda: _inbox_message(behind, imap, pharmacist, subject), timeout=30,
                             what="the proxied message in the pharmacist's INBOX")
    received = message.get_all("Received")
    assert received and f"[{client}]" in received[0], received       # RFC 5321 4.4: the real client
    assert f"[{PROXY_HOST}]" not in received[0]
    log = _log(behind)
    assert f"connection from {client}:" in log                          # IMAPS session log line


def test_imap_starttls_and_smtps_through_haproxy(behind: GatewayProcess, haproxy: HAProxy) -> None:
    client = CLIENT[haproxy.proxy_protocol or ""]
    account = behind.account("PER", 2)
    with SourcedIMAP(haproxy.address("imap"), client) as imap:
        imap.starttls(ssl_context=_tls(behind))
        imap.login(account["address"], account["password"])
        assert imap.noop()[0] == "OK"
    with smtplib.SMTP_SSL(*haproxy.address("smtp_submissions"), timeout=30, context=_tls(behind),
                          source_address=(client, 0)) as smtps:
        smtps.login(account["address"], account["password"])
        assert smtps.noop()[0] == 250


def test_https_sees_the_client_haproxy_saw(behind: GatewayProcess, haproxy: HAProxy) -> None:
    """A FHIR call with wrong Basic credentials through HAProxy: the audit entry names the client."""
    client = CLIENT[haproxy.proxy_protocol or ""]
    login = f"nobody-{haproxy.proxy_protocol}@demo.mssante.localhost"
    connection = http.client.HTTPSConnection(*haproxy.address("https"), timeout=30, context=_tls(behind),
                                             source_address=(client, 0))
    credentials = base64.b64encode(f"{login}:wrong-password-123".encode()).decode()
    connection.request("GET", "/fhir/DocumentReference?patient.identifier=x",
                       headers={"Authorization": f"Basic {credentials}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 401
    entries = [entry for entry in _audit(behind, "authentication_failed") if entry["actor"]["id"] == login]
    assert [entry["source"] for entry in entries] == [{"door": "fhir", "ip": client}]


def test_the_sign_in_limiter_holds_back_the_client_not_the_proxy(behind: GatewayProcess, haproxy: HAProxy) -> None:
    """Two wrong passwords from one client through HAProxy: that client waits; another client through the same
    proxy signs in at once (were the proxy's address the key, both would wait)."""
    guesser = {"v2": "127.0.0.4", "v1": "127.0.0.14"}[haproxy.proxy_protocol or ""]
    colleague = {"v2": "127.0.0.5", "v1": "127.0.0.15"}[haproxy.proxy_protocol or ""]
    account = behind.account("PER", 2)      # its (login, address) records: each run uses its own addresses
    for _ in range(2):
        with SourcedIMAP(haproxy.address("imap"), guesser) as imap:
            imap.starttls(ssl_context=_tls(behind))
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login(account["address"], "not-the-password")
    with SourcedIMAP(haproxy.address("imap"), guesser) as imap:
        imap.starttls(ssl_context=_tls(behind))
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE|try again"):
            imap.login(account["address"], account["password"])      # the right password, but it must wait
    with SourcedIMAP(haproxy.address("imap"), colleague) as imap:
        imap.starttls(ssl_context=_tls(behind))
        assert imap.login(account["address"], account["password"])[0] == "OK"
    failures = [entry for entry in _audit(behind, "authentication_failed") if entry["actor"]["id"] == account["address"]]
    mine = [entry["outcome"]["reason"] for entry in failures if entry["source"]["ip"] == guesser]
    assert mine.count("wrong credentials") == 2 and any("throttled" in reason for reason in mine), mine
    assert PROXY_HOST not in {entry["source"]["ip"] for entry in failures}


def test_the_smtp_per_address_rate_counts_the_client_not_the_proxy(behind: GatewayProcess, haproxy: HAProxy) -> None:
    """smtp.messages_per_minute_per_ip = 2: a third MAIL from one client through HAProxy waits (450 4.7.1 naming
    that client); another client through the same proxy is not held back."""
    busy = {"v2": "127.0.0.6", "v1": "127.0.0.16"}[haproxy.proxy_protocol or ""]
    other = {"v2": "127.0.0.7", "v1": "127.0.0.17"}[haproxy.proxy_protocol or ""]
    doctor = behind.account("PER", 0)
    with _smtp(haproxy.address("smtp_submission"), busy) as smtp:
        smtp.starttls(context=_tls(behind))
        smtp.login(doctor["address"], doctor["password"])
        for _ in range(2):
            assert smtp.mail(doctor["address"])[0] == 250
            smtp.rset()
        code, text = smtp.mail(doctor["address"])
        assert (code, text.split(b" ")[0]) == (450, b"4.7.1") and busy.encode() in text, text
    with _smtp(haproxy.address("smtp_submission"), other) as smtp:
        smtp.starttls(context=_tls(behind))
        smtp.login(doctor["address"], doctor["password"])
        assert smtp.mail(doctor["address"])[0] == 250


def test_relay_door_greets_through_haproxy(behind: GatewayProcess, haproxy: HAProxy) -> None:
    client = CLIENT[haproxy.proxy_protocol or ""]
    with _smtp(haproxy.address("smtp_relay"), client) as relay:
        code, _ = relay.ehlo("peer.example")
        assert code == 250 and relay.has_extn("starttls")


def test_haproxy_health_checks_are_accepted(behind: GatewayProcess, tmp_path: Path) -> None:
    """``check`` with send-proxy-v2: HAProxy's health checks carry a LOCAL header (the proxy's own connection),
    so every node is seen up on every protocol and nothing is refused."""
    refused_before = _log(behind).count("PROXY header refused")
    with HAProxy(frontends_for([behind]), directory=tmp_path, proxy_protocol="v2", source=PROXY_HOST,
                 check=True, stats_socket=True) as proxy:
        def all_up() -> list[str] | None:
            states = proxy.server_states()
            return states if states and all(state == "UP" for state in states.values()) else None
        wait_until(all_up, timeout=30, what="every server up in HAProxy's health checks")
        assert len(all_up() or {}) == 6
    assert _log(behind).count("PROXY header refused") == refused_before


# ------------------------------------------------------------------ from the attacker's side

def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def test_a_forged_v1_header_from_an_untrusted_address_is_not_believed(behind: GatewayProcess) -> None:
    login = "forger@demo.mssante.localhost"
    with socket.create_connection(("127.0.0.1", behind.ports["smtp_submission_port"]), timeout=30,
                                  source_address=(UNTRUSTED, 0)) as sock:
        sock.sendall(encode_v1((FORGED, 4444), ("127.0.0.1", 25)))
        assert _read_line(sock).startswith(b"220 ")           # greeted as itself: no header was waited for
        reply = _read_line(sock)
        assert reply.startswith(b"500 5.5.1"), reply           # RFC 5321 4.2.4: PROXY is an unknown command
        sock.sendall(b"EHLO forger.example\r\n")
        while not _read_line(sock).startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert _read_line(sock).startswith(b"220 ")
        with _tls(behind).wrap_socket(sock, server_hostname="localhost") as tls:
            token = base64.b64encode(f"\0{login}\0wrong-password-123".encode()).decode()
            tls.sendall(f"EHLO forger.example\r\nAUTH PLAIN {token}\r\n".encode())
            while not _read_line(tls).startswith(b"250 "):
                pass
            assert _read_line(tls).startswith(b"535 ")
    entries = [entry for entry in _audit(behind, "authentication_failed") if entry["actor"]["id"] == login]
    assert [entry["source"]["ip"] for entry in entries] == [UNTRUSTED]
    assert FORGED not in _log(behind)


def test_a_forged_v2_header_from_an_untrusted_address_is_garbage(behind: GatewayProcess) -> None:
    """The v2 signature was made to be refused by line protocols: SMTP reads empty lines, a NUL line and
    QUIT (HAProxy's spec, 2.2 and 7), and closes; nothing in it is believed."""
    with socket.create_connection(("127.0.0.1", behind.ports["smtp_submission_port"]), timeout=30,
                                  source_address=(UNTRUSTED, 0)) as sock:
        sock.sendall(encode_v2((FORGED, 4444), ("127.0.0.1", 25)))
        replies = []
        while line := _read_line(sock):
            replies.append(line[:4])
    assert replies[0] == b"220 " and replies[-1] == b"221 " and set(replies[1:-1]) <= {b"500 ", b"501 "}, replies
    assert FORGED not in _log(behind)


def test_a_forged_header_on_imap_is_a_bad_command(behind: GatewayProcess) -> None:
    login = "imap-forger@demo.mssante.localhost"
    with socket.create_connection(("127.0.0.1", behind.ports["imap_port"]), timeout=30,
                                  source_address=(UNTRUSTED, 0)) as sock:
        sock.sendall(encode_v1((FORGED, 4444), ("127.0.0.1", 143)))
        assert _read_line(sock).startswith(b"* OK")            # greeted: no header was waited for
        assert _read_line(sock).startswith(b"PROXY BAD"), "the line is a command with the tag PROXY"
        sock.sendall(b"a1 STARTTLS\r\n")
        assert _read_line(sock).startswith(b"a1 OK")
        with _tls(behind).wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(f"a2 LOGIN {login} wrong-password-123\r\n".encode())
            assert _read_line(tls).startswith(b"a2 NO")
    entries = [entry for entry in _audit(behind, "authentication_failed") if entry["actor"]["id"] == login]
    assert [entry["source"]["ip"] for entry in entries] == [UNTRUSTED]


def test_the_proxy_address_without_a_header_is_closed_and_audited(behind: GatewayProcess) -> None:
    """From the trusted address: nothing sent (a timeout), a malformed v1 line, plain SMTP: each closed without
    a greeting, each audited with its reason; the listener keeps serving a proper proxied connection."""
    port = behind.ports["smtp_submission_port"]
    attempts = {b"": "no complete header within 3 seconds",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 25\n": "v1: a lone LF",
                b"EHLO sneaky.example\r\n": "not a PROXY protocol header",
                b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x01": "the proxy closed the connection before a complete header"}
    for sent, _ in attempts.items():
        with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(PROXY_HOST, 0)) as sock:
            if sent:
                sock.sendall(sent)
                if sent.endswith(b"\x01"):
                    sock.shutdown(socket.SHUT_WR)
            try:
                assert sock.recv(100) == b""                        # no greeting: closed
            except ConnectionResetError:
                pass
    def refused() -> list[dict[str, Any]] | None:
        entries = [entry for entry in _audit(behind, "door_refused")
                   if entry["outcome"]["reason"].startswith("connection closed: PROXY header refused: ")]
        return entries if len(entries) >= len(attempts) else None
    entries = wait_until(refused, timeout=30, what="the refused headers audited")
    reasons = [entry["outcome"]["reason"] for entry in entries]
    for reason in attempts.values():
        assert any(reason in text for text in reasons), (reason, reasons)
    assert all(entry["source"] == {"door": "smtp", "ip": PROXY_HOST} for entry in entries)
    assert all(entry["details"]["detail"] == "listener smtp_submission" for entry in entries)
    assert "PROXY header refused: v1: a lone LF" in _log(behind)
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(PROXY_HOST, 0)) as sock:
        sock.sendall(encode_v2(("192.0.2.9", 5000), ("127.0.0.1", port)))
        assert _read_line(sock).startswith(b"220 ")                 # still serving


# ------------------------------------------------------------------ the header and the ClientHello in one packet

class _BioTls:
    """A TLS client over a socket whose first bytes (a PROXY header) go out in the same send as the
    ClientHello: the server must hand what follows the header to its TLS layer, not lose it."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, header: bytes) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self._handshake_done()
        self.sock.sendall(header + self.outgoing.read())
        while not self._handshake_done():
            self._pump()

    def _handshake_done(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _pump(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed during TLS")
        self.incoming.write(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def read(self) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._pump()


@pytest.mark.parametrize("listener", ["smtp_submissions_port", "imaps_port", "http_port"])
def test_header_and_client_hello_in_one_segment(behind: GatewayProcess, listener: str) -> None:
    port = behind.ports[listener]
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(PROXY_HOST, 0)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = _BioTls(sock, _tls(behind), encode_v2(("192.0.2.33", 5000), ("127.0.0.1", port)))
        if listener == "http_port":
            tls.send(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert tls.read().startswith(b"HTTP/1.1 ")
        else:
            greeting = tls.read()
            assert greeting.startswith(b"220 ") or greeting.startswith(b"* OK"), greeting
    if listener == "imaps_port":
        wait_until(lambda: True if "connection from 192.0.2.33:5000" in _log(behind) else None, timeout=10,
                   what="the IMAPS log line naming the client of the header")

"""The classic open-relay probes, against a running ``gateway serve``, on every door.

Each probe is a transcript: the client line, then the reply expected from the
server with its enhanced status code (RFC 3463). Every refusal is asserted by
code, and DATA is refused after it (nothing to queue); when the module is done,
no recipient outside our domains may be waiting in the gateway's queue.

Every reply seen by these transcripts is also checked for a well-formed
enhanced status code (``enhanced_code_problems``), so a refusal without one,
or with one of the wrong class, fails the test that saw it.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import GatewayProcess, wait_until
from tests.smtp.conftest import Transcript

OURS = "demo.mssante.localhost"
PEER = "peer.mssante.localhost"          # on the trust list; its MX certificate is issued under our test PKI
OUTSIDE = "other.example"                # on no list
ENHANCED = re.compile(r"^([245])\d\d[ -]([245])\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})(?: |$)")


def enhanced_code_problems(replies: list[tuple[str, list[str]]]) -> list[str]:
    """RFC 3463 2 and RFC 2034 3: every line of a 2yz/4yz/5yz reply carries ``class.subject.detail``, except
    the greeting and the reply to EHLO/HELO (RFC 2034 3 exempts them). The class is the reply's first digit,
    subject and detail are 1-3 digits without leading zeros, the subject one RFC 3463 defines (0-7).
    ``replies`` pairs each reply with the command it answered ("" for the greeting)."""
    problems = []
    for command, lines in replies:
        code = lines[-1][:3]
        if not command or command.split(" ", 1)[0].upper() in ("EHLO", "HELO") or code[0] not in "245":
            continue
        for line in lines:
            match = ENHANCED.match(line)
            if match is None:
                problems.append(f"no enhanced status code: {line!r}")
            elif match.group(2) != code[0] or line[:3] != code:
                problems.append(f"class differs from the reply code: {line!r}")
            elif int(match.group(3)) > 7:
                problems.append(f"undefined subject (RFC 3463 3.1-3.8 define 0-7): {line!r}")
    return problems


def test_enhanced_code_checker_catches_bad_replies() -> None:
    """The checker itself: it must be able to fail."""
    assert enhanced_code_problems([("NOOP", ["250-mx", "250 2.0.0 OK"])]) == ["no enhanced status code: '250-mx'"]
    assert enhanced_code_problems([("RCPT TO:<a@b>", ["550 4.7.1 no"])]) == [
        "class differs from the reply code: '550 4.7.1 no'"]
    assert enhanced_code_problems([("RCPT TO:<a@b>", ["550 5.9.1 no"])]) == [
        "undefined subject (RFC 3463 3.1-3.8 define 0-7): '550 5.9.1 no'"]
    assert enhanced_code_problems([("RCPT TO:<a@b>", ["550 5.01.1 no"])])
    assert enhanced_code_problems([("MAIL FROM:<a@b>", ["530 Must issue STARTTLS"])])
    assert enhanced_code_problems([("", ["220 mx ESMTP"]), ("EHLO x", ["250-mx", "250 HELP"]), ("DATA", ["354 go"]),
                                   ("RCPT TO:<a@b>", ["550 5.7.1 no"])]) == []


class Probe(Transcript):
    """A transcript that keeps every reply, with the command it answered, for the enhanced-code check.
    Pipelined commands (``raw``) are queued and matched to their replies in order (RFC 2920 3.1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.seen: list[tuple[str, list[str]]] = []
        self.pending: list[str] = [""]                  # the greeting answers no command
        super().__init__(*args, **kwargs)

    def c(self, line: str | bytes) -> None:
        self.pending.append(line if isinstance(line, str) else line.decode(errors="replace"))
        super().c(line)

    def raw(self, data: bytes) -> None:
        if not self.pending or self.pending[-1] != "DATA":   # message content after 354 answers nothing
            self.pending += data.decode(errors="replace").split("\r\n")[:-1]
        else:
            self.pending[-1] = "."                          # the end of data gets the final reply
        super().raw(data)

    def reply(self) -> list[str]:
        lines = super().reply()
        command = self.pending.pop(0) if self.pending else "?"
        if lines[-1].startswith("354"):
            self.pending.insert(0, "DATA")                  # the reply after the message content
        self.seen.append((command, lines))
        return lines


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("probes") / "data")
    gateway.init_demo()
    gateway.cli("domain", "trust", "add", PEER, "--operator", "Peer operator", check=True)
    gateway.cli("certs", "issue", "server", "--name", "peer-mx", "--dns", f"mx.{PEER}", check=True)
    gateway.start()
    yield gateway
    try:
        assert_nothing_queued_for_outside(gateway)
    finally:
        gateway.stop()


def assert_nothing_queued_for_outside(gateway: GatewayProcess) -> None:
    """After every probe of the module has run against this gateway: no recipient still in its queue is
    remote (this gateway has no peer to deliver to), and every one is a mailbox of ours."""
    for entry in json.loads(gateway.cli("queue", "list", "--json", check=True).stdout):
        shown = json.loads(gateway.cli("queue", "show", entry["id"], "--json", check=True).stdout)
        for recipient in shown["recipients"]:
            assert recipient["route"] != "remote", shown
            assert recipient["address"].endswith("@" + OURS), shown


@pytest.fixture
def probes(gw: GatewayProcess) -> Iterator[list[Probe]]:
    """The probes a test opens; afterwards every reply they saw must carry a valid enhanced code."""
    opened: list[Probe] = []
    yield opened
    for probe in opened:
        probe.close()
    problems = enhanced_code_problems([seen for probe in opened for seen in probe.seen])
    assert not problems, problems


def _tls(gw: GatewayProcess, cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=gw.ca_file)
    if cert:
        issued = gw.data_dir / "pki" / "issued"
        context.load_cert_chain(issued / f"{cert}.chain.pem", issued / f"{cert}.key")
    return context


def _open(gw: GatewayProcess, probes: list[Probe], door: str, *, cert: str | None = None) -> Probe:
    implicit = _tls(gw, cert) if door == "smtp_submissions_port" else None
    t = Probe("127.0.0.1", gw.ports[door], implicit_tls=implicit)
    probes.append(t)
    t.s(r"220 .*")
    t.c("EHLO probe.example");  lines = t.s(r"250 .*")
    if door != "smtp_submissions_port":
        assert "250-STARTTLS" in lines
        t.starttls(_tls(gw, cert))
        t.c("EHLO probe.example");  t.s(r"250 .*")
    return t


def _login(t: Probe, account: dict[str, Any]) -> None:
    import base64
    token = base64.b64encode(f"\0{account['address']}\0{account['password']}".encode()).decode()
    t.c(f"AUTH PLAIN {token}");  t.s(r"235 2\.7\.0 .*")


def _no_data(t: Probe) -> None:
    """No recipient was accepted: DATA is refused, so nothing can be queued."""
    t.c("DATA");  t.s(r"(503 5\.5\.1|554 5\.5\.1) .*")
    t.c("RSET");  t.s(r"250 2\.0\.0 .*")


# The address tricks, as RCPT TO, with the reply each must get (the same on every door).
TRICKS = [
    pytest.param(f"<claire.medecin%{OUTSIDE}@{OURS}>", r"550 5\.7\.1 Percent-hack .*", id="percent-hack"),
    pytest.param(f"<someone%{OUTSIDE}@{OURS}>", r"550 5\.7\.1 Percent-hack .*", id="percent-hack-unknown-user"),
    pytest.param(f'<"someone@{OUTSIDE}"@{OURS}>', r"553 5\.1\.3 Quoted local parts .*", id="quoted-local-part"),
    pytest.param(f"<@{OURS}:someone@{OUTSIDE}>", r"550 5\.7\.1 Source routes .*", id="source-route"),
    pytest.param(f"<@{OURS},@mx.{OURS}:someone@{OUTSIDE}>", r"550 5\.7\.1 Source routes .*", id="source-route-two-hops"),
    pytest.param(f"<{OUTSIDE}!someone@{OURS}>", r"550 5\.7\.1 Bang-path .*", id="bang-path"),
    pytest.param(f"<someone@{OUTSIDE}>", rf"550 5\.7\.1 Domain {re.escape(OUTSIDE)} is not in the MSSanté trust space",
                 id="unlisted-domain"),
    pytest.param(f"<someone@{OURS}.{OUTSIDE}>", r"550 5\.7\.1 Domain .* is not in the MSSanté trust space",
                 id="our-name-as-prefix"),
    pytest.param("<someone@[127.0.0.1]>", r"550 5\.7\.1 Domain .* is not in the MSSanté trust space", id="address-literal"),
    pytest.param(f"<someone@{OUTSIDE}.>", r"(550 5\.7\.1|553 5\.1\.3|501 5\.5\.[24]) .*", id="trailing-dot"),
]


@pytest.mark.parametrize(("rcpt", "expected"), TRICKS)
def test_authenticated_submission_refuses_relay_tricks(gw: GatewayProcess, probes: list[Probe], rcpt: str,
                                                       expected: str) -> None:
    claire = gw.account("PER", 0)
    t = _open(gw, probes, "smtp_submission_port")
    _login(t, claire)
    t.c(f"MAIL FROM:<{claire['address']}>");   t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:{rcpt}");                     t.s(expected)
    _no_data(t)


@pytest.mark.parametrize(("rcpt", "expected"), TRICKS)
def test_relay_door_refuses_relay_tricks(gw: GatewayProcess, probes: list[Probe], rcpt: str, expected: str) -> None:
    t = _open(gw, probes, "smtp_relay_port", cert="peer-mx")
    t.c(f"MAIL FROM:<dr.martin@{PEER}>");       t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:{rcpt}");                     t.s(expected)
    _no_data(t)


def test_relay_door_is_no_relay_between_trusted_operators(gw: GatewayProcess, probes: list[Probe]) -> None:
    """A trusted peer may write to our mailboxes, not through us to another trusted domain (or its own)."""
    gw.cli("domain", "trust", "add", "third.mssante.localhost", "--operator", "Third", check=True)
    t = _open(gw, probes, "smtp_relay_port", cert="peer-mx")
    t.c(f"MAIL FROM:<dr.martin@{PEER}>");                  t.s(r"250 2\.1\.0 .*")
    t.c("RCPT TO:<dr.durand@third.mssante.localhost>")
    t.s(r"554 5\.7\.1 Relay access denied: dr\.durand@third\.mssante\.localhost is not hosted here")
    t.c(f"RCPT TO:<dr.back@{PEER}>")
    t.s(rf"554 5\.7\.1 Relay access denied: dr\.back@{re.escape(PEER)} is not hosted here")
    _no_data(t)


@pytest.mark.parametrize(("sender", "expected"), [
    pytest.param(f"<someone@{OUTSIDE}>", rf"550 5\.7\.1 Domain {re.escape(OUTSIDE)} is not in the MSSanté trust space",
                 id="untrusted-sender-domain"),
    pytest.param(f"<claire.medecin@{OURS}>", r"550 5\.7\.1 Domain .* is hosted here: submit on the submission port",
                 id="our-own-domain"),
    pytest.param("<dr.durand@third.mssante.localhost>",
                 r"550 5\.7\.1 (Client certificate \(mx\.peer\.mssante\.localhost\) does not speak for domain .*"
                 r"|Domain third\.mssante\.localhost is not in the MSSanté trust space)",
                 id="trusted-domain-the-certificate-does-not-speak-for"),
    pytest.param(f"<dr.martin%{OUTSIDE}@{PEER}>", r"550 5\.7\.1 Percent-hack .*", id="percent-hack-sender"),
    pytest.param(f"<@{PEER}:dr.martin@{OUTSIDE}>", r"550 5\.7\.1 Source routes .*", id="source-route-sender"),
])
def test_relay_door_refuses_senders(gw: GatewayProcess, probes: list[Probe], sender: str, expected: str) -> None:
    t = _open(gw, probes, "smtp_relay_port", cert="peer-mx")
    t.c(f"MAIL FROM:{sender}");  t.s(expected)
    t.c(f"RCPT TO:<claire.medecin@{OURS}>");  t.s(r"503 5\.5\.1 .*")
    _no_data(t)


@pytest.mark.parametrize("door", ["smtp_submission_port", "smtp_submissions_port"])
def test_unauthenticated_submission_is_refused(gw: GatewayProcess, probes: list[Probe], door: str) -> None:
    t = _open(gw, probes, door)
    t.c(f"MAIL FROM:<claire.medecin@{OURS}>");   t.s(r"530 5\.7\.0 Authentication required")
    t.c(f"RCPT TO:<someone@{OUTSIDE}>");         t.s(r"530 5\.7\.0 Authentication required")
    t.c(f"RCPT TO:<marc.pharmacien@{OURS}>");    t.s(r"530 5\.7\.0 Authentication required")
    t.c("DATA");                                 t.s(r"530 5\.7\.0 Authentication required")


def test_submission_before_tls_is_refused(gw: GatewayProcess, probes: list[Probe]) -> None:
    t = Probe("127.0.0.1", gw.ports["smtp_submission_port"])
    probes.append(t)
    t.s(r"220 .*")
    t.c("EHLO probe.example");                   lines = t.s(r"250 .*")
    assert not any("AUTH" in line for line in lines)          # RFC 4954 4: no AUTH offered before TLS
    t.c("AUTH PLAIN AGNsYWlyZQBzZWNyZXQ=");      t.s(r"530 5\.7\.0 Must issue a STARTTLS command first")
    t.c(f"MAIL FROM:<claire.medecin@{OURS}>");   t.s(r"530 5\.7\.0 Must issue a STARTTLS command first")
    t.c(f"RCPT TO:<someone@{OUTSIDE}>");         t.s(r"530 5\.7\.0 Must issue a STARTTLS command first")


@pytest.mark.parametrize(("sender", "expected"), [
    pytest.param(f"<marc.pharmacien@{OURS}>",
                 rf"553 5\.7\.1 Sender address marc\.pharmacien@{re.escape(OURS)} is not owned by or delegated to .*",
                 id="another-local-mailbox"),
    pytest.param(f"<dr.martin@{PEER}>",
                 rf"553 5\.7\.1 Sender address dr\.martin@{re.escape(PEER)} is not owned by or delegated to .*",
                 id="a-mailbox-of-another-operator"),
    pytest.param(f"<someone@{OUTSIDE}>", r"553 5\.7\.1 Sender address .* is not owned by or delegated to .*",
                 id="an-outside-address"),
    pytest.param(f"<claire.medecin%{OUTSIDE}@{OURS}>", r"550 5\.7\.1 Percent-hack .*", id="percent-hack-of-own-address"),
    pytest.param(f'<"claire.medecin"@{OURS}>', r"553 5\.1\.3 Quoted local parts .*", id="quoted-own-address"),
    pytest.param("<>", r"553 5\.7\.1 An authenticated user cannot send with a null reverse-path", id="null-sender"),
])
def test_authenticated_user_cannot_spoof_a_sender(gw: GatewayProcess, probes: list[Probe], sender: str,
                                                  expected: str) -> None:
    claire = gw.account("PER", 0)
    t = _open(gw, probes, "smtp_submission_port")
    _login(t, claire)
    t.c(f"MAIL FROM:{sender}");                  t.s(expected)
    t.c(f"RCPT TO:<marc.pharmacien@{OURS}>");    t.s(r"503 5\.5\.1 .*")
    _no_data(t)


def test_pipelined_mixture_delivers_only_to_our_mailbox(gw: GatewayProcess, probes: list[Probe]) -> None:
    """PIPELINING (RFC 2920): tricks sent in one burst with one good recipient; only that one is kept."""
    claire, marc = gw.account("PER", 0), gw.account("PER", 1)
    t = _open(gw, probes, "smtp_submission_port")
    _login(t, claire)
    t.raw((f"MAIL FROM:<{claire['address']}>\r\n"
           f"RCPT TO:<someone%{OUTSIDE}@{OURS}>\r\n"
           f"RCPT TO:<{OUTSIDE}!someone@{OURS}>\r\n"
           f"RCPT TO:<{marc['address']}>\r\n"
           f"RCPT TO:<someone@{OUTSIDE}>\r\n"
           "DATA\r\n").encode())
    t.s(r"250 2\.1\.0 .*")
    t.s(r"550 5\.7\.1 Percent-hack .*")
    t.s(r"550 5\.7\.1 Bang-path .*")
    t.s(r"250 2\.1\.5 .*")
    t.s(r"550 5\.7\.1 Domain .* is not in the MSSanté trust space")
    t.s(r"354 .*")
    t.raw(f"From: {claire['address']}\r\nTo: {marc['address']}\r\nSubject: pipelined probe\r\n\r\nok\r\n.\r\n".encode())
    t.s(r"250 2\.0\.0 .*")
    t.c("QUIT");  t.s(r"221 2\.0\.0 .*")


def test_null_sender_with_a_mailbox_certificate_gets_a_precise_refusal(gw: GatewayProcess, probes: list[Probe]) -> None:
    """A bounce (``MAIL FROM:<>``, RFC 5321 4.5.5) is legal on the relay door from a trusted operator's
    MX; a mailbox (application) certificate of our own PKI names an address, not a mail server: refused
    by name, never ``451 4.3.0`` from an error inside."""
    app = gw.account("APP")
    issued = gw.data_dir / "pki" / "issued"
    assert Path(app["client_certificate"]).parent == issued
    t = _open(gw, probes, "smtp_relay_port", cert=Path(app["client_certificate"]).name.removesuffix(".pem"))
    t.c("MAIL FROM:<>")
    t.s(rf"550 5\.7\.1 Client certificate \({re.escape(app['address'])}\) names no mail server of a trusted "
        r"operator: .*")
    t.c(f"MAIL FROM:<dr.martin@{PEER}>")
    t.s(rf"550 5\.7\.1 Client certificate \({re.escape(app['address'])}\) does not speak for domain {re.escape(PEER)}")
    t.c("NOOP");  t.s(r"250 2\.0\.0 OK")
    assert "Traceback" not in gw.log_text() and "AddressError" not in gw.log_text()


def test_peer_without_a_client_certificate_is_told_why(gw: GatewayProcess, probes: list[Probe]) -> None:
    """Issue 11 item 10: a peer whose MTA presents no certificate gets a reply naming the requirement
    (RFC 3207 4.1, RFC 3463 X.7.0), then the connection is closed; before, it saw a silent close."""
    t = Probe("127.0.0.1", gw.ports["smtp_relay_port"])
    probes.append(t)
    t.s(r"220 .*")
    t.c(f"EHLO mx.{PEER}");  t.s(r"250 .*")
    t.starttls(_tls(gw))                                  # the handshake succeeds without a certificate...
    t.c(f"EHLO mx.{PEER}")                                # ...and the first command is answered, then closed
    t.s(r"530 5\.7\.0 Client certificate required: this relay door accepts operators whose certificate "
        r"chains to the trust anchors.*")
    assert t.closed()


def _untrusted_client_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate no trust anchor vouches for, as an outsider would present."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.outsider.example")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "outsider.pem", directory / "outsider.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("door", ["smtp_relay_port", "smtp_submissions_port"])
def test_refused_tls_handshake_is_one_log_line(gw: GatewayProcess, tmp_path: Path, door: str) -> None:
    """Item 13: a handshake refused (a certificate no anchor vouches for) is logged on one line at INFO or
    WARNING naming the peer and the reason, without a traceback or an ERROR; the door keeps serving."""
    import socket

    before = len((gw.data_dir / "serve.log").read_bytes())
    context = _tls(gw)
    context.load_cert_chain(*_untrusted_client_certificate(tmp_path))
    sock = socket.create_connection(("127.0.0.1", gw.ports[door]), timeout=30)
    try:
        if door == "smtp_relay_port":
            sock.recv(1024)
            sock.sendall(b"EHLO outsider.example\r\n")
            reply = b""
            while not re.search(rb"(^|\r\n)250 [^\r\n]*\r\n$", reply):   # RFC 5321 4.2.1: "250 " ends it
                chunk = sock.recv(4096)
                assert chunk, reply
                reply += chunk
            sock.sendall(b"STARTTLS\r\n");  assert sock.recv(1024).startswith(b"220 2.0.0")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls = context.wrap_socket(sock, server_hostname="localhost")
            tls.sendall(b"EHLO outsider.example\r\n")
            if not tls.recv(1024):
                raise ConnectionError("closed by the server")
    finally:
        sock.close()
    def logged() -> str | None:
        new = (gw.data_dir / "serve.log").read_bytes()[before:].decode(errors="replace")
        return new if "TLS handshake" in new else None

    new = wait_until(logged, timeout=10, what="the refused handshake logged")
    lines = [line for line in new.splitlines() if "TLS handshake" in line]
    assert len(lines) == 1, new
    assert re.search(r" (INFO|WARNING) gateway\.smtp .*127\.0\.0\.1.*TLS handshake refused: .*certificate", lines[0]), lines
    assert "Traceback" not in new and " ERROR " not in new, new
    t = Transcript("127.0.0.1", gw.ports["smtp_relay_port"])      # still serving
    t.s(r"220 .*")
    t.close()

"""Protocol transcripts against a real gateway: EHLO, STARTTLS, the TLS and AUTH gates,
parameters, limits. Client lines (c) and the server's expected reply (s) side by side."""

from __future__ import annotations

import base64

import pytest

from tests.smtp.conftest import Transcript, client_context
from tests.smtp.gateway_thread import GatewayThread


def _ehlo_keywords(lines: list[str]) -> list[str]:
    return [line[4:] for line in lines[1:]]


def test_ehlo_before_and_after_starttls(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 localhost ESMTP .*")
    t.c("EHLO client.example");  before = t.s(r"250 HELP")
    assert before[0] == "250-localhost"
    assert _ehlo_keywords(before) == ["SIZE 26214400", "8BITMIME", "SMTPUTF8", "PIPELINING",
                                      "ENHANCEDSTATUSCODES", "DSN", "STARTTLS", "HELP"]   # no AUTH before TLS
    t.starttls(client_context(gw.ca_file))
    t.c("EHLO client.example");  after = t.s(r"250 HELP")
    assert _ehlo_keywords(after) == ["SIZE 26214400", "8BITMIME", "SMTPUTF8", "PIPELINING",
                                     "ENHANCEDSTATUSCODES", "DSN", "AUTH PLAIN LOGIN", "HELP"]   # no STARTTLS again


def test_external_offered_only_with_a_client_certificate(gw: GatewayThread, transcript: type[Transcript]) -> None:
    app = gw.account("APP")
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 .*")
    t.c("EHLO app.example");  t.s(r"250 HELP")
    t.starttls(client_context(gw.ca_file, app.client_certificate, app.client_key))
    t.c("EHLO app.example");  lines = t.s(r"250 HELP")
    assert "AUTH PLAIN LOGIN EXTERNAL" in _ehlo_keywords(lines)
    t.c("AUTH EXTERNAL =");  t.s(r"235 2\.7\.0 Authentication successful")
    t.c(f"MAIL FROM:<{app.address}>");  t.s(r"250 2\.1\.0 .*")


def test_commands_before_tls_are_refused(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 .*")
    t.c("EHLO client.example");                 t.s(r"250 HELP")
    t.c("AUTH PLAIN AGZvbwBiYXI=");             t.s(r"530 5\.7\.0 Must issue a STARTTLS command first")
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost>")
    t.s(r"530 5\.7\.0 Must issue a STARTTLS command first")
    t.c("NOOP");                                t.s(r"250 2\.0\.0 OK")
    t.c("QUIT");                                t.s(r"221 2\.0\.0 Bye")


def test_mail_needs_auth_after_tls(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 .*")
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.starttls(client_context(gw.ca_file))
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost>");  t.s(r"530 5\.7\.0 Authentication required")
    t.c("RCPT TO:<marc.pharmacien@demo.mssante.localhost>");   t.s(r"530 5\.7\.0 Authentication required")
    t.c("DATA");                                              t.s(r"530 5\.7\.0 Authentication required")


def _authenticated(gw: GatewayThread, transcript: type[Transcript]) -> Transcript:
    doctor = gw.account("PER")
    t = transcript("127.0.0.1", gw.ports["submissions"], implicit_tls=client_context(gw.ca_file))
    t.s(r"220 .*")
    t.c("EHLO client.example");  t.s(r"250 HELP")
    token = base64.b64encode(f"\0{doctor.address}\0{doctor.password}".encode()).decode()
    t.c(f"AUTH PLAIN {token}");  t.s(r"235 2\.7\.0 .*")
    return t


def test_size_announced_over_the_limit(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = _authenticated(gw, transcript)
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost> SIZE=26214401")
    t.s(r"552 5\.3\.4 Message size exceeds fixed maximum message size \(26214400 octets\)")
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost> SIZE=1000");  t.s(r"250 2\.1\.0 .*")


def test_parameters_are_checked(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = _authenticated(gw, transcript)
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost> BODY=BINARYMIME")   # needs CHUNKING, not offered
    t.s(r"501 5\.5\.4 Syntax error in parameters: BODY must be 7BIT or 8BITMIME")
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost> RET=ALL")
    t.s(r"501 5\.5\.4 .*RET must be FULL or HDRS")
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost> XFOO=1")
    t.s(r"555 5\.5\.4 Parameter not recognized or not implemented: XFOO")
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME")
    t.s(r"250 2\.1\.0 .*")
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost>");  t.s(r"503 5\.5\.1 Bad sequence of commands: nested MAIL command")
    t.c("RCPT TO:<marc.pharmacien@demo.mssante.localhost> NOTIFY=NEVER,SUCCESS")
    t.s(r"501 5\.5\.4 .*NOTIFY must be NEVER or a list.*")
    t.c("RCPT TO:<marc.pharmacien@demo.mssante.localhost> ORCPT=rfc822")
    t.s(r"501 5\.5\.4 .*ORCPT must be addr-type;address")
    t.c("RSET");  t.s(r"250 2\.0\.0 OK")
    t.c("RCPT TO:<marc.pharmacien@demo.mssante.localhost>");  t.s(r"503 5\.5\.1 Bad sequence of commands: need MAIL before RCPT")


def test_unknown_commands_and_long_lines(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 .*")
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.c("FROB");                 t.s(r"500 5\.5\.1 Command not recognized: FROB")
    t.c("NOOP " + "x" * 600);    t.s(r"500 5\.5\.6 Line too long")
    t.c("VRFY postmaster");      t.s(r"530 5\.7\.0 Must issue a STARTTLS command first")
    t.c("NOOP");                 t.s(r"250 2\.0\.0 OK")


def test_too_many_errors_close_the_connection(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 .*")
    for _ in range(9):
        t.c("FROB");  t.s(r"500 5\.5\.1 .*")
    t.c("FROB");  t.s(r"421 4\.7\.0 Too many errors, closing connection")
    assert t.closed()


def test_pipelined_transaction(gw: GatewayThread, transcript: type[Transcript]) -> None:
    """RFC 2920: MAIL, RCPT... DATA sent in one go; replies come back in order."""
    t = _authenticated(gw, transcript)
    t.raw(b"MAIL FROM:<claire.medecin@demo.mssante.localhost>\r\n"
          b"RCPT TO:<marc.pharmacien@demo.mssante.localhost>\r\n"
          b"RCPT TO:<nobody@demo.mssante.localhost>\r\n"
          b"DATA\r\n")
    t.s(r"250 2\.1\.0 .*")
    t.s(r"250 2\.1\.5 .*")
    t.s(r"550 5\.1\.1 No mailbox nobody@demo\.mssante\.localhost here")
    t.s(r"354 .*")
    t.raw(b"From: <claire.medecin@demo.mssante.localhost>\r\nSubject: pipelined\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n")
    t.s(r"250 2\.0\.0 OK queued as [0-9a-f]+")
    t.s(r"250 2\.0\.0 OK")


def test_a_line_beyond_the_read_limit_then_the_end_in_one_write(gw: GatewayThread,
                                                                 transcript: type[Transcript]) -> None:
    """A body line far beyond every limit (20000 octets: more than one read holds), its CRLF and the end of
    DATA sent in one go: the message is refused as too long and the end is seen (RFC 5321 4.1.1.4), so the
    reply comes at once and the session stays in step. The line reader took the end for content here (it
    judged the line's end from the LF alone) and the client waited until the idle timeout."""
    t = _authenticated(gw, transcript)
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost>");  t.s(r"250 .*")
    t.c("RCPT TO:<marc.pharmacien@demo.mssante.localhost>");   t.s(r"250 .*")
    t.c("DATA");                                              t.s(r"354 .*")
    t.raw(b"Subject: long\r\n\r\n" + b"x" * 20000 + b"\r\n.\r\n")
    t.s(r"500 5\.5\.2 Message line longer than \d+ octets \(RFC 5321 4\.5\.3\.1\.6\); message refused")
    t.c("NOOP");                                              t.s(r"250 2\.0\.0 OK")


def test_data_without_recipients(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = _authenticated(gw, transcript)
    t.c("MAIL FROM:<claire.medecin@demo.mssante.localhost>");  t.s(r"250 .*")
    t.c("RCPT TO:<nobody@demo.mssante.localhost>");            t.s(r"550 5\.1\.1 .*")
    t.c("DATA");                                              t.s(r"554 5\.5\.1 No valid recipients")


def test_auth_needs_a_known_mechanism_and_valid_base64(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["submissions"], implicit_tls=client_context(gw.ca_file))
    t.s(r"220 .*")
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.c("AUTH CRAM-MD5");        t.s(r"504 5\.5\.4 Unrecognized authentication mechanism")
    t.c("AUTH EXTERNAL =");      t.s(r"504 5\.5\.4 .*")                    # no client certificate presented
    t.c("AUTH PLAIN !!!");       t.s(r"501 5\.5\.2 Cannot decode base64 response")
    t.c("AUTH LOGIN");           t.s(r"334 VXNlcm5hbWU6")                   # "Username:"
    t.c("*");                    t.s(r"501 5\.7\.0 Authentication aborted")


def test_open_sessions_are_told_when_the_gateway_stops(tmp_path_factory: pytest.TempPathFactory) -> None:
    gateway = GatewayThread(tmp_path_factory.mktemp("stopping") / "data").start()
    t = Transcript("127.0.0.1", gateway.ports["submission"])
    try:
        t.s(r"220 .*")
        t.c("EHLO client.example");  t.s(r"250 HELP")
        gateway.stop()
        t.s(r"421 4\.3\.2 Service shutting down, try again later")
        assert t.closed()
    finally:
        t.close()
        gateway.stop()

"""The inter-operator relay door: mutual TLS, trusted sender domains spoken for by the
client certificate, mail for our mailboxes only, no AUTH."""

from __future__ import annotations

import smtplib
import ssl

import pytest

from tests.smtp.conftest import Transcript, client_context, message
from tests.smtp.gateway_thread import PEER_DOMAIN, GatewayThread

OURS = "demo.mssante.localhost"


def _peer(gw: GatewayThread, who: str = "peer") -> ssl.SSLContext:
    return client_context(gw.ca_file, gw.extra[f"{who}_cert"], gw.extra[f"{who}_key"])


def _relay_session(gw: GatewayThread, transcript: type[Transcript], who: str = "peer") -> Transcript:
    t = transcript("127.0.0.1", gw.ports["relay"])
    t.s(r"220 .*")
    t.c(f"EHLO mx.{PEER_DOMAIN}");  lines = t.s(r"250 HELP")
    assert "250-STARTTLS" in lines and not any("AUTH" in line for line in lines)
    t.starttls(_peer(gw, who))
    t.c(f"EHLO mx.{PEER_DOMAIN}");  lines = t.s(r"250 HELP")
    assert not any("AUTH" in line or "STARTTLS" in line for line in lines)   # no AUTH on the relay door
    return t


def test_peer_operator_delivers_to_our_mailbox(gw: GatewayThread) -> None:
    doctor = gw.account("PER")
    sender = f"dr.martin@{PEER_DOMAIN}"
    with smtplib.SMTP("127.0.0.1", gw.ports["relay"], timeout=30) as client:
        client.starttls(context=_peer(gw))
        assert client.sendmail(sender, [doctor.address], message(sender, doctor.address, "Depuis un autre opérateur")) == {}
    gw.wait_delivered()
    delivered = [m for m in gw.inbox(doctor.address) if "Depuis un autre opérateur".encode() in m]
    assert len(delivered) == 1
    head = delivered[0].split(b"\r\n\r\n", 1)[0].decode()
    assert "with ESMTPS id" in head and f"client certificate mx.{PEER_DOMAIN} verified" in head
    assert f"x-tls=pass" in head and f"smtp.remote-cert=mx.{PEER_DOMAIN}" in head
    assert "X-MSS-NIL" not in head                                 # only added to what our own users send


def test_relay_rules(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = _relay_session(gw, transcript)
    t.c("AUTH PLAIN AGZvbwBiYXI=");              t.s(r"502 5\.5\.1 Command not implemented")
    t.c("MAIL FROM:<someone@gmail.com>");        t.s(r"550 5\.7\.1 Domain gmail\.com is not in the MSSanté trust space")
    t.c(f"MAIL FROM:<claire.medecin@{OURS}>")
    t.s(rf"550 5\.7\.1 Domain {OURS.replace('.', '[.]')} is hosted here: submit on the submission port")
    t.c(f"MAIL FROM:<dr.martin@{PEER_DOMAIN}>");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<confrere@{PEER_DOMAIN}>")
    t.s(rf"554 5\.7\.1 Relay access denied: confrere@{PEER_DOMAIN.replace('.', '[.]')} is not hosted here")
    t.c("RCPT TO:<someone@gmail.com>");          t.s(r"550 5\.7\.1 Domain gmail\.com is not in the MSSanté trust space")
    t.c(f"RCPT TO:<claire.medecin@{OURS}>");     t.s(r"250 2\.1\.5 .*")
    t.c("RSET");                                 t.s(r"250 2\.0\.0 OK")
    t.c("MAIL FROM:<>");                         t.s(r"250 2\.1\.0 .*")      # a bounce from a trusted operator


def test_certificate_must_speak_for_the_sender_domain(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = _relay_session(gw, transcript, who="stranger")     # our PKI, but named mx.not-trusted.example
    t.c(f"MAIL FROM:<dr.martin@{PEER_DOMAIN}>")
    t.s(rf"550 5\.7\.1 Client certificate \(mx\.not-trusted\.example\) does not speak for domain {PEER_DOMAIN.replace('.', '[.]')}")
    t.c("MAIL FROM:<>")
    t.s(r"550 5\.7\.1 Client certificate \(mx\.not-trusted\.example\) does not speak for domain any trusted domain")


def test_relay_requires_tls_and_a_client_certificate(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["relay"])
    t.s(r"220 .*")
    t.c(f"EHLO mx.{PEER_DOMAIN}");                t.s(r"250 HELP")
    t.c(f"MAIL FROM:<dr.martin@{PEER_DOMAIN}>");  t.s(r"530 5\.7\.0 Must issue a STARTTLS command first")
    t.starttls(client_context(gw.ca_file))        # no client certificate: the handshake completes...
    t.c(f"EHLO mx.{PEER_DOMAIN}")                 # ...and the peer is told what is missing, then disconnected
    t.s(r"530 5\.7\.0 Client certificate required: .*present your MX certificate in the TLS handshake.*")
    assert t.closed()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_relay_refuses_tls_below_1_2(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["relay"])
    t.s(r"220 .*")
    t.c("EHLO old.example");  t.s(r"250 HELP")
    t.c("STARTTLS");          t.s(r"220 2\.0\.0 .*")
    old = _peer(gw)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        old.wrap_socket(t.sock, server_hostname="localhost")

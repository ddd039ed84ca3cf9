"""Revocation takes effect at once, from the attacker's side, against a running ``gateway serve``: a client
certificate that worked is revoked with ``gateway certs revoke``; without a restart, new TLS connections
presenting it are refused at the handshake (SMTP, IMAP, HTTPS), and connections set up before the
revocation can no longer log in with it (SASL EXTERNAL on SMTP and IMAP, the FHIR API)."""

from __future__ import annotations

import base64
import http.client
import imaplib
import signal
import smtplib
import ssl

import pytest

from tests.harness import GatewayProcess

REFUSED_AT_HANDSHAKE = (ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected, imaplib.IMAP4.abort, OSError)


def _context(gateway: GatewayProcess) -> ssl.SSLContext:
    lab = gateway.account("APP")
    context = ssl.create_default_context(cafile=gateway.ca_file)
    context.load_cert_chain(lab["client_certificate"], lab["client_key"])
    return context


def _smtp(gateway: GatewayProcess) -> smtplib.SMTP_SSL:
    client = smtplib.SMTP_SSL("127.0.0.1", gateway.ports["smtp_submissions_port"], context=_context(gateway),
                              timeout=30)
    client.ehlo()
    return client


def _https(gateway: GatewayProcess) -> http.client.HTTPSConnection:
    connection = http.client.HTTPSConnection("127.0.0.1", gateway.ports["http_port"], context=_context(gateway),
                                             timeout=30)
    connection.connect()
    return connection


def _fhir_status(connection: http.client.HTTPSConnection) -> tuple[int, bytes]:
    connection.request("GET", "/fhir/DocumentReference?patient=unknown")
    response = connection.getresponse()
    return response.status, response.read()


def _imap(gateway: GatewayProcess) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=_context(gateway), timeout=30)


def _external(client: imaplib.IMAP4_SSL) -> str:
    try:
        return str(client.authenticate("EXTERNAL", lambda _: b"")[0])
    except imaplib.IMAP4.error as refused:
        return str(refused)




def test_a_revoked_certificate_stops_working_at_once(gateway: GatewayProcess) -> None:
    # Before: the lab's certificate signs in everywhere.
    with _smtp(gateway) as client:
        assert client.docmd("AUTH", "EXTERNAL =")[0] == 235
    assert _fhir_status(_https(gateway))[0] not in (401, 403)
    imap = _imap(gateway)
    assert _external(imap) == "OK"
    imap.logout()
    # Connections set up now, used after the revocation.
    early_smtp, early_https, early_imap = _smtp(gateway), _https(gateway), _imap(gateway)

    revoked = gateway.cli("certs", "revoke", "demo-app-labo", "--reason", "keyCompromise")
    assert revoked.returncode == 0, revoked.stderr

    # New connections presenting it are refused during the handshake, on every door.
    with pytest.raises(REFUSED_AT_HANDSHAKE):
        _smtp(gateway).docmd("AUTH", "EXTERNAL =")
    with pytest.raises(REFUSED_AT_HANDSHAKE):
        _fhir_status(_https(gateway))
    with pytest.raises(REFUSED_AT_HANDSHAKE):
        _external(_imap(gateway))
    # Connections from before cannot sign in with it any more.
    code, _ = early_smtp.docmd("AUTH", "EXTERNAL =")
    assert code == 535
    status, body = _fhir_status(early_https)
    assert status == 401 and b"revoked" in body
    assert "AUTHENTICATIONFAILED" in _external(early_imap)
    early_smtp.close()
    early_https.close()
    early_imap.shutdown()


def test_sighup_reloads_and_the_gateway_keeps_serving(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGHUP)
    doctor = gateway.account("PER")
    context = ssl.create_default_context(cafile=gateway.ca_file)
    connection = http.client.HTTPSConnection("127.0.0.1", gateway.ports["http_port"], context=context, timeout=30)
    token = base64.b64encode(f"{doctor['address']}:{doctor['password']}".encode()).decode()
    connection.request("GET", "/fhir/DocumentReference?patient=unknown", headers={"Authorization": f"Basic {token}"})
    assert connection.getresponse().status not in (401, 429, 500)
    assert "SIGHUP: reloading" in gateway.log_text()

"""The sign-in limiter from the attacker's side, through the real listeners of a running ``gateway serve``:
FHIR Basic guessing is throttled (429 + Retry-After + OperationOutcome), a stranger's wrong passwords from
one loopback address never stop the real user signing in from another (SMTP, IMAP, FHIR), the limiter is one
for every door, its state survives a restart, and every failure is in the audit log with the login tried."""

from __future__ import annotations

import base64
import http.client
import imaplib
import json
import smtplib
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import GatewayProcess

STRANGER = "127.0.0.2"
HOSPITAL = "127.0.0.3"
GUESSER = "127.0.0.4"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # Three free failures per login and source, then ten minutes: long enough that a restart cannot outlast it.
    process = GatewayProcess(tmp_path_factory.mktemp("auth-doors") / "data", extra_env={
        "GATEWAY_AUTH_FAILURES_BEFORE_DELAY": "3", "GATEWAY_AUTH_FIRST_DELAY_SECONDS": "600",
        "GATEWAY_AUTH_MAX_DELAY_SECONDS": "600"})
    process.start()
    yield process
    process.stop()


def _context(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def fhir_get(gateway: GatewayProcess, source: str, login: str, password: str,
             path: str = "/fhir/DocumentReference?patient=unknown") -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPSConnection("127.0.0.1", gateway.ports["http_port"], context=_context(gateway),
                                             source_address=(source, 0), timeout=30)
    try:
        token = base64.b64encode(f"{login}:{password}".encode()).decode()
        connection.request("GET", path, headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), json.loads(body) if body else None
    finally:
        connection.close()


class SourcedIMAP4SSL(imaplib.IMAP4_SSL):
    """imaplib over implicit TLS from a chosen local address."""

    def __init__(self, source: str, host: str, port: int, ssl_context: ssl.SSLContext) -> None:
        self._source = source
        super().__init__(host, port, ssl_context=ssl_context, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def imap_login(gateway: GatewayProcess, source: str, login: str, password: str) -> str:
    """"OK", or the server's NO text."""
    client = SourcedIMAP4SSL(source, "127.0.0.1", gateway.ports["imaps_port"], _context(gateway))
    try:
        client.login(login, password)
    except imaplib.IMAP4.error as refused:
        client.shutdown()
        return str(refused)
    client.logout()
    return "OK"


def smtp_auth(gateway: GatewayProcess, source: str, login: str, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["smtp_submissions_port"], context=_context(gateway),
                          source_address=(source, 0), timeout=30) as client:
        client.ehlo()
        client.user, client.password = login, password
        try:
            return client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError as refused:
            return refused.smtp_code, refused.smtp_error


def test_200_fhir_basic_guesses_are_throttled(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER")
    statuses: Counter[int] = Counter()
    throttled: tuple[dict[str, str], Any] | None = None
    for attempt in range(200):
        status, headers, body = fhir_get(gateway, GUESSER, doctor["address"], f"guess-{attempt}")
        statuses[status] += 1
        if status == 429:
            throttled = headers, body
    # Three guesses were checked; the other 197 waited, their passwords never looked at.
    assert statuses == {401: 3, 429: 197}
    assert throttled is not None
    headers, outcome = throttled
    assert 590 <= int(headers["Retry-After"]) <= 600
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "throttled"
    # Even the right password waits from there: the guesser cannot tell a right guess from a wrong one.
    assert fhir_get(gateway, GUESSER, doctor["address"], doctor["password"])[0] == 429


def test_a_strangers_guesses_never_stop_the_real_user_elsewhere(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER", 1)
    refused: Counter[int] = Counter()
    for attempt in range(50):
        refused[fhir_get(gateway, STRANGER, doctor["address"], f"wrong-{attempt}")[0]] += 1
    assert refused == {401: 3, 429: 47}
    # One limiter for every door: the stranger's address now waits on IMAP and SMTP too, right password or not.
    assert "[UNAVAILABLE]" in imap_login(gateway, STRANGER, doctor["address"], doctor["password"])
    code, text = smtp_auth(gateway, STRANGER, doctor["address"], doctor["password"])
    assert code == 454 and text.startswith(b"4.7.0 Too many failed authentication attempts; try again in")
    # The clinician, from the hospital's address, signs in at once by every door.
    assert fhir_get(gateway, HOSPITAL, doctor["address"], doctor["password"])[0] not in (401, 429)
    assert imap_login(gateway, HOSPITAL, doctor["address"], doctor["password"]) == "OK"
    assert smtp_auth(gateway, HOSPITAL, doctor["address"], doctor["password"]) == (235, b"2.7.0 Authentication successful")


def test_failures_are_audited_with_the_login_door_and_source(gateway: GatewayProcess) -> None:
    nurse = gateway.account("PER", 2)
    assert "[AUTHENTICATIONFAILED]" in imap_login(gateway, "127.0.0.5", nurse["address"], "not-her-password")
    assert smtp_auth(gateway, "127.0.0.5", nurse["address"], "still-not")[0] == 535
    listed = gateway.cli("audit", "list", "--event", "authentication_failed", "--actor", nurse["address"], "--json",
                         check=True)
    entries = json.loads(listed.stdout)
    assert {(e["source"]["door"], e["source"]["ip"], e["details"]["login"]) for e in entries} == {
        ("imap", "127.0.0.5", nurse["address"]), ("smtp", "127.0.0.5", nurse["address"])}
    assert all(e["actor"]["kind"] == "unauthenticated" and e["outcome"]["status"] == "refused" for e in entries)
    assert gateway.cli("audit", "verify").returncode == 0


def test_the_limiter_remembers_across_a_restart(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER")
    assert fhir_get(gateway, GUESSER, doctor["address"], doctor["password"])[0] == 429
    gateway.stop()
    gateway.start()
    assert fhir_get(gateway, GUESSER, doctor["address"], doctor["password"])[0] == 429
    assert "[UNAVAILABLE]" in imap_login(gateway, GUESSER, doctor["address"], doctor["password"])
    assert imap_login(gateway, HOSPITAL, doctor["address"], doctor["password"]) == "OK"

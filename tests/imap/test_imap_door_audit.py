"""Refusals at the IMAP door are in the audit log, from the attacker's side, through a running ``gateway serve``.

A signed-in professional reaching for a colleague's mailbox by every naming
trick the server knows (the shared namespace without a delegation, a ``../``
path, the colleague's address as a folder, other servers' user namespaces)
gets NO, and a ``door_refused`` entry names the login, the client address and
the reason; LOGIN on a cleartext connection and a literal over the limit
before login are audited too. A folder of one's own that does not exist, a
bad sequence set or a wrong password are not door refusals (the log has the
first two, the sign-in limiter the third). The same refusal repeated is
folded into one entry, and the count is written when the gateway stops; the
chain verifies.
"""

from __future__ import annotations

import imaplib
import json
import socket
import ssl
from typing import Any

import pytest

from tests.harness import GatewayProcess

TRICKS = (                                      # (the reason the audit entry gives, how the name is written)
    ("shared", "Shared/{other}/INBOX"),         # our shared namespace, nothing delegated
    ("traversal", "../{other}/INBOX"),
    ("traversal", "INBOX/../../{other}/INBOX"),
    ("address", "{other}/INBOX"),
    ("namespace", "~{other}/INBOX"),            # Dovecot's and UW's other users
    ("namespace", "user/{other}/INBOX"),        # Cyrus's
    ("namespace", "#shared/{other}/INBOX"),
)
PROBER = "127.0.0.21"
CLEARTEXT = "127.0.0.22"
OWN_ERRORS = "127.0.0.23"
FLOODER = "127.0.0.24"
CROWD = "127.0.0.25"
PER_IP = 20     # imap.max_unauthenticated_connections_per_ip's default


class SourcedImap(imaplib.IMAP4_SSL):
    """IMAPS from a chosen loopback address (the audit entries are told apart by it)."""

    def __init__(self, gateway: GatewayProcess, source: str) -> None:
        self.source = source
        context = ssl.create_default_context(cafile=gateway.ca_file)
        super().__init__("localhost", gateway.ports["imaps_port"], ssl_context=context, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        wrapped: socket.socket = self.ssl_context.wrap_socket(raw, server_hostname=self.host)
        return wrapped


class SourcedPlainImap(imaplib.IMAP4):
    def __init__(self, gateway: GatewayProcess, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", gateway.ports["imap_port"], timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def door_refusals(gateway: GatewayProcess, source: str) -> list[dict[str, Any]]:
    listed = gateway.cli("audit", "list", "--event", "door_refused", "--json", "--limit", "1000", check=True)
    return sorted((entry for entry in json.loads(listed.stdout)
                   if entry["source"]["ip"] == source and entry["source"]["door"] == "imap"), key=lambda e: e["seq"])


@pytest.fixture
def gateway(shared_gateway: GatewayProcess) -> GatewayProcess:
    return shared_gateway


def quoted(name: str) -> str:
    return '"' + name + '"'


def test_reaching_for_a_colleagues_mailbox_is_refused_and_audited(gateway: GatewayProcess) -> None:
    doctor, colleague = gateway.account("PER"), gateway.account("PER", 1)
    attempts = []
    with SourcedImap(gateway, PROBER) as client:
        client.login(doctor["address"], doctor["password"])
        for reason, pattern in TRICKS:
            name = quoted(pattern.format(other=colleague["address"]))
            answers = {
                "SELECT": client.select(name)[0],
                "EXAMINE": client.select(name, readonly=True)[0],
                "STATUS": client.status(name, "(MESSAGES)")[0],
                "APPEND": client.append(name, "", None, b"From: <x@y>\r\nSubject: planted\r\n\r\nhello\r\n")[0],
            }
            assert set(answers.values()) == {"NO"}, (reason, answers)
            attempts += [(verb, reason) for verb in answers]
        assert client.noop()[0] == "OK"                                    # and the session goes on
    entries = door_refusals(gateway, PROBER)
    found = {(entry["details"]["command"], entry["details"]["reason"]) for entry in entries}
    assert found == set(attempts), found ^ set(attempts)
    for entry in entries:
        assert (entry["actor"]["kind"], entry["actor"]["id"]) == ("mailbox", doctor["address"]), entry
        assert entry["outcome"]["status"] == "refused" and entry["details"]["reply"].startswith("NO ")
        assert colleague["address"] in entry["details"]["detail"]


def test_cleartext_login_and_an_oversized_literal_before_login_are_audited(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER")
    with SourcedPlainImap(gateway, CLEARTEXT) as client:
        assert "LOGINDISABLED" in client.capabilities
        client.send(b"a1 LOGIN " + doctor["address"].encode() + b" secret\r\n")
        assert client.readline().startswith(b"a1 NO [PRIVACYREQUIRED]")
        client.send(b"a2 LOGIN {900000}\r\n")                         # 25 MB literals before login: refused unread
        assert client.readline().startswith(b"a2 NO [TOOBIG]")
        client.send(b"a3 SELECT INBOX\r\n")                           # a command that needs a login
        assert client.readline().startswith(b"a3 BAD")
    entries = door_refusals(gateway, CLEARTEXT)
    reasons = {entry["details"]["reason"]: entry for entry in entries}
    assert set(reasons) == {"cleartext", "too-big", "not-authenticated"}, reasons
    assert all(entry["actor"]["kind"] == "unauthenticated" for entry in entries)
    assert reasons["cleartext"]["details"]["command"] == "LOGIN"
    assert "PRIVACYREQUIRED" in reasons["cleartext"]["details"]["reply"]


def test_ordinary_client_errors_and_wrong_passwords_are_not_door_refusals(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER")
    with SourcedImap(gateway, OWN_ERRORS) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login(doctor["address"], "not the password")
        client.login(doctor["address"], doctor["password"])
        assert client.select('"Brouillons anciens"')[0] == "NO"             # a folder of one's own that is not there
        assert client.select("INBOX")[0] == "OK"
        with pytest.raises(imaplib.IMAP4.error, match="BAD"):
            client.uid("FETCH", "0:x", "(FLAGS)")                          # a bad sequence set
        assert client.create('"Suivi/2024"')[0] == "OK"
        assert client.status('"Suivi/2025"', "(MESSAGES)")[0] == "NO"
    assert door_refusals(gateway, OWN_ERRORS) == []
    listed = gateway.cli("audit", "list", "--event", "authentication_failed", "--json", "--limit", "1000", check=True)
    assert [e for e in json.loads(listed.stdout) if e["source"]["ip"] == OWN_ERRORS], "the limiter audits sign-ins"


def test_connections_over_the_per_address_cap_are_audited_once_folded(gateway: GatewayProcess) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(PER_IP + 5):
            sock = socket.create_connection(("127.0.0.1", gateway.ports["imap_port"]), 30, source_address=(CROWD, 0))
            held.append(sock)
            assert sock.makefile("rb").readline().startswith(b"* OK" if len(held) <= PER_IP else b"* BYE Too many")
    finally:
        for sock in held:
            sock.close()
    [entry] = door_refusals(gateway, CROWD)                               # five refused, folded into one
    assert (entry["details"]["reason"], entry["details"]["command"]) == ("connection-limit", "connect")
    assert entry["actor"]["kind"] == "unauthenticated" and entry["details"]["reply"].startswith("BYE Too many")


def test_the_chain_verifies_after_the_refusals(gateway: GatewayProcess) -> None:
    assert gateway.cli("audit", "verify").returncode == 0


def test_a_flood_of_refusals_is_folded_into_one_entry_and_its_count(tmp_path: Any) -> None:
    gateway = GatewayProcess(tmp_path / "gateway")
    gateway.start()
    try:
        doctor, colleague = gateway.account("PER"), gateway.account("PER", 1)
        with SourcedImap(gateway, FLOODER) as client:
            client.login(doctor["address"], doctor["password"])
            for _ in range(25):
                assert client.select(quoted(f"Shared/{colleague['address']}/INBOX"))[0] == "NO"
        assert len(door_refusals(gateway, FLOODER)) == 1                   # one entry while the flood goes on
    finally:
        gateway.stop()
    first, folded = door_refusals(gateway, FLOODER)                       # written as the gateway stopped
    assert "repeated" not in first["details"] and folded["details"]["repeated"] == 24, (first, folded)
    assert (folded["actor"]["id"], folded["details"]["reason"]) == (doctor["address"], "shared")
    assert gateway.cli("audit", "verify").returncode == 0

"""Refusals at the SMTP doors are in the audit log, from the attacker's side, through a running ``gateway serve``.

A spoofed envelope sender, a message sent without signing in, a smuggled
message (a bare LF in DATA) and a recipient outside the trust space each leave
a ``door_refused`` entry naming the door, the client address, who was signed in
(if anyone) and the reply; a syntax error does not (the log has it); the same
refusal repeated within a minute is folded into one entry; the chain verifies.
"""

from __future__ import annotations

import json
import smtplib
import ssl
from typing import Any

import pytest

from tests.harness import GatewayProcess

SPOOFER = "127.0.0.6"
STRANGER = "127.0.0.7"


@pytest.fixture
def gateway(shared_gateway: GatewayProcess) -> GatewayProcess:
    """One ``gateway serve`` for the module: the tests read what the ones before them left in the audit log."""
    return shared_gateway


def submission(gateway: GatewayProcess, source: str, account: dict[str, Any] | None) -> smtplib.SMTP_SSL:
    client = smtplib.SMTP_SSL("127.0.0.1", gateway.ports["smtp_submissions_port"], timeout=30,
                              context=ssl.create_default_context(cafile=gateway.ca_file), source_address=(source, 0))
    client.ehlo("client.example")
    if account is not None:
        client.login(account["address"], account["password"])
    return client


def door_refusals(gateway: GatewayProcess) -> list[dict[str, Any]]:
    listed = gateway.cli("audit", "list", "--event", "door_refused", "--json", check=True)
    return list(json.loads(listed.stdout))


def test_a_spoofed_sender_is_refused_and_audited_with_the_signed_in_login(gateway: GatewayProcess) -> None:
    doctor, colleague = gateway.account("PER"), gateway.account("PER", 1)
    with submission(gateway, SPOOFER, doctor) as client:
        for _ in range(3):   # repeated at once: folded into one entry
            code, _text = client.mail(colleague["address"])
            assert code == 553
            client.rset()
    entries = [e for e in door_refusals(gateway) if e["source"]["ip"] == SPOOFER]
    assert len(entries) == 1, entries
    [entry] = entries
    assert (entry["actor"]["kind"], entry["actor"]["id"], entry["source"]["door"]) == ("mailbox", doctor["address"], "smtp")
    assert entry["outcome"]["status"] == "refused" and "5.7.1" in entry["outcome"]["reason"]
    assert colleague["address"] in entry["details"]["reply"]


def test_unauthenticated_mail_and_a_smuggled_message_are_audited_a_syntax_error_is_not(gateway: GatewayProcess) -> None:
    doctor, patient = gateway.account("PER"), gateway.account("PAT")
    with submission(gateway, STRANGER, None) as client:
        assert client.mail(doctor["address"])[0] == 530                  # AUTH first (RFC 4954 6)
    with submission(gateway, STRANGER, doctor) as client:
        assert client.docmd("MAIL", "FROM:<broken")[0] == 501            # a syntax error: the log's, not the audit's
        assert client.mail(doctor["address"])[0] == 250
        assert client.rcpt(patient["address"])[0] == 250
        client.putcmd("DATA")
        assert client.getreply()[0] == 354
        client.send(b"From: <" + doctor["address"].encode() + b">\r\nSubject: x\r\n\r\nline\n.\nMAIL FROM:<x@y>\r\n.\r\n")
        code, text = client.getreply()
        assert (code, b"bare <LF>" in text) == (550, True)
        assert client.noop()[0] == 250                                    # and the session goes on
    replies = {(e["actor"]["kind"], e["details"]["reply"].split(" ", 2)[1]) for e in door_refusals(gateway)
               if e["source"]["ip"] == STRANGER}
    assert replies == {("unauthenticated", "5.7.0"), ("mailbox", "5.5.2")}, replies


def test_the_chain_verifies_after_the_refusals(gateway: GatewayProcess) -> None:
    assert gateway.cli("audit", "verify").returncode == 0

"""Header From must match who is sending (issue 9 item 7), from the attacker's side, through ``gateway serve``.

Submission: every From address is one the authenticated account owns or is delegated for; a delegate
writing as the delegator gets a ``Sender:`` with its own address (RFC 5322 3.6.2). Relay door: the From
domain is aligned with the MAIL FROM domain and spoken for by the peer's certificate (the organisation is
the trust-list domain, not a public-suffix guess); never one of our domains; DKIM is verified and written
in Authentication-Results (RFC 8601), a failed or missing signature recorded, not trusted (RFC 6376 6.3).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import DkimSettings
from gateway.security.dkim import DkimKeys, DkimSigner
from tests.dnsmasq import Dnsmasq, DnsZone
from tests.harness import GatewayProcess
from tests.smtp.doors import OURS, PEER, doors_gateway, login, open_door, wait_for_subject

THIRD = "third.mssante.localhost"


@pytest.fixture(scope="module")
def peer_keys(tmp_path_factory: pytest.TempPathFactory) -> DkimKeys:
    keys = DkimKeys(tmp_path_factory.mktemp("peer-dkim"))
    keys.generate(PEER, "peer1")
    return keys


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, peer_keys: DkimKeys) -> Iterator[GatewayProcess]:
    key = peer_keys.load(PEER, "peer1")
    assert key is not None
    dns = Dnsmasq(tmp_path_factory.mktemp("dns"), DnsZone(zones=[PEER], txt=[(key.dns_name, key.txt_record)])).start()
    try:
        gateway = doors_gateway(tmp_path_factory.mktemp("header-from") / "data", {
            "GATEWAY_OUTBOUND_NAMESERVER": "127.0.0.1", "GATEWAY_OUTBOUND_NAMESERVER_PORT": str(dns.port)})
        gateway.cli("domain", "trust", "add", THIRD, "--operator", "Third", check=True)
        yield gateway
        gateway.stop()
    finally:
        dns.stop()


def _submit(gw: GatewayProcess, header: str, subject: str, *, to: dict[str, Any] | None = None,
            login_as: dict[str, Any] | None = None, mail_from: str | None = None) -> list[str]:
    """Submit a message with ``header`` fields; the final reply's lines."""
    account = login_as or gw.account("PER", 0)
    recipient = (to or gw.account("PER", 1))["address"]
    t = open_door(gw, "smtp_submission_port")
    login(t, account)
    t.c(f"MAIL FROM:<{mail_from or account['address']}>");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<{recipient}>");  t.s(r"250 2\.1\.5 .*")
    t.c("DATA");  t.s(r"354 .*")
    t.raw(f"{header}To: <{recipient}>\r\nSubject: {subject}\r\n\r\nBonjour.\r\n.\r\n".encode())
    reply = t.reply()
    t.c("QUIT");  t.s(r"221 .*")
    t.close()
    return reply


def _relay(gw: GatewayProcess, message: bytes, *, mail_from: str = f"dr.martin@{PEER}",
           to: dict[str, Any] | None = None) -> list[str]:
    recipient = (to or gw.account("PER", 0))["address"]
    t = open_door(gw, "smtp_relay_port", cert="peer-mx", ehlo=f"mx.{PEER}")
    t.c(f"MAIL FROM:<{mail_from}>");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<{recipient}>");  t.s(r"250 2\.1\.5 .*")
    t.c("DATA");  t.s(r"354 .*")
    t.raw(message + b".\r\n")
    reply = t.reply()
    t.c("QUIT");  t.s(r"221 .*")
    t.close()
    return reply


def _peer_message(sender: str, to: str, subject: str) -> bytes:
    return (f"From: Dr Martin <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash(subject))}@{PEER}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"\r\nCompte rendu.\r\n").encode()


def _our_results(message: Any) -> str:
    return " ".join(" ".join(str(h).split()) for h in message.get_all("Authentication-Results", [])
                    if str(h).startswith("localhost"))


# ----------------------------------------------------------------------------- submission

@pytest.mark.parametrize(("header", "expected"), [
    pytest.param(f"From: Dr Someone Else <marc.pharmacien@{OURS}>\r\n",
                 rf"550 5\.7\.1 From: header address marc\.pharmacien@{re.escape(OURS)} is not owned by or delegated "
                 rf"to claire\.medecin@{re.escape(OURS)}", id="another-professional"),
    pytest.param(f"From: <dr.martin@{PEER}>\r\n", r"550 5\.7\.1 From: header address dr\.martin@.* is not owned .*",
                 id="another-operator"),
    pytest.param(f"From: <claire.medecin@{OURS}>, <marc.pharmacien@{OURS}>\r\n",
                 r"550 5\.7\.1 From: header address marc\.pharmacien@.* is not owned .*", id="one-of-two-not-owned"),
    pytest.param(f"From: <claire.medecin@{OURS}>\r\nFrom: <marc.pharmacien@{OURS}>\r\n",
                 r"550 5\.7\.1 Message has 2 From: header fields; RFC 5322 3\.6 allows exactly one", id="two-from-fields"),
    pytest.param("", r"550 5\.7\.1 Message has no From: header field; RFC 5322 3\.6 requires one naming the author",
                 id="no-from"),
    pytest.param(f"From: Cardiologie: <claire.medecin@{OURS}>;\r\n",
                 r"550 5\.7\.1 From: header uses group syntax; it must list the author's own mailboxes .*",
                 id="group-syntax"),
    pytest.param("From: undisclosed\r\n", r"550 5\.7\.1 From: header names no mailbox.*", id="no-address"),
    pytest.param(f"From: <claire.medecin@{OURS}>\r\nSender: <marc.pharmacien@{OURS}>\r\n",
                 rf"550 5\.7\.1 Sender: header address marc\.pharmacien@{re.escape(OURS)} is not "
                 rf"claire\.medecin@{re.escape(OURS)}.*", id="forged-sender"),
])
def test_submission_refuses_a_from_that_is_not_the_sender(gw: GatewayProcess, header: str, expected: str) -> None:
    marc = gw.account("PER", 1)
    subject = f"spoof {abs(hash(header))}"
    reply = _submit(gw, header, subject)
    assert re.fullmatch(expected, reply[-1]), reply
    _submit(gw, f"From: <{gw.account('PER', 0)['address']}>\r\n", f"after {subject}")
    wait_for_subject(gw, marc, f"after {subject}")
    from tests.smtp.doors import inbox
    assert subject not in [m["Subject"] for m in inbox(gw, marc)]


def test_own_from_is_delivered_unchanged(gw: GatewayProcess) -> None:
    claire, marc = gw.account("PER", 0), gw.account("PER", 1)
    reply = _submit(gw, f"From: Dr Claire MEDECIN <{claire['address']}>\r\n", "own from")
    assert reply[-1].startswith("250 2.0.0"), reply
    delivered = wait_for_subject(gw, marc, "own from")
    assert delivered["From"].addresses[0].addr_spec == claire["address"]
    assert delivered["Sender"] is None


def test_delegate_writing_as_the_delegator_gets_a_sender_field(gw: GatewayProcess) -> None:
    """claire has send rights on the cardiology secretariat's mailbox (demo): From it, with Sender: claire."""
    claire, marc, secretariat = gw.account("PER", 0), gw.account("PER", 1), gw.account("ORG", 0)
    reply = _submit(gw, f"From: Cardiologie <{secretariat['address']}>\r\n", "as the secretariat",
                    mail_from=secretariat["address"])
    assert reply[-1].startswith("250 2.0.0"), reply
    delivered = wait_for_subject(gw, marc, "as the secretariat")
    assert delivered["From"].addresses[0].addr_spec == secretariat["address"]
    assert [h.addresses[0].addr_spec for h in delivered.get_all("Sender")] == [claire["address"]]
    reply = _submit(gw, f"From: <{secretariat['address']}>\r\nSender: Dr Claire <{claire['address']}>\r\n",
                    "as the secretariat with sender")
    assert reply[-1].startswith("250 2.0.0"), reply
    delivered = wait_for_subject(gw, marc, "as the secretariat with sender")
    assert [h.addresses[0].addr_spec for h in delivered.get_all("Sender")] == [claire["address"]]   # kept, not doubled


def test_the_delegator_cannot_be_used_by_someone_without_rights(gw: GatewayProcess) -> None:
    marc, secretariat = gw.account("PER", 1), gw.account("ORG", 0)
    reply = _submit(gw, f"From: <{secretariat['address']}>\r\n", "marc as the secretariat", login_as=marc,
                    to=gw.account("PER", 0))
    assert re.fullmatch(r"550 5\.7\.1 From: header address secretariat\.cardiologie@.* is not owned by or delegated "
                        r"to marc\.pharmacien@.*", reply[-1]), reply


# ----------------------------------------------------------------------------- relay door

def test_peer_cannot_send_as_our_professional_to_a_patient(gw: GatewayProcess) -> None:
    patient = gw.account("PAT", 0)
    claire = gw.account("PER", 0)
    reply = _relay(gw, _peer_message(claire["address"], patient["address"], "forged from ours"), to=patient)
    assert re.fullmatch(rf"550 5\.7\.1 From: header domain {re.escape(OURS)} is hosted here: a peer operator cannot "
                        r"send as our users", reply[-1]), reply


@pytest.mark.parametrize(("sender", "mail_from", "expected"), [
    pytest.param(f"dr.durand@{THIRD}", f"dr.martin@{PEER}",
                 rf"550 5\.7\.1 From: header domain {re.escape(THIRD)} is not aligned with the envelope sender's "
                 rf"organisation {re.escape(PEER)}.*", id="trusted-but-other-organisation"),
    pytest.param("someone@other.example", f"dr.martin@{PEER}",
                 r"550 5\.7\.1 From: header domain other\.example is not aligned .*", id="outside-the-space"),
    pytest.param(f"dr.durand@{THIRD}", "",
                 rf"550 5\.7\.1 From: header domain {re.escape(THIRD)} is not spoken for by the client certificate "
                 rf"\(mx\.{re.escape(PEER)}\)", id="bounce-from-another-organisation"),
])
def test_relay_from_must_align(gw: GatewayProcess, sender: str, mail_from: str, expected: str) -> None:
    reply = _relay(gw, _peer_message(sender, gw.account("PER", 0)["address"], f"unaligned {sender}"), mail_from=mail_from)
    assert re.fullmatch(expected, reply[-1]), reply


def test_relay_records_dkim_none_for_an_unsigned_message(gw: GatewayProcess) -> None:
    claire = gw.account("PER", 0)
    reply = _relay(gw, _peer_message(f"dr.martin@{PEER}", claire["address"], "unsigned from peer"))
    assert reply[-1].startswith("250 2.0.0"), reply
    results = _our_results(wait_for_subject(gw, claire, "unsigned from peer"))
    assert "x-tls=pass" in results and "dkim=none" in results, results


def test_relay_verifies_the_peers_dkim_signature(gw: GatewayProcess, peer_keys: DkimKeys) -> None:
    claire = gw.account("PER", 0)
    message = _peer_message(f"dr.martin@{PEER}", claire["address"], "signed from peer")
    signature = DkimSigner(peer_keys, DkimSettings(selector="peer1")).signature_for(message)
    assert signature is not None
    assert _relay(gw, signature.encode() + message)[-1].startswith("250 2.0.0")
    results = _our_results(wait_for_subject(gw, claire, "signed from peer"))
    assert f"dkim=pass header.d={PEER} header.s=peer1" in results, results


def test_relay_records_a_broken_signature_as_fail(gw: GatewayProcess, peer_keys: DkimKeys) -> None:
    """RFC 6376 6.3: a failed signature is as no signature; the peer is still the verified operator whose
    certificate speaks for the From domain, so the message is delivered with dkim=fail recorded."""
    claire = gw.account("PER", 0)
    message = _peer_message(f"dr.martin@{PEER}", claire["address"], "tampered from peer")
    signature = DkimSigner(peer_keys, DkimSettings(selector="peer1")).signature_for(message)
    assert signature is not None
    tampered = signature.encode() + message.replace(b"Compte rendu.", b"Autre texte.")
    assert _relay(gw, tampered)[-1].startswith("250 2.0.0")
    results = _our_results(wait_for_subject(gw, claire, "tampered from peer"))
    assert "dkim=fail (body hash mismatch" in results, results


def test_relay_bounce_from_the_peers_mailer_daemon_is_accepted(gw: GatewayProcess) -> None:
    claire = gw.account("PER", 0)
    reply = _relay(gw, _peer_message(f"MAILER-DAEMON@mx.{PEER}", claire["address"], "bounce from peer"), mail_from="")
    assert reply[-1].startswith("250 2.0.0"), reply
    wait_for_subject(gw, claire, "bounce from peer")


def test_relay_forged_authentication_results_are_not_ours(gw: GatewayProcess) -> None:
    """A peer cannot write our verdict: an Authentication-Results claiming our authserv-id is removed (RFC 8601 5)."""
    claire = gw.account("PER", 0)
    forged = b"Authentication-Results: localhost; dkim=pass header.d=demo.mssante.localhost\r\n"
    assert _relay(gw, forged + _peer_message(f"dr.martin@{PEER}", claire["address"], "forged results"))[-1] \
        .startswith("250 2.0.0")
    results = _our_results(wait_for_subject(gw, claire, "forged results"))
    assert "header.d=demo.mssante.localhost" not in results and "dkim=none" in results, results


# ----------------------------------------------------------------------------- reading the From field

@pytest.mark.parametrize(("value", "addresses", "problem"), [
    ("Dr X <a@b.fr>", ("a@b.fr",), None),
    ("a@b.fr (Dr X), <c@d.fr>", ("a@b.fr", "c@d.fr"), None),
    ("claire@ours.fr <marc@ours.fr>", (), "malformed"),          # clients disagree on who this is: no author
    ("<a@b.fr> <c@d.fr>", (), "malformed"),
    ('Dr "x" <a@b.fr', (), "malformed"),
    ("undisclosed", (), "local part with no domain"),
    ("", (), "empty"),
])
def test_from_field_reading(value: str, addresses: tuple[str, ...], problem: str | None) -> None:
    from gateway.pipeline.parse import parse_mailbox_list
    parsed = parse_mailbox_list(value)
    assert parsed.addresses == addresses
    assert (parsed.problem is None) if problem is None else (problem in (parsed.problem or "")), parsed


def test_ambiguous_from_is_refused_on_submission(gw: GatewayProcess) -> None:
    reply = _submit(gw, f"From: claire.medecin@{OURS} <marc.pharmacien@{OURS}>\r\n", "ambiguous from")
    assert re.fullmatch(r"550 5\.7\.1 From: header names no mailbox \(malformed: .*\)", reply[-1]), reply

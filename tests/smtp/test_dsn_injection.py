"""DSN injection, from the attacker's side: ``ORCPT`` and ``ENVID`` carry xtext (RFC 3461 4), and an
encoded CR LF (``+0D+0A``) must never become a line of a delivery report (RFC 3464). Invalid values
are refused at the command with ``501 5.5.4``; valid ones reach the report as one field each.

The failure DSN is real: the peer domain is routed back to our own relay door, which refuses a sender
of our domain (550 5.7.1), so the outbound worker fails the recipient and reports to the sender's mailbox.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.queue.dsn import Action, OriginalMessage, RecipientReport, build_dsn
from tests.harness import GatewayProcess
from tests.smtp.doors import PEER, doors_gateway, inbox, login, open_door, wait_for_subject

INJECTED = "+0D+0AAction:+20delivered+0D+0AX-Injected:+20yes"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = doors_gateway(tmp_path_factory.mktemp("dsn-injection") / "data")
    yield gateway
    gateway.stop()


@pytest.mark.parametrize(("command", "expected"), [
    pytest.param(f"RCPT TO:<dr.x@{PEER}> NOTIFY=FAILURE ORCPT=rfc822;dr.x@{PEER}{INJECTED}",
                 r"501 5\.5\.4 Syntax error in parameters: ORCPT address holds a control character.*", id="orcpt-crlf"),
    pytest.param(f"RCPT TO:<dr.x@{PEER}> ORCPT=rfc822;dr.x@{PEER}+0A", r"501 5\.5\.4 .*ORCPT.*control character.*",
                 id="orcpt-lf"),
    pytest.param(f"RCPT TO:<dr.x@{PEER}> ORCPT=rfc822;dr.x@{PEER}+00", r"501 5\.5\.4 .*ORCPT.*control character.*",
                 id="orcpt-nul"),
    pytest.param(f"RCPT TO:<dr.x@{PEER}> ORCPT=rfc822;dr.x@{PEER}+C3+A9", r"501 5\.5\.4 .*ORCPT.*US-ASCII.*",
                 id="orcpt-rfc822-not-ascii"),
    pytest.param(f"RCPT TO:<dr.x@{PEER}> ORCPT=rfc822;" + "a" * 500 + f"@{PEER}", r"501 5\.5\.4 .*ORCPT.*500.*",
                 id="orcpt-too-long"),
    pytest.param(f"RCPT TO:<dr.x@{PEER}> ORCPT=rfc822;no-at-sign", r"501 5\.5\.4 .*ORCPT.*mailbox.*",
                 id="orcpt-not-an-address"),
    pytest.param(f"RCPT TO:<dr.x@{PEER}> ORCPT=x-unknown;dr.x@{PEER}", r"501 5\.5\.4 .*ORCPT address type.*",
                 id="orcpt-unknown-type"),
])
def test_invalid_orcpt_is_refused(gw: GatewayProcess, command: str, expected: str) -> None:
    claire = gw.account("PER", 0)
    t = open_door(gw, "smtp_submission_port")
    login(t, claire)
    t.c(f"MAIL FROM:<{claire['address']}>");  t.s(r"250 2\.1\.0 .*")
    t.c(command);  t.s(expected)
    t.c("DATA");  t.s(r"554 5\.5\.1 No valid recipients")
    t.close()


@pytest.mark.parametrize("envid", [f"id-1{INJECTED}", "id+0A", "id+7F", "id+C3+A9"])
def test_invalid_envid_is_refused(gw: GatewayProcess, envid: str) -> None:
    claire = gw.account("PER", 0)
    t = open_door(gw, "smtp_submission_port")
    login(t, claire)
    t.c(f"MAIL FROM:<{claire['address']}> ENVID={envid}")
    t.s(r"501 5\.5\.4 Syntax error in parameters: ENVID .*(control character|US-ASCII).*")
    t.c(f"RCPT TO:<dr.x@{PEER}>");  t.s(r"503 5\.5\.1 .*")
    t.close()


def test_failure_report_carries_the_parameters_as_single_fields(gw: GatewayProcess) -> None:
    """A real failure DSN: ORCPT and ENVID decoded from xtext (RFC 3461 4), each one field of the report."""
    claire = gw.account("PER", 0)
    t = open_door(gw, "smtp_submission_port")
    login(t, claire)
    t.c(f"MAIL FROM:<{claire['address']}> RET=HDRS ENVID=env+2Bid-42");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<dr.x@{PEER}> NOTIFY=FAILURE ORCPT=rfc822;dr.x+2Bdsn@{PEER}");  t.s(r"250 2\.1\.5 .*")
    t.c("DATA");  t.s(r"354 .*")
    t.raw(f"From: <{claire['address']}>\r\nTo: <dr.x@{PEER}>\r\nSubject: dsn probe\r\n\r\nBonjour.\r\n.\r\n".encode())
    t.s(r"250 2\.0\.0 .*")
    t.c("QUIT");  t.s(r"221 2\.0\.0 .*")
    t.close()
    wait_for_subject(gw, claire, "Delivery failure / Échec de remise")
    (report,) = [m for m in inbox(gw, claire) if b"dsn probe" in m.as_bytes()]
    status = next(part for part in report.walk() if part.get_content_type() == "message/delivery-status")
    text = status.as_bytes().decode()
    assert "Original-Envelope-Id: env+id-42\n" in text.replace("\r\n", "\n"), text
    assert f"Original-Recipient: rfc822; dr.x+dsn@{PEER}\n" in text.replace("\r\n", "\n"), text
    assert text.count("Action:") == 1 and "Action: failed" in text, text
    assert "X-Injected" not in report.as_string()


def test_report_writer_never_writes_a_line_break_from_a_parameter() -> None:
    """Defence in depth (gateway.queue.dsn): a value stored before validation existed cannot inject either."""
    original = OriginalMessage(sender="claire@ours.test", content=b"Subject: x\r\n\r\nbody\r\n",
                               envid="e1\r\nAction: delivered", ret="HDRS")
    report = RecipientReport(final_recipient="dr.x@peer.test", action=Action.FAILED, status="5.1.1",
                             original_recipient="rfc822;dr.x@peer.test\r\nAction: delivered\rX-Injected: yes",
                             remote_mta="mx.peer.test\r\nX-Injected: yes", diagnostic="550 5.1.1 no\r\nX-Injected: yes")
    dsn = build_dsn(reporting_mta="mx.ours.test", original=original, recipients=[report])
    status = dsn.split(b"Content-Type: message/delivery-status", 1)[1].split(b"Content-Type: text/rfc822-headers")[0]
    lines = status.split(b"\r\n")
    assert [line for line in lines if line.startswith(b"Action:")] == [b"Action: failed"]
    assert not [line for line in lines if line.startswith(b"X-Injected")]
    assert b"\r" not in status.replace(b"\r\n", b"") and b"\n" not in status.replace(b"\r\n", b"")
    assert b"Original-Recipient: rfc822; dr.x@peer.test+0D+0AAction:+20delivered+0DX-Injected:+20yes" in status

"""Postmaster (RFC 5321 4.5.1): ``RCPT TO:<Postmaster>`` in any case and ``postmaster@`` every
local domain are accepted on every door and delivered to the ``[smtp] postmaster`` mailbox; a
gateway without that setting refuses them with a reply that names it."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator

import pytest

from gateway.queue.store import QueueStore
from tests.smtp.conftest import client_context, logged_in, message
from tests.smtp.gateway_thread import PEER_DOMAIN, GatewayThread

OURS = "demo.mssante.localhost"
PATIENTS = "patient.mssante.localhost"
POSTMASTER_BOX = f"secretariat.cardiologie@{OURS}"           # a hosted ORG mailbox of the demo directory
NOT_CONFIGURED = (r"550 5\.1\.1 No mailbox postmaster@{domain} here: this gateway's postmaster is not configured "
                  r"\(the administrator sets \[smtp\] postmaster to a hosted mailbox, RFC 5321 4\.5\.1\)")


@pytest.fixture(scope="module")
def pm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    gateway = GatewayThread(tmp_path_factory.mktemp("postmaster") / "data",
                            overrides={"smtp": {"postmaster": POSTMASTER_BOX}}).start()
    yield gateway
    gateway.stop()


def _peer(gw: GatewayThread) -> ssl.SSLContext:
    return client_context(gw.ca_file, gw.extra["peer_cert"], gw.extra["peer_key"])


def _received(gw: GatewayThread, subject: str) -> list[bytes]:
    gw.wait_delivered()
    return [m for m in gw.inbox(POSTMASTER_BOX) if f"Subject: {subject}".encode() in m]


@pytest.mark.parametrize("recipient", ["Postmaster", "postmaster", "POSTMASTER", f"PostMaster@{OURS}",
                                       f"postmaster@{PATIENTS}"])
def test_submission_door(pm: GatewayThread, recipient: str) -> None:
    doctor = pm.account("PER")
    subject = f"Soumission {recipient}"
    with logged_in(pm, doctor.address, doctor.password) as client:
        assert client.sendmail(doctor.address, [recipient], message(doctor.address, recipient, subject)) == {}
    (delivered,) = _received(pm, subject)
    assert f"for <{POSTMASTER_BOX}>".encode() in delivered


@pytest.mark.parametrize("recipient", ["Postmaster", f"postmaster@{OURS}"])
def test_relay_door(pm: GatewayThread, recipient: str) -> None:
    sender = f"dr.martin@{PEER_DOMAIN}"
    subject = f"Relais {recipient}"
    with smtplib.SMTP("127.0.0.1", pm.ports["relay"], timeout=30) as client:
        client.starttls(context=_peer(pm))
        assert client.sendmail(sender, [recipient], message(sender, recipient, subject)) == {}
    assert len(_received(pm, subject)) == 1


def test_aliases_collapse_into_one_recipient(pm: GatewayThread) -> None:
    """<Postmaster> and postmaster@<each local domain> are one mailbox: one queue row (RFC 5321 3.3)."""
    doctor = pm.account("PER")
    with logged_in(pm, doctor.address, doctor.password) as client:
        client.mail(doctor.address)
        for recipient in ("Postmaster", f"postmaster@{OURS}", f"postmaster@{PATIENTS}"):
            assert client.rcpt(recipient)[0] == 250
        code, reply = client.data(message(doctor.address, "Postmaster", "Trois alias"))
    assert code == 250
    rows = pm.call(QueueStore(pm.db).recipients_of(reply.decode().rsplit(" ", 1)[1]))  # type: ignore[arg-type]
    assert [r.address for r in rows] == [POSTMASTER_BOX]
    assert len(_received(pm, "Trois alias")) == 1


def test_a_patient_may_write_to_the_postmaster(pm: GatewayThread) -> None:
    """A patient starts no conversation, but reporting a mail problem to the postmaster is always allowed."""
    patient = pm.account("PAT")
    with logged_in(pm, patient.address, patient.password) as client:
        assert client.sendmail(patient.address, ["Postmaster"], message(patient.address, "Postmaster", "Patient")) == {}
    assert len(_received(pm, "Patient")) == 1


def test_postmaster_is_only_a_recipient(pm: GatewayThread) -> None:
    """The domain-less form exists for RCPT only (RFC 5321 4.1.1.3); MAIL FROM:<Postmaster> is malformed."""
    doctor = pm.account("PER")
    with logged_in(pm, doctor.address, doctor.password) as client:
        code, text = client.mail("Postmaster")
    assert code == 553 and text.startswith(b"5.1.3 ")


def test_not_configured_is_refused_by_name(gw: GatewayThread) -> None:
    """Without [smtp] postmaster, both doors say what is missing instead of a bare 'no such user'."""
    doctor = gw.account("PER")
    with logged_in(gw, doctor.address, doctor.password) as client:
        client.mail(doctor.address)
        code, text = client.rcpt("Postmaster")
        assert code == 550
        assert f"550 {text.decode()}" == NOT_CONFIGURED.format(domain=OURS).replace("\\", "")
        code, text = client.rcpt(f"postmaster@{PATIENTS}")
        assert (code, text.split(b" ", 1)[0]) == (550, b"5.1.1") and b"[smtp] postmaster" in text
    sender = f"dr.martin@{PEER_DOMAIN}"
    with smtplib.SMTP("127.0.0.1", gw.ports["relay"], timeout=30) as client:
        client.starttls(context=_peer(gw))
        client.ehlo()
        client.mail(sender)
        code, text = client.rcpt("Postmaster")
    assert code == 550 and b"[smtp] postmaster" in text

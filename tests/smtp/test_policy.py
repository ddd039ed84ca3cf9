"""Trust-space rules at SMTP time, each refusal with its enhanced code."""

from __future__ import annotations

import base64
import smtplib

import pytest

from tests.smtp.conftest import Transcript, client_context, logged_in, message
from tests.smtp.gateway_thread import PEER_DOMAIN, GatewayThread

OURS = "demo.mssante.localhost"


def _session(gw: GatewayThread, transcript: type[Transcript], account_type: str = "PER", index: int = 0) -> Transcript:
    account = gw.account(account_type, index)
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 .*")
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.starttls(client_context(gw.ca_file))
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.c("AUTH PLAIN " + base64.b64encode(f"\0{account.address}\0{account.password}".encode()).decode())
    t.s(r"235 .*")
    return t


@pytest.mark.parametrize("recipient, expected", [
    (f"<marc.pharmacien%other.example@{OURS}>", r"550 5\.7\.1 Percent-hack addresses are not accepted; no relaying"),
    (f'<"someone@other.example"@{OURS}>', r"553 5\.1\.3 Quoted local parts are not accepted here"),
    (f"<@{OURS}:someone@other.example>", r"550 5\.7\.1 Source routes are not accepted .*"),
    (f"<@relay.example,@{OURS}:someone@other.example>", r"550 5\.7\.1 Source routes are not accepted .*"),
    (f"<other.example!someone@{OURS}>", r"550 5\.7\.1 Bang-path \(UUCP\) addresses are not accepted; no relaying"),
    ("<someone@gmail.com>", r"550 5\.7\.1 Domain gmail\.com is not in the MSSanté trust space"),
    ("<someone@[192.0.2.1]>", r"550 5\.7\.1 Domain \[192\.0\.2\.1\] is not in the MSSanté trust space"),
    (f"<nobody@{OURS}>", r"550 5\.1\.1 No mailbox nobody@demo\.mssante\.localhost here"),
])
def test_relay_probes_are_refused(gw: GatewayThread, transcript: type[Transcript], recipient: str, expected: str) -> None:
    t = _session(gw, transcript)
    t.c(f"MAIL FROM:<claire.medecin@{OURS}>");  t.s(r"250 .*")
    t.c(f"RCPT TO:{recipient}");                t.s(expected)


def test_unauthenticated_submission_is_refused(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = transcript("127.0.0.1", gw.ports["submission"])
    t.s(r"220 .*")
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.starttls(client_context(gw.ca_file))
    t.c("EHLO client.example");  t.s(r"250 HELP")
    t.c("MAIL FROM:<someone@gmail.com>");          t.s(r"530 5\.7\.0 Authentication required")
    t.c(f"RCPT TO:<marc.pharmacien@{OURS}>");     t.s(r"530 5\.7\.0 Authentication required")


def test_trusted_remote_domain_is_accepted_for_submission(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = _session(gw, transcript)
    t.c(f"MAIL FROM:<claire.medecin@{OURS}>");     t.s(r"250 .*")
    t.c(f"RCPT TO:<dr.martin@{PEER_DOMAIN}>");     t.s(r"250 2\.1\.5 .*")


def test_spoofed_sender_is_refused(gw: GatewayThread, transcript: type[Transcript]) -> None:
    t = _session(gw, transcript)   # logged in as claire.medecin
    t.c(f"MAIL FROM:<marc.pharmacien@{OURS}>")
    t.s(rf"553 5\.7\.1 Sender address marc\.pharmacien@{OURS} is not owned by or delegated to claire\.medecin@{OURS}")
    t.c("MAIL FROM:<>");  t.s(r"553 5\.7\.1 An authenticated user cannot send with a null reverse-path")
    t.c(f"MAIL FROM:<secretariat.cardiologie@{OURS}>");  t.s(r"250 2\.1\.0 .*")   # delegated with "send"


def test_spoofed_sender_with_smtplib(gw: GatewayThread) -> None:
    pharmacist = gw.account("PER", 1)
    with logged_in(gw, pharmacist.address, pharmacist.password) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(f"claire.medecin@{OURS}", [f"sophie.infirmier@{OURS}"], message("x", "y"))
    assert refused.value.smtp_code == 553 and refused.value.smtp_error.startswith(b"5.7.1")


def test_closed_and_opposed_patients_receive_nothing(gw: GatewayThread, transcript: type[Transcript]) -> None:
    closed, opposed = gw.extra["closed_patient"], gw.extra["opposed_patient"]
    t = _session(gw, transcript)
    t.c(f"MAIL FROM:<claire.medecin@{OURS}>");  t.s(r"250 .*")
    t.c(f"RCPT TO:<{closed}>")
    t.s(rf"550 5\.2\.1 Mailbox {closed} is closed: this patient has closed their Mon espace santé space")
    t.c(f"RCPT TO:<{opposed}>")
    t.s(rf"550 5\.1\.1 No mailbox {opposed}: this patient has opposed Mon espace santé messaging")


def test_patient_writes_only_after_the_professional(gw: GatewayThread) -> None:
    doctor, nurse = gw.account("PER", 0), gw.account("PER", 2)
    patient = gw.account("PAT", 1)
    # 1. The patient cannot start a conversation.
    with logged_in(gw, patient.address, patient.password) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(patient.address, [nurse.address], message(patient.address, nurse.address))
    code, text = refused.value.recipients[nurse.address]
    assert code == 550 and text.startswith(b"5.7.1 A patient may only write to a professional who wrote to them first")
    # 2. The professional writes: the conversation opens, the patient may answer.
    with logged_in(gw, nurse.address, nurse.password) as client:
        client.sendmail(nurse.address, [patient.address], message(nurse.address, patient.address, "Vos résultats"))
    with logged_in(gw, patient.address, patient.password) as client:
        assert client.sendmail(patient.address, [nurse.address], message(patient.address, nurse.address, "Merci")) == {}
        # ... only to that professional, not to another one.
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail(patient.address, [doctor.address], message(patient.address, doctor.address))
    # 3. The professional ends the conversation with X-MSS-MES: FIN; the patient can no longer write.
    with logged_in(gw, nurse.address, nurse.password) as client:
        client.sendmail(nurse.address, [patient.address],
                        message(nurse.address, patient.address, "Fin", extra="X-MSS-MES: FIN\r\n"))
    with logged_in(gw, patient.address, patient.password) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail(patient.address, [nurse.address], message(patient.address, nurse.address))
    # 4. Writing again reopens it; a subject of exactly "[FIN]" closes it too (the older mechanism).
    with logged_in(gw, nurse.address, nurse.password) as client:
        client.sendmail(nurse.address, [patient.address], message(nurse.address, patient.address, "Reprise"))
    with logged_in(gw, patient.address, patient.password) as client:
        assert client.sendmail(patient.address, [nurse.address], message(patient.address, nurse.address)) == {}
    with logged_in(gw, nurse.address, nurse.password) as client:
        client.sendmail(nurse.address, [patient.address], message(nurse.address, patient.address, "[FIN]"))
    with logged_in(gw, patient.address, patient.password) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail(patient.address, [nurse.address], message(patient.address, nurse.address))


def test_patients_do_not_write_to_patients(gw: GatewayThread) -> None:
    first, second = gw.account("PAT", 0), gw.account("PAT", 1)
    with logged_in(gw, first.address, first.password) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(first.address, [second.address], message(first.address, second.address))
    assert refused.value.recipients[second.address][1].startswith(b"5.7.1 Patients cannot write to other patients")


def test_too_many_recipients(tmp_path_factory: pytest.TempPathFactory) -> None:
    gateway = GatewayThread(tmp_path_factory.mktemp("limits") / "data", overrides={"smtp": {"max_recipients": 2}}).start()
    try:
        doctor = gateway.account("PER")
        with logged_in(gateway, doctor.address, doctor.password) as client:
            client.mail(doctor.address)
            assert client.rcpt(f"marc.pharmacien@{OURS}")[0] == 250
            assert client.rcpt(f"sophie.infirmier@{OURS}")[0] == 250
            code, text = client.rcpt(f"secretariat.cardiologie@{OURS}")
            assert (code, text) == (452, b"4.5.3 Too many recipients (limit 2)")
    finally:
        gateway.stop()


def test_rate_limit_and_first_contact_exception(tmp_path_factory: pytest.TempPathFactory) -> None:
    gateway = GatewayThread(tmp_path_factory.mktemp("rates") / "data", overrides={"smtp": {
        "messages_per_minute_per_user": 2, "patient_first_contact": [f"marc.pharmacien@{OURS}"]}}).start()
    try:
        patient, pharmacist, doctor = gateway.account("PAT"), gateway.account("PER", 1), gateway.account("PER", 0)
        with logged_in(gateway, patient.address, patient.password) as client:
            # The pharmacy exception (mssante.md 2.1): no prior message needed for this address...
            assert client.sendmail(patient.address, [pharmacist.address], message(patient.address, pharmacist.address)) == {}
            # ...but only for it.
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail(patient.address, [doctor.address], message(patient.address, doctor.address))
            # Two transactions used the minute's allowance: the third is deferred, said as a rate.
            code, text = client.mail(patient.address)
        assert (code, text) == (450, f"4.7.1 Too many messages from {patient.address} (limit 2 per 60s); try again later".encode())
    finally:
        gateway.stop()

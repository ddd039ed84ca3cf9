"""Through ``gateway serve``: a professional reads a patient's record over HTTPS; the patient is told by mail."""

from __future__ import annotations

import imaplib
import ssl
import time
from email import message_from_bytes, policy

import httpx

from gateway.dmp_bridge.notify import ACCESS_SUBJECT, EMERGENCY_SUBJECT, HISTORY_PATH
from tests.harness import GatewayProcess


def _notices(gateway: GatewayProcess, patient: dict, deadline: float) -> list[bytes]:
    context = ssl.create_default_context(cafile=gateway.ca_file)
    while True:
        with imaplib.IMAP4("localhost", gateway.ports["imap_port"]) as imap:
            imap.starttls(ssl_context=context)
            imap.login(patient["address"], patient["password"])
            imap.select("INBOX", readonly=True)
            _, found = imap.search(None, "HEADER", "Auto-Submitted", "auto-generated")
            bodies = [imap.fetch(n, "(BODY.PEEK[])")[1][0][1] for n in found[0].split()]
        if bodies or time.monotonic() > deadline:
            return bodies
        time.sleep(0.2)


def test_record_read_over_https_notifies_the_patient_without_medical_content(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER")
    patient = gateway.account("PAT")
    url = f"https://localhost:{gateway.ports['http_port']}/fhir/DocumentReference"
    with httpx.Client(verify=ssl.create_default_context(cafile=gateway.ca_file), auth=(doctor["address"], doctor["password"])) as client:
        response = client.get(url, params={"patient.identifier": f"urn:oid:1.2.250.1.213.1.4.10|{patient['owner']}"})
    assert response.status_code == 200, response.text
    assert response.json()["resourceType"] == "Bundle"

    notices = _notices(gateway, patient, time.monotonic() + 30)
    assert len(notices) == 1, "exactly one content-free notice"
    notice = message_from_bytes(notices[0], policy=policy.default)
    assert notice["Subject"] == ACCESS_SUBJECT
    assert doctor["address"] not in notice.get_content()  # who read it is in the access history, not in the mail


def test_unauthenticated_record_call_is_refused(gateway: GatewayProcess) -> None:
    url = f"https://localhost:{gateway.ports['http_port']}/fhir/DocumentReference"
    with httpx.Client(verify=ssl.create_default_context(cafile=gateway.ca_file)) as client:
        response = client.get(url, params={"patient.identifier": "urn:oid:1.2.250.1.213.1.4.10|279035121518989"})
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"


def test_many_reads_make_one_notice_and_an_emergency_access_is_told_at_once(gateway: GatewayProcess) -> None:
    doctor = gateway.account("PER")
    patient = gateway.account("PAT")
    base = f"https://localhost:{gateway.ports['http_port']}"
    query = {"patient.identifier": f"urn:oid:1.2.250.1.213.1.4.10|{patient['owner']}"}
    with httpx.Client(verify=ssl.create_default_context(cafile=gateway.ca_file),
                      auth=(doctor["address"], doctor["password"])) as client:
        for _ in range(5):
            assert client.get(f"{base}/fhir/DocumentReference", params=query).status_code == 200
        first = _notices(gateway, patient, time.monotonic() + 30)
        assert len(first) == 1, "five reads, one notice"
        emergency = client.get(f"{base}/fhir/DocumentReference", params=query,
                               headers={"X-Emergency-Access-Reason": "urgence%20vitale"})
        assert emergency.status_code == 200
    deadline = time.monotonic() + 30
    notices = _notices(gateway, patient, deadline)
    while len(notices) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        notices = _notices(gateway, patient, deadline)
    subjects = sorted(str(message_from_bytes(n, policy=policy.default)["Subject"]) for n in notices)
    assert subjects == sorted([ACCESS_SUBJECT, EMERGENCY_SUBJECT])
    told = next(message_from_bytes(n, policy=policy.default) for n in notices
                if message_from_bytes(n, policy=policy.default)["Subject"] == EMERGENCY_SUBJECT)
    assert f"{base}{HISTORY_PATH}" in told.get_content() and "urgence vitale" not in told.get_content()

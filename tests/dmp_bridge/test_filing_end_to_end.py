"""End to end: a lab application submits CI-SIS documents over SMTP (STARTTLS, AUTH) to a real
``gateway serve``; a filing worker files them from the mail store; MDNs and the patient's
notification come back through the gateway's own queue and are read over IMAP.

The worker runs in the test process on the gateway's database, as a second node would
(jobs are leased, so it is also correct beside the worker ``gateway serve`` runs).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import imaplib
import json
import re
import secrets
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.app import Services
from gateway.dmp_bridge.acknowledgement import KO_PREFIX, NOTIFICATION_SUBJECT
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import RecordDocument
from gateway.dmp_bridge.worker import FilingWorker, build_filing_worker
from gateway.errors import NotFound
from gateway.security.pki import TestPKI
from tests.dmp_bridge.filing_world import SAMPLE_METADATA, SAMPLES, TEST_INS, message_with, sample
from tests.harness import GatewayProcess

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
PATIENCE = 60.0  # seconds before a wait gives up (a bound on a hang, not a timing assertion)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("filing-e2e") / "data",
                             extra_env={"GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"})
    process.start()
    yield process
    process.stop()


def _tls(served: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=served.ca_file)


def submit(served: GatewayProcess, message: EmailMessage, recipients: list[str]) -> None:
    lab = served.account("APP")
    with smtplib.SMTP("127.0.0.1", served.ports["smtp_submission_port"], local_hostname="labo.test", timeout=30) as smtp:
        smtp.starttls(context=_tls(served))
        smtp.login(lab["address"], lab["password"])
        smtp.send_message(message, from_addr=lab["address"], to_addrs=recipients)


def imap_messages(served: GatewayProcess, account: dict[str, str]) -> list[EmailMessage]:
    with imaplib.IMAP4("127.0.0.1", served.ports["imap_port"], timeout=30) as imap:
        imap.starttls(ssl_context=_tls(served))
        imap.login(account["address"], account["password"])
        status, _ = imap.select("INBOX", readonly=True)
        if status != "OK":
            return []  # nothing delivered yet: the mailbox is provisioned on its first delivery
        _, data = imap.uid("SEARCH", "ALL")
        messages = []
        for uid in data[0].split():
            _, fetched = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            raw = next(part[1] for part in fetched if isinstance(part, tuple))
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            messages.append(parsed)
        return messages


async def file_until(worker: FilingWorker, services: Services, message_id: str, copies: int) -> None:
    """Run filing passes until ``copies`` deliveries of ``message_id`` are filed or refused (the
    deliveries themselves happen in the gateway process)."""
    deadline = time.monotonic() + PATIENCE
    while await _finished_jobs(services, message_id) < copies:
        assert time.monotonic() < deadline, "deliveries were not filed in time"
        await worker.run_once()
        await asyncio.sleep(0.1)


async def _finished_jobs(services: Services, message_id: str) -> int:
    from sqlalchemy import func, select

    from gateway.dmp_bridge.tables import FilingJob
    async with services.db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(FilingJob).where(
            FilingJob.message_id == message_id, FilingJob.state.in_(("filed", "not-filed", "failed")))) or 0)


async def wait_for(predicate_source: object, check: object) -> list[EmailMessage]:
    deadline = time.monotonic() + PATIENCE
    while True:
        messages = await asyncio.to_thread(predicate_source)  # type: ignore[arg-type]
        if check(messages):  # type: ignore[operator]
            return messages  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"expected mail did not arrive: {[str(m['Subject']) for m in messages]}"
        await asyncio.sleep(0.2)


def _disposition(mdn: EmailMessage) -> str:
    part = next(p for p in mdn.walk() if p.get_content_type() == "message/disposition-notification")
    payload = part.get_payload()
    blocks = payload if isinstance(payload, list) else []
    return "\n".join(f"{name}: {' '.join(str(value).split())}" for block in blocks for name, value in block.items())


async def test_submitted_documents_are_filed_acknowledged_and_the_patient_notified(served: GatewayProcess,
                                                                                 services: Services) -> None:
    lab, doctor, patient = served.account("APP"), served.account("PER"), served.account("PAT")
    worker = build_filing_worker(services)
    message = message_with(("VAC-NOTE_2023.01.xml", sample("VAC-NOTE_2023.01.xml"), "text/xml"),
                           ("BIO_V1.xml", sample("BIO-CR-BIO_2021.01_Microbiologie_V1.xml"), "text/xml"),
                           sender=lab["address"], to=patient["address"], mdn_to=lab["address"],
                           subject="XDM/1.0/DDM+2 documents PAT-TROIS DOMINIQUE 28/03/1979")
    del message["Return-Path"]
    submit(served, message, [patient["address"], doctor["address"]])
    await file_until(worker, services, message["Message-ID"], 2)

    documents = await RecordStore(services.db, services.blobs).list_for_patient(TEST_INS)
    assert sorted(d.type_code or "" for d in documents) == ["11502-2", "87273-9"]
    assert {d.source_sender for d in documents} == {lab["address"]}
    assert {(d.depositor_kind, d.depositor_id, d.source_door) for d in documents} == {("organisation", lab["owner"],
                                                                                      "submission")}

    # Only the patient's copy feeds the record, so only it is acknowledged; the doctor's copy is just mail.
    mdns = await wait_for(lambda: imap_messages(served, lab), lambda ms: len(ms) >= 1)
    assert len(mdns) == 1 and all("; processed" in _disposition(m) for m in mdns)
    finals = sorted(line for m in mdns for line in _disposition(m).splitlines() if line.startswith("Final-Recipient"))
    assert finals == [f"Final-Recipient: rfc822;{patient['address']}"]
    inbox = await wait_for(lambda: imap_messages(served, patient),
                           lambda ms: any(str(m["Subject"]) == NOTIFICATION_SUBJECT for m in ms))
    assert sum(str(m["Subject"]) == NOTIFICATION_SUBJECT for m in inbox) == 1

    # The same message submitted again: delivered again, filed nothing new, acknowledged nothing twice.
    submit(served, message, [patient["address"]])
    await file_until(worker, services, message["Message-ID"], 3)
    assert len(await RecordStore(services.db, services.blobs).list_for_patient(TEST_INS)) == 2
    await asyncio.sleep(1.5)  # let the gateway's 1 s retry pass run: nothing new may appear
    assert len(imap_messages(served, lab)) == 1

    # BIO V2 supersedes V1 through the SMTP path too.
    version_two = message_with(("BIO_V2.xml", sample("BIO-CR-BIO_2021.01_Microbiologie_V2.xml"), "text/xml"),
                               sender=lab["address"], to=patient["address"], subject="[Annule et remplace] CR")
    submit(served, version_two, [patient["address"]])
    await file_until(worker, services, version_two["Message-ID"], 1)
    v1 = await RecordStore(services.db, services.blobs).get("1.2.250.1.213.1.1.1.55.2021.6.1")
    assert (v1.status, v1.superseded_by_unique_id) == ("superseded", "1.2.250.1.213.1.1.1.55.2021.6.2")


async def test_a_ccd_without_ins_is_delivered_reported_903_and_quarantined(served: GatewayProcess,
                                                                          services: Services, tmp_path: Path) -> None:
    lab, patient = served.account("APP"), served.account("PAT")
    worker = build_filing_worker(services)
    message = message_with(("sampleccd.xml", sample("sampleccd.xml"), "text/xml"), sender=lab["address"],
                           to=patient["address"], subject="CCD John Doe")
    del message["Return-Path"]
    submit(served, message, [patient["address"]])
    await file_until(worker, services, message["Message-ID"], 1)
    delivered = imap_messages(served, patient)
    assert any(str(m["Subject"]) == "CCD John Doe" for m in delivered)  # not filed, but delivered
    reports = await wait_for(lambda: imap_messages(served, lab),
                             lambda ms: any(str(m["Subject"]).startswith(f"{KO_PREFIX}[903]") for m in ms))
    assert any(str(m["Subject"]) == f"{KO_PREFIX}[903] CCD John Doe" for m in reports)
    listing = served.cli("record", "quarantine", "--json", check=True)
    entries = json.loads(listing.stdout)
    assert any(e["code"] == 903 and e["attachment"] == "sampleccd.xml" and e["label"] == "INS absent du document"
               for e in entries)
    shown = json.loads(served.cli("record", "list", "--patient", TEST_INS, "--json", check=True).stdout)
    assert all(d["patient"]["ins"] == TEST_INS for d in shown)


# --------------------------------------------------------------------------- S/MIME


def _openssl_cms(*arguments: str | Path, data: bytes) -> bytes:
    completed = subprocess.run(["openssl", "cms", *map(str, arguments)], input=data, capture_output=True, check=False)
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    return completed.stdout


def _fresh_cda(marker: str) -> tuple[bytes, str]:
    """The vaccination note with its own id and setId (a new document for the record)."""
    number = int(marker, 16)
    cda = sample("VAC-NOTE_2023.01.xml")
    cda = cda.replace(b'<id root="1.2.250.1.213.1.1.1.46.2023.1.1"/>', f'<id root="1.2.250.1.999.{number}.1"/>'.encode())
    cda = cda.replace(b'<setId root="1.2.250.1.213.1.1.1.46.2023.1"/>', f'<setId root="1.2.250.1.999.{number}"/>'.encode())
    return cda, f"1.2.250.1.999.{number}.1"


def _entity_with(cda: bytes) -> bytes:
    """The MIME entity a practice software would sign and encrypt: a text part and the CDA."""
    entity = EmailMessage(policy=email.policy.SMTP)
    entity.set_content("Veuillez trouver ci-joint le compte rendu.\n")
    entity.add_attachment(cda, maintype="text", subtype="xml", filename="VAC-NOTE.xml")
    del entity["MIME-Version"]
    return entity.as_bytes()


async def test_a_signed_cda_encrypted_to_the_patient_is_filed_from_the_decrypted_copy(served: GatewayProcess,
                                                                                    services: Services) -> None:
    lab, patient = served.account("APP"), served.account("PAT")
    pki = TestPKI.from_settings(services.settings)
    marker = secrets.token_hex(6)
    held = pki.issue_smime(patient["address"], "patient", "ec", name=f"dmp-patient-{marker}")
    imported = served.cli("smime", "cert", "import", patient["address"], str(held.cert_path), "--key",
                          str(held.key_path), "--hold-key")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    signer = pki.issue_smime(lab["address"], "labo", "ec", name=f"dmp-lab-{marker}")
    cda, unique_id = _fresh_cda(marker)
    subject = f"XDM/1.0/DDM+Note de vaccination {marker}"
    signed = _openssl_cms("-sign", "-signer", signer.cert_path, "-inkey", signer.key_path,
                          "-certfile", pki.intermediate_cert_path, data=_entity_with(cda))
    sealed = _openssl_cms("-encrypt", "-aes256", "-from", lab["address"], "-to", patient["address"],
                          "-subject", subject, "-recip", held.cert_path, data=signed)
    message_id = f"<{marker}@labo.test>"
    submit_raw(served, b"Message-ID: " + message_id.encode() + b"\r\n" + sealed, [patient["address"]])

    worker = build_filing_worker(services)
    await file_until(worker, services, message_id, 1)
    document = await RecordStore(services.db, services.blobs, services.fields).get(unique_id)
    assert document.patient_ins == TEST_INS and document.type_code == "87273-9"
    assert await RecordStore(services.db, services.blobs).read_content(document) == cda
    assert document.signature_result is not None
    assert "smime=pass" in document.signature_result and f"signer={lab['address']}" in document.signature_result


def submit_raw(served: GatewayProcess, raw: bytes, recipients: list[str]) -> None:
    lab = served.account("APP")
    with smtplib.SMTP("127.0.0.1", served.ports["smtp_submission_port"], local_hostname="labo.test", timeout=30) as smtp:
        smtp.starttls(context=_tls(served))
        smtp.login(lab["address"], lab["password"])
        # RFC 5321 2.3.8: on the wire every line ends with CRLF (openssl writes LF; the gateway refuses bare LF).
        smtp.sendmail(lab["address"], recipients, re.sub(rb"\r?\n", b"\r\n", raw))


async def _filed(services: Services, unique_id: str) -> RecordDocument | None:
    try:
        return await RecordStore(services.db, services.blobs).get(unique_id)
    except NotFound:
        return None


@pytest.mark.parametrize(("name", "unique_id", "type_code", "title", "idnps", "author", "profession", "created",
                          "version", "body"), SAMPLE_METADATA)
async def test_every_ci_sis_sample_submitted_by_smtp_is_filed_by_the_served_worker(
        served: GatewayProcess, services: Services, name: str, unique_id: str, type_code: str, title: str,
        idnps: str, author: str, profession: str, created: dt.datetime, version: int, body: str) -> None:
    """Through the real submission port into ``gateway serve``, whose own filing worker files it."""
    lab, patient = served.account("APP"), served.account("PAT")
    submit(served, message_with((name, sample(name), "text/xml"), sender=lab["address"], to=patient["address"],
                                subject=f"XDM/1.0/DDM+{type_code} PAT-TROIS DOMINIQUE 28/03/1979"),
           [patient["address"]])
    deadline = time.monotonic() + PATIENCE
    while (document := await _filed(services, unique_id)) is None:
        assert time.monotonic() < deadline, f"{name} was not filed by the gateway's worker"
        await asyncio.sleep(0.2)
    assert (document.patient_ins, document.type_code, document.title) == (TEST_INS, type_code, title)
    assert (document.author_idnps, document.author_name, document.author_profession_code) == (idnps, author, profession)
    assert (document.creation_time, document.version_number, document.body_kind) == (created, version, body)
    assert document.source_sender == lab["address"] and document.source_kind == "cda"
    assert await RecordStore(services.db, services.blobs).read_content(document) == sample(name)

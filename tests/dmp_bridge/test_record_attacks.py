"""The patient's record from the attacker's side, through a running ``gateway serve``.

Logged-in professionals submit over SMTP (STARTTLS + AUTH) to the real
submission port; ``gateway serve``'s own filing worker files what it accepts;
its reports come back over IMAP and the FHIR API is called over HTTPS. Each
test is an attack that worked before the record was bound to its depositor:

1. a pharmacist replaces (RPLC) a radiologist's report by naming the
   radiologist as author, or himself without an organisation, then hides it
   through the FHIR update;
2. a professional mails an IHE_XDM.ZIP to his own mailbox and it is filed into
   the record of the patient its METADATA names;
3. an XDM whose METADATA gives a patientId without the identity traits is filed;
4. an HTML page or a zip inside an XDM is filed as a document;
5. a professional named as author in a document someone else deposited reads it
   though the patient or its depositor masked it (the author is a claim).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import smtplib
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.app import Services
from gateway.dmp_bridge.acknowledgement import KO_PREFIX
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import FilingJob, FilingOutcome, RecordDocument
from tests.dmp_bridge.filing_world import BIO_V1, SAMPLES, TEST_INS, message_with, sample
from tests.dmp_bridge.xdm_builder import Entry, build_xdm
from tests.harness import GatewayProcess

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
PATIENCE = 60.0  # seconds before a wait gives up (a bound on a hang, not a timing assertion)
IMAGING = "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"
IMAGING_ID = "1.2.250.1.213.1.1.1.45.2024.2.1"
RADIOLOGIST_IDNPS = "801234560801"  # the author the imaging sample names (Jacques BIDEAULT)
PASSWORD = "radiologie-ambroise-2024"
PDF = b"%PDF-1.4\n1 0 obj<</Title (Compte rendu)>>endobj\ntrailer<</Info 1 0 R>>\n%%EOF\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("record-attacks") / "data",
                             extra_env={"GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"})
    process.init_demo()
    process.cli("directory", "add", "professional", "--idnps", RADIOLOGIST_IDNPS, "--family-name", "BIDEAULT",
                "--given-name", "Jacques", "--profession", "10", check=True)
    address = f"radiologue@{process.account('PER')['address'].split('@')[1]}"
    process.cli("mailbox", "create", address, "--type", "PER", "--owner", RADIOLOGIST_IDNPS, check=True)
    process.cli("mailbox", "set-password", address, "--password", PASSWORD, check=True)
    process.start()
    yield process
    process.stop()


def radiologist(served: GatewayProcess) -> dict[str, Any]:
    return {"address": f"radiologue@{served.account('PER')['address'].split('@')[1]}", "password": PASSWORD,
            "owner": RADIOLOGIST_IDNPS}


def pharmacist(served: GatewayProcess) -> dict[str, Any]:
    account = served.account("PER", 1)
    assert "pharmacien" in account["address"]
    return account


def _tls(served: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=served.ca_file)


def submit(served: GatewayProcess, account: dict[str, Any], message: EmailMessage, recipients: list[str]) -> str:
    """Submit as ``account`` (AUTH on the submission port); the Message-ID to wait for."""
    del message["Return-Path"]
    with smtplib.SMTP("127.0.0.1", served.ports["smtp_submission_port"], local_hostname="poste.test", timeout=30) as smtp:
        smtp.starttls(context=_tls(served))
        smtp.login(account["address"], account["password"])
        smtp.send_message(message, from_addr=account["address"], to_addrs=recipients)
    return str(message["Message-ID"])


async def filed_jobs(services: Services, message_id: str, copies: int = 1) -> list[FilingJob]:
    """Wait until ``gateway serve``'s own worker finished ``copies`` jobs of ``message_id``."""
    deadline = time.monotonic() + PATIENCE
    while True:
        async with services.db.session() as session:
            jobs = list((await session.scalars(select(FilingJob).where(
                FilingJob.message_id == message_id, FilingJob.state.in_(("filed", "not-filed", "failed"))))).all())
        if len(jobs) >= copies:
            return jobs
        assert time.monotonic() < deadline, f"{message_id} was not filed in time"
        await asyncio.sleep(0.2)


async def outcomes(services: Services, job: FilingJob) -> list[FilingOutcome]:
    async with services.db.session() as session:
        return list((await session.scalars(select(FilingOutcome).where(FilingOutcome.job_id == job.id)
                                           .order_by(FilingOutcome.id))).all())


async def in_record(services: Services, unique_id: str) -> RecordDocument | None:
    async with services.db.session() as session:
        return await session.scalar(select(RecordDocument).where(RecordDocument.unique_id == unique_id))


def subjects(served: GatewayProcess, account: dict[str, Any]) -> list[str]:
    with imaplib.IMAP4("127.0.0.1", served.ports["imap_port"], timeout=30) as imap:
        imap.starttls(ssl_context=_tls(served))
        imap.login(account["address"], account["password"])
        status, _ = imap.select("INBOX", readonly=True)
        if status != "OK":
            return []
        _, data = imap.uid("SEARCH", "ALL")
        found = []
        for uid in data[0].split():
            _, fetched = imap.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            raw = next(part[1] for part in fetched if isinstance(part, tuple))
            found.append(str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"]))
        return found


async def report_arrives(served: GatewayProcess, account: dict[str, Any], prefix: str) -> str:
    deadline = time.monotonic() + PATIENCE
    while True:
        found = [s for s in await asyncio.to_thread(subjects, served, account) if s.startswith(prefix)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no report {prefix!r} for {account['address']}"
        await asyncio.sleep(0.2)


def fhir(served: GatewayProcess, account: dict[str, Any]) -> httpx.Client:
    return httpx.Client(base_url=f"https://localhost:{served.ports['http_port']}/fhir", verify=_tls(served),
                        auth=(account["address"], account["password"]), timeout=30)


def forged_version(*, author_idnps: str | None, marker: int) -> bytes:
    """The imaging report as version 3 replacing the filed version 2 (RPLC), with no representedOrganization
    in the author, naming ``author_idnps`` as the author (else the radiologist, as the original)."""
    text = sample(IMAGING).decode("utf-8")
    text = text.replace(f'<id root="{IMAGING_ID}"/>', f'<id root="1.2.250.1.999.66.{marker}"/>', 1)
    text = text.replace('<versionNumber value="2"/>', '<versionNumber value="3"/>', 1)
    text = text.replace('<id root="90E1C8EC-F951-4B26-A305-A34848818DD6"/>', f'<id root="{IMAGING_ID}"/>', 1)
    author_start = text.index("<author>")
    organisation_start = text.index("<representedOrganization>", author_start)
    organisation_end = text.index("</representedOrganization>", organisation_start) + len("</representedOrganization>")
    text = text[:organisation_start] + text[organisation_end:]
    if author_idnps is not None:
        text = text.replace(f'extension="{RADIOLOGIST_IDNPS}"', f'extension="{author_idnps}"', 1)
    assert "Centre de radiologie Ambroise" not in text[author_start:text.index("</author>")]
    return text.encode("utf-8")


def security_label_change(current: dict[str, Any], code: str) -> dict[str, Any]:
    labels = [*current.get("securityLabel", []),
              {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.13", "code": code}]}]
    return {**current, "securityLabel": labels}


async def test_a_pharmacist_cannot_replace_nor_hide_a_radiologists_report(served: GatewayProcess,
                                                                         services: Services) -> None:
    patient, thief, owner = served.account("PAT"), pharmacist(served), radiologist(served)
    original = message_with((IMAGING, sample(IMAGING), "text/xml"), sender=owner["address"], to=patient["address"],
                            subject="XDM/1.0/DDM+CR d'imagerie PAT-TROIS DOMINIQUE 28/03/1979")
    [job] = await filed_jobs(services, submit(served, owner, original, [patient["address"]]))
    filed = await in_record(services, IMAGING_ID)
    assert job.state == "filed" and filed is not None
    assert (filed.depositor_kind, filed.depositor_id, filed.source_sender) == ("professional", RADIOLOGIST_IDNPS,
                                                                               owner["address"])

    # The forged V3: one names the radiologist as author, the other the pharmacist himself; neither has an organisation.
    forgery = message_with(("v3-radiologue.xml", forged_version(author_idnps=None, marker=1), "text/xml"),
                           ("v3-pharmacien.xml", forged_version(author_idnps=thief["owner"], marker=2), "text/xml"),
                           sender=thief["address"], to=patient["address"], subject="[Annule et remplace] CR imagerie")
    [job] = await filed_jobs(services, submit(served, thief, forgery, [patient["address"]]))
    assert job.state == "not-filed" and job.result_code == 901
    assert [(o.outcome, o.code) for o in await outcomes(services, job)] == [("refused", 901), ("refused", 901)]
    assert await in_record(services, "1.2.250.1.999.66.1") is None and await in_record(services, "1.2.250.1.999.66.2") is None
    assert (await RecordStore(services.db, services.blobs).get(IMAGING_ID)).status == "current"
    assert await report_arrives(served, thief, f"{KO_PREFIX}[901]")

    # The FHIR update (status, securityLabel) is the depositor's: the pharmacist's is refused.
    document_id = str(filed.id)
    with fhir(served, thief) as client:
        current = client.get(f"/DocumentReference/{document_id}")
        hidden = security_label_change(current.json(), "INVISIBLE_PATIENT") if current.status_code == 200 else {}
        response = client.put(f"/DocumentReference/{document_id}", json=hidden or {"resourceType": "DocumentReference"})
        superseded = client.put(f"/DocumentReference/{document_id}", json={**current.json(), "status": "superseded"})
    assert (response.status_code, superseded.status_code) == (403, 403)
    if current.status_code == 200:
        assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "update-reserved-to-depositor"
    unchanged = await RecordStore(services.db, services.blobs).get(IMAGING_ID)
    assert (unchanged.status, unchanged.invisible_to_patient) == ("current", False)

    # The radiologist who deposited it still may.
    with fhir(served, owner) as client:
        current = client.get(f"/DocumentReference/{document_id}").json()
        response = client.put(f"/DocumentReference/{document_id}", json=security_label_change(current, "MASQUE_PS"))
    assert response.status_code == 200, response.text
    assert (await RecordStore(services.db, services.blobs).get(IMAGING_ID)).masked_to_professionals is True


def _fresh_cda(marker: str) -> tuple[bytes, str]:
    """The microbiology report V1 with an id and setId of its own."""
    cda = sample(BIO_V1).replace(b'<id root="1.2.250.1.213.1.1.1.55.2021.6.1"/>',
                                 f'<id root="1.2.250.1.999.77.{marker}"/>'.encode())
    cda = cda.replace(b'<setId root="1.2.250.1.213.1.1.1.55.2021.6"/>', f'<setId root="1.2.250.1.999.78.{marker}"/>'.encode())
    assert f"1.2.250.1.999.77.{marker}".encode() in cda
    return cda, f"1.2.250.1.999.77.{marker}"


def xdm_message(entries: list[Entry], account: dict[str, Any], to: str, subject: str) -> EmailMessage:
    return message_with(("IHE_XDM.ZIP", build_xdm(entries), "application/zip"), sender=account["address"], to=to,
                        subject=f"XDM/1.0/DDM+{subject} PAT-TROIS DOMINIQUE 28/03/1979")


async def test_an_xdm_mailed_to_a_professionals_own_mailbox_is_not_filed(served: GatewayProcess,
                                                                       services: Services) -> None:
    sender = served.account("PER", 2)
    cda, unique_id = _fresh_cda("1")
    entries = [Entry("Document01", "DOC0001.XML", cda, unique_id=unique_id, format_code="urn:asip:ci-sis:cr-bio:2021"),
               Entry("Document02", "DOC0002.PDF", PDF, mime_type="application/pdf", unique_id="1.2.250.1.999.77.101")]
    message = xdm_message(entries, sender, sender["address"], "CR d'examens biologiques")
    [job] = await filed_jobs(services, submit(served, sender, message, [sender["address"]]))
    assert job.state == "not-filed" and job.documents_filed == 0 and job.patient_id is None
    assert await in_record(services, unique_id) is None and await in_record(services, "1.2.250.1.999.77.101") is None
    assert len(await RecordStore(services.db, services.blobs).list_for_patient(TEST_INS)) <= 1  # the imaging report at most


async def test_xdm_metadata_without_identity_traits_is_refused_905_and_with_other_traits_904(
        served: GatewayProcess, services: Services) -> None:
    lab, patient = served.account("APP"), served.account("PAT")
    bare = [Entry("Document01", "DOC0001.PDF", PDF, mime_type="application/pdf", unique_id="1.2.250.1.999.88.1",
                  patient_info=None)]
    [job] = await filed_jobs(services, submit(served, lab, xdm_message(bare, lab, patient["address"], "CR"),
                                              [patient["address"]]))
    assert (job.state, job.result_code) == ("not-filed", 905)
    [outcome] = await outcomes(services, job)
    assert "birth family name, first given name, birth date, sex missing" in (outcome.reason or "")
    assert await in_record(services, "1.2.250.1.999.88.1") is None
    assert await report_arrives(served, lab, f"{KO_PREFIX}[905]")

    other = [Entry("Document01", "DOC0001.PDF", PDF + b"%2\n", mime_type="application/pdf",
                   unique_id="1.2.250.1.999.88.2",
                   patient_info=("PID-5|DUPONT^DOMINIQUE^^^^^L", "PID-7|19790328", "PID-8|F"))]
    [job] = await filed_jobs(services, submit(served, lab, xdm_message(other, lab, patient["address"], "CR"),
                                              [patient["address"]]))
    assert (job.state, job.result_code) == ("not-filed", 904)
    assert await in_record(services, "1.2.250.1.999.88.2") is None


async def test_an_html_page_or_a_zip_inside_an_xdm_is_refused_906_with_its_reason(served: GatewayProcess,
                                                                                 services: Services) -> None:
    lab, patient = served.account("APP"), served.account("PAT")
    html = b"<html><body><script>fetch('/fhir/DocumentReference')</script>Compte rendu</body></html>"
    inner_zip = build_xdm([Entry("Document01", "DOC0001.PDF", PDF, mime_type="application/pdf")])
    entries = [Entry("Document01", "DOC0001.HTM", html, mime_type="text/html", unique_id="1.2.250.1.999.99.1"),
               Entry("Document02", "DOC0002.ZIP", inner_zip, mime_type="application/zip",
                     unique_id="1.2.250.1.999.99.2")]
    [job] = await filed_jobs(services, submit(served, lab, xdm_message(entries, lab, patient["address"], "CR"),
                                              [patient["address"]]))
    assert (job.state, job.result_code) == ("not-filed", 906)
    refused = await outcomes(services, job)
    assert [(o.outcome, o.code) for o in refused] == [("refused", 906), ("refused", 906)]
    assert "an HTML page" in (refused[0].reason or "") and "a zip archive" in (refused[1].reason or "")
    assert all("not a format the record holds" in (o.reason or "") for o in refused)
    assert await in_record(services, "1.2.250.1.999.99.1") is None and await in_record(services, "1.2.250.1.999.99.2") is None
    assert await report_arrives(served, lab, f"{KO_PREFIX}[906]")


def naming_as_author(author_idnps: str, marker: int) -> tuple[bytes, str]:
    """The imaging report as a new document of its own (first version, no RPLC) naming ``author_idnps`` as author."""
    text = sample(IMAGING).decode("utf-8")
    unique_id = f"1.2.250.1.999.88.{marker}"
    text = text.replace(f'<id root="{IMAGING_ID}"/>', f'<id root="{unique_id}"/>', 1)
    text = text.replace('<setId root="1.2.250.1.213.1.1.1.45.2024.2"/>', f'<setId root="1.2.250.1.999.89.{marker}"/>', 1)
    text = text.replace('<versionNumber value="2"/>', '<versionNumber value="1"/>', 1)
    related = text.index('<relatedDocument typeCode="RPLC">')
    text = text[:related] + text[text.index("</relatedDocument>", related) + len("</relatedDocument>"):]
    text = text.replace(f'extension="{RADIOLOGIST_IDNPS}"', f'extension="{author_idnps}"', 1)
    return text.encode("utf-8"), unique_id


async def test_a_professional_named_as_author_by_someone_else_does_not_read_a_masked_document(
        served: GatewayProcess, services: Services) -> None:
    """The claimed author opens nothing: only who deposited it (the gateway's own fact) keeps sight of a masked one."""
    patient, named, owner = served.account("PAT"), pharmacist(served), radiologist(served)
    cda, unique_id = naming_as_author(named["owner"], marker=1)
    message = message_with(("cr-imagerie.xml", cda, "text/xml"), sender=owner["address"], to=patient["address"],
                           subject="XDM/1.0/DDM+CR d'imagerie PAT-TROIS DOMINIQUE 28/03/1979")
    [job] = await filed_jobs(services, submit(served, owner, message, [patient["address"]]))
    filed = await in_record(services, unique_id)
    assert job.state == "filed" and filed is not None
    assert (filed.author_idnps, filed.depositor_id) == (named["owner"], RADIOLOGIST_IDNPS)

    document_id = str(filed.id)
    with fhir(served, owner) as client:
        current = client.get(f"/DocumentReference/{document_id}")
        assert current.status_code == 200, current.text
        masked = client.put(f"/DocumentReference/{document_id}", json=security_label_change(current.json(), "MASQUE_PS"))
        assert masked.status_code == 200, masked.text
        assert client.get(f"/DocumentReference/{document_id}").status_code == 200   # the depositor still sees it
    with fhir(served, named) as client:
        direct = client.get(f"/DocumentReference/{document_id}")
        content = client.get(f"/Binary/{document_id}")
        listed = client.get("/DocumentReference", params={"patient.identifier": f"urn:oid:1.2.250.1.213.1.4.8|{TEST_INS}"})
    assert (direct.status_code, content.status_code) == (404, 404), (direct.text, content.text)
    assert unique_id not in listed.text

"""file_into_record on SQLite and PostgreSQL: the CI-SIS samples, idempotence, versions, refusals."""

from __future__ import annotations

import datetime as dt
import hashlib
from email.message import EmailMessage
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Connection, text

from gateway.config import Settings
from gateway.directory.identifiers import add_luhn_key, add_nir_key
from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.record import RecordStore, describe_document
from gateway.dmp_bridge.tables import DocumentStatus, OutcomeKind
from gateway.storage.db import Database, alembic_config
from tests.dmp_bridge.filing_world import (
    BIO_V1,
    BIO_V2,
    LAB_ADDRESS,
    PARIS,
    PRO_DOMAIN,
    SAMPLE_METADATA,
    OTHER_INS,
    SAMPLES,
    TEST_INS,
    World,
    build_world,
    cda_message,
    message_with,
    reparse,
    sample,
)
from tests.dmp_bridge.xdm_builder import Entry, build_xdm, metadata_xml

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")

@pytest.fixture
async def world(database: Database, settings: Settings) -> World:
    return await build_world(database, settings)




@pytest.mark.parametrize(("name", "unique_id", "type_code", "title", "idnps", "author", "profession", "created",
                          "version", "body"), SAMPLE_METADATA)
async def test_each_ci_sis_sample_is_filed_with_its_metadata(world: World, name: str, unique_id: str, type_code: str,
                                                             title: str, idnps: str, author: str, profession: str,
                                                             created: dt.datetime, version: int, body: str) -> None:
    report = await world.file(reparse(cda_message(name)), delivery_key="q1:1")
    assert [o.outcome for o in report.outcomes] == [OutcomeKind.FILED]
    document = await RecordStore(world.db, world.blobs).get(unique_id)
    assert (document.patient_ins, document.type_code, document.type_code_system) == (TEST_INS, type_code, "2.16.840.1.113883.6.1")
    assert (document.title, document.author_idnps, document.author_name) == (title, idnps, author)
    assert (document.author_profession_code, document.creation_time, document.version_number) == (profession, created, version)
    assert (document.confidentiality_code, document.status, document.body_kind) == ("N", "current", body)
    assert document.source_delivery_key == "q1:1" and document.source_kind == "cda"
    content = await RecordStore(world.db, world.blobs).read_content(document)
    assert content == sample(name)
    assert (document.sha1, document.sha256, document.size) == (hashlib.sha1(content).hexdigest(),
                                                               hashlib.sha256(content).hexdigest(), len(content))


async def test_level_one_pdf_cda_gets_the_xds_sd_format_and_its_facility(world: World) -> None:
    await world.file(cda_message("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"))
    document = await RecordStore(world.db, world.blobs).get("1.2.250.1.213.1.1.1.45.2024.2.1")
    described = describe_document(document)
    assert described["format"] == {"code": "urn:ihe:iti:xds-sd:pdf:2008", "system": "1.3.6.1.4.1.19376.1.2.3", "display": None}
    assert described["facility_type"]["code"] == "SA08" and described["practice_setting"]["code"] == "AMBULATOIRE"
    assert described["custodian"] == {"idnst": "1750803447", "name": "Centre de radiologie Ambroise"}
    assert described["service_start"] == dt.datetime(2021, 1, 8, 10, 25, tzinfo=PARIS)
    # The RPLC parent is in no record and the setId has no earlier version: filed as current, parent noted.
    assert described["status"] == "current" and described["replaces"] == "90E1C8EC-F951-4B26-A305-A34848818DD6"


async def test_production_ins_sample_is_refused_under_either_policy(world: World) -> None:
    refused = await world.file(cda_message("CSE-MDE_2023.01.xml"))
    assert refused.first_refusal is not None and refused.first_refusal.code == IntegrationCode.INS_ABSENT
    assert "accept_production" in (refused.first_refusal.reason or "")
    # Accepted as a root, its fictitious NIR still fails the key check: present but invalid (904), not absent.
    accepted = await world.file(cda_message("CSE-MDE_2023.01.xml"), accept_production=True)
    assert accepted.first_refusal is not None and accepted.first_refusal.code == IntegrationCode.INS_MISMATCH
    assert "key" in (accepted.first_refusal.reason or "")


async def test_the_same_message_twice_files_once(world: World) -> None:
    message = cda_message(BIO_V1)
    first = await world.file(message, delivery_key="q1:1")
    second = await world.file(message, delivery_key="q2:1")
    assert [o.outcome for o in first.outcomes] == [OutcomeKind.FILED]
    assert [o.outcome for o in second.outcomes] == [OutcomeKind.DUPLICATE]
    assert len(await RecordStore(world.db, world.blobs).list_for_patient(TEST_INS)) == 1


async def test_a_rerun_of_the_same_delivery_counts_its_documents_as_filed(world: World) -> None:
    message = cda_message(BIO_V1)
    await world.file(message, delivery_key="q1:1")
    again = await world.file(message, delivery_key="q1:1")
    assert [o.outcome for o in again.outcomes] == [OutcomeKind.FILED]


async def test_same_set_id_and_version_under_another_id_is_a_duplicate(world: World) -> None:
    await world.file(cda_message(BIO_V1))
    renamed = sample(BIO_V1).replace(b'1.2.250.1.213.1.1.1.55.2021.6.1"', b'1.2.250.1.213.1.1.1.55.2021.6.99"')
    report = await world.file(message_with(("bio.xml", renamed, "text/xml")))
    assert [o.outcome for o in report.outcomes] == [OutcomeKind.DUPLICATE]


async def test_bio_v2_supersedes_v1_although_its_parent_id_is_not_v1s(world: World) -> None:
    await world.file(cda_message(BIO_V1))
    report = await world.file(cda_message(BIO_V2))
    assert report.filed[0].reason == "replaces 1.2.250.1.213.1.1.1.55.2021.6.1"
    store = RecordStore(world.db, world.blobs)
    v1, v2 = await store.get("1.2.250.1.213.1.1.1.55.2021.6.1"), await store.get("1.2.250.1.213.1.1.1.55.2021.6.2")
    assert (v1.status, v1.superseded_by_unique_id) == ("superseded", v2.unique_id)
    assert (v2.status, v2.replaces_unique_id, v2.version_number) == ("current", v1.unique_id, 2)
    current = await store.list_for_patient(TEST_INS, include_superseded=False)
    assert [d.unique_id for d in current] == [v2.unique_id]


async def test_an_older_version_arriving_late_is_filed_already_superseded(world: World) -> None:
    await world.file(cda_message(BIO_V2))
    await world.file(cda_message(BIO_V1))
    v1 = await RecordStore(world.db, world.blobs).get("1.2.250.1.213.1.1.1.55.2021.6.1")
    assert (v1.status, v1.superseded_by_unique_id) == (DocumentStatus.SUPERSEDED.value, "1.2.250.1.213.1.1.1.55.2021.6.2")


async def test_a_replacement_behind_a_newer_version_is_refused_900(world: World) -> None:
    version_three = (sample(BIO_V1).replace(b'55.2021.6.1"', b'55.2021.6.3"')
                     .replace(b'<versionNumber value="1"', b'<versionNumber value="3"'))
    assert b'value="3"' in version_three
    await world.file(message_with(("v3.xml", version_three, "text/xml")))
    report = await world.file(cda_message(BIO_V2))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.WRONG_VERSION


async def test_a_replacement_by_another_depositor_is_refused_901_whatever_author_it_names(world: World) -> None:
    await world.file(cda_message(BIO_V1))
    # The doctor's mailbox deposits a V2 naming the original's author and organisation: the names prove nothing.
    report = await world.file(cda_message(BIO_V2), sender=world.doctor_address)
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.AUTHOR_NOT_ALLOWED
    assert "deposited by another sender" in (report.first_refusal.reason or "")
    v1 = await RecordStore(world.db, world.blobs).get("1.2.250.1.213.1.1.1.55.2021.6.1")
    assert v1.status == "current"


async def test_the_depositor_replaces_its_document_whoever_the_new_version_names_as_author(world: World) -> None:
    await world.file(cda_message(BIO_V1))
    other_author = sample(BIO_V2).replace(b"801234534765", b"801234567897").replace(b"1120459876", b"1750803447")
    report = await world.file(message_with(("v2.xml", other_author, "text/xml")))
    assert report.filed and report.filed[0].reason == "replaces 1.2.250.1.213.1.1.1.55.2021.6.1"
    v2 = await RecordStore(world.db, world.blobs).get("1.2.250.1.213.1.1.1.55.2021.6.2")
    assert (v2.author_idnps, v2.depositor_kind, v2.depositor_id) == ("801234567897", "organisation", world.lab_idnst)
    assert v2.depositor_organisations == [world.lab_idnst] and v2.source_sender == LAB_ADDRESS


async def test_a_professional_of_the_depositing_organisation_may_replace(world: World) -> None:
    await world.file(cda_message(BIO_V1))
    biologist = await world.directory.add_professional(id_type="RPPS", id_value=add_luhn_key("1000000077"),
                                                       family_name="BIOLOGISTE", profession_code="21",
                                                       organisations=[world.lab_idnst])
    box = await world.directory.create_mailbox(address=f"biologiste@{PRO_DOMAIN}", type="PER", owner=biologist["idnps"])
    report = await world.file(cda_message(BIO_V2), sender=box["address"])
    assert report.filed and report.filed[0].reason == "replaces 1.2.250.1.213.1.1.1.55.2021.6.1"


async def test_a_late_older_version_from_another_depositor_is_refused_901(world: World) -> None:
    await world.file(cda_message(BIO_V2))
    report = await world.file(cda_message(BIO_V1), sender=world.doctor_address)
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.AUTHOR_NOT_ALLOWED


async def test_nothing_is_filed_without_a_depositor(world: World) -> None:
    report = await world.file(cda_message("VAC-NOTE_2023.01.xml"), sender=world.patient_address)
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.OTHER
    assert not report.in_record and "deposit" in (report.first_refusal.reason or "")


async def test_us_ccd_without_ins_is_refused_903(world: World) -> None:
    report = await world.file(cda_message("sampleccd.xml"))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.INS_ABSENT
    assert not report.in_record


async def test_unknown_ins_is_refused_902(world: World) -> None:
    unknown = sample("VAC-NOTE_2023.01.xml").replace(TEST_INS.encode(), add_nir_key("2790351215190").encode())
    report = await world.file(message_with(("vac.xml", unknown, "text/xml")))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.UNKNOWN_PATIENT


async def test_traits_that_differ_from_the_directory_are_refused_904(world: World) -> None:
    await world.directory.update_patient(TEST_INS, birth_family_name="DUPONT")
    report = await world.file(cda_message("VAC-NOTE_2023.01.xml"))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.INS_MISMATCH
    assert "birth family name" in (report.first_refusal.reason or "")


@pytest.mark.parametrize("state", ["opposed", "closed"])
async def test_nothing_is_filed_for_a_patient_who_opposed_or_closed(world: World, state: str) -> None:
    await world.directory.update_patient(TEST_INS, state=state)
    report = await world.file(cda_message("VAC-NOTE_2023.01.xml"))
    assert report.first_refusal is not None and state in (report.first_refusal.reason or "")
    assert not report.in_record


async def test_a_cda_about_another_patient_is_not_filed_from_a_patient_mailbox(world: World) -> None:
    other = sample("VAC-NOTE_2023.01.xml").replace(TEST_INS.encode(), OTHER_INS.encode())
    report = await world.file(message_with(("vac.xml", other, "text/xml")), to_patient_mailbox=True)
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.INS_MISMATCH
    assert "mailbox" in (report.first_refusal.reason or "")


PDF = b"%PDF-1.4\n1 0 obj<</Title (Compte rendu)>>endobj\ntrailer<</Info 1 0 R>>\n%%EOF\n"


async def test_a_plain_pdf_is_filed_for_the_patient_whose_mailbox_received_it(world: World) -> None:
    to_doctor = await world.file(message_with(("cr.pdf", PDF, "application/pdf")), to_patient_mailbox=False)
    assert [o.outcome for o in to_doctor.outcomes] == [OutcomeKind.SKIPPED]
    to_patient = await world.file(message_with(("cr.pdf", PDF, "application/pdf")), to_patient_mailbox=True)
    again = await world.file(message_with(("cr.pdf", PDF, "application/pdf")), to_patient_mailbox=True)
    assert [o.outcome for o in to_patient.outcomes] == [OutcomeKind.FILED]
    assert [o.outcome for o in again.outcomes] == [OutcomeKind.DUPLICATE]
    document = await RecordStore(world.db, world.blobs).get(to_patient.outcomes[0].unique_id or "")
    assert document.unique_id.startswith("2.25.") and document.body_kind == "pdf" and document.mime_type == "application/pdf"


async def test_xdm_files_its_cda_and_skips_the_signature_and_the_pdf_beside_it(world: World) -> None:
    cda = sample(BIO_V1)
    entries = [Entry("Document01", "DOC0001.XML", cda, unique_id="1.2.250.1.213.1.1.1.55.2021.6.1",
                     format_code="urn:asip:ci-sis:cr-bio:2021"),
               Entry("Signature01", "SIGN.XML", b"<Signature xmlns='http://www.w3.org/2000/09/xmldsig#'/>",
                     format_code="http://www.w3.org/2000/09/xmldsig#", type_code="E1762")]
    package = build_xdm(entries, metadata=metadata_xml(entries, signs=("Signature01", "SubmissionSet01")))
    message = message_with(("IHE_XDM.ZIP", package, "application/zip"), ("cr.pdf", PDF, "application/pdf"),
                           subject="XDM/1.0/DDM+CR d'examens biologiques PAT-TROIS DOMINIQUE 28/03/1979")
    report = await world.file(reparse(message))
    assert sorted(o.outcome.value for o in report.outcomes) == ["filed", "skipped", "skipped"]
    document = await RecordStore(world.db, world.blobs).get("1.2.250.1.213.1.1.1.55.2021.6.1")
    assert (document.source_kind, document.class_code, document.format_code) == ("xdm", "11", "urn:asip:ci-sis:cr-bio:2021")
    assert document.submission_set_unique_id == "1.2.250.1.999.1"
    assert document.type_code == "11502-2" and document.title == "Compte rendu d'examens biologiques"  # the CDA wins


async def test_an_xdm_pdf_entry_is_filed_from_its_metadata(world: World) -> None:
    entries = [Entry("Document01", "DOC0001.PDF", PDF, mime_type="application/pdf", unique_id="1.2.250.1.999.77")]
    message = message_with(("IHE_XDM.ZIP", build_xdm(entries), "application/zip"))
    report = await world.file(reparse(message))
    assert [o.outcome for o in report.outcomes] == [OutcomeKind.FILED]
    described = describe_document(await RecordStore(world.db, world.blobs).get("1.2.250.1.999.77"))
    assert described["author"]["idnps"] == "801234534765" and described["author"]["name"] == "Marcel CAMPARINI"
    assert described["author"]["organisation"] == {"idnst": "11120459876", "name": "Laboratoire des charmes"}
    assert described["author"]["profession"]["code"] == "G15_10/SM03"
    assert described["created"] == dt.datetime(2021, 1, 4, 15, 5, 27, tzinfo=dt.timezone.utc)
    assert described["class"]["code"] == "11" and described["security_labels"] == ["N"]


async def test_a_broken_attachment_is_reported_906_and_the_rest_is_filed(world: World, tmp_path: Path) -> None:
    message = message_with(("broken.xml", b"<ClinicalDocument xmlns='urn:hl7-org:v3'><id", "text/xml"),
                           ("vac.xml", sample("VAC-NOTE_2023.01.xml"), "text/xml"))
    report = await world.file(reparse(message))
    assert [o.outcome for o in report.outcomes] == [OutcomeKind.REFUSED, OutcomeKind.FILED]
    assert report.outcomes[0].code == IntegrationCode.OTHER


def _downgrade_to_before_the_depositor(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, "0009")


async def test_the_migration_gives_earlier_documents_the_depositor_of_their_envelope_sender(world: World) -> None:
    await world.file(cda_message("VAC-NOTE_2023.01.xml"))
    await world.file(cda_message(BIO_V1), sender=world.doctor_address)
    async with world.db.engine.begin() as connection:
        await connection.run_sync(_downgrade_to_before_the_depositor)
    async with world.db.session() as session:  # filed before the revision, by a sender the directory no longer has
        await session.execute(text("INSERT INTO record_documents (unique_id, patient_id, patient_ins, patient_ins_oid, "
                                   "status, event_codes, authors, confidentiality_code, confidentiality, "
                                   "masked_to_professionals, invisible_to_patient, invisible_to_legal_representatives, "
                                   "body_kind, mime_type, size, sha1, sha256, blob_id, source_kind, source_sender) "
                                   "VALUES ('1.2.250.1.999.5', :patient, :ins, '1.2.250.1.213.1.4.10', 'current', '[]', "
                                   "'[]', 'N', '[]', false, false, false, 'pdf', 'application/pdf', 1, 'x', 'x', 'x', "
                                   "'pdf', 'gone@example.org')"), {"patient": world.patient_id, "ins": TEST_INS})
    await world.db.migrate()
    store = RecordStore(world.db, world.blobs)
    vaccination, bio = await store.get("1.2.250.1.213.1.1.1.46.2023.1.1"), await store.get("1.2.250.1.213.1.1.1.55.2021.6.1")
    assert (vaccination.depositor_kind, vaccination.depositor_id) == ("organisation", world.lab_idnst)
    assert vaccination.depositor_organisations == [world.lab_idnst]
    doctor_idnps = (await world.directory.show_mailbox(world.doctor_address))["owner"]
    assert (bio.depositor_kind, bio.depositor_id, bio.depositor_organisations) == ("professional", doctor_idnps, [])
    unknown = await store.get("1.2.250.1.999.5")
    assert (unknown.depositor_kind, unknown.depositor_id) == (None, None)  # matches nobody: never replaceable


def _xdm(entries: list[Entry], *, patient_id: str | None = None) -> EmailMessage:
    metadata = metadata_xml(entries, patient_id=patient_id) if patient_id is not None else None
    return reparse(message_with(("IHE_XDM.ZIP", build_xdm(entries, metadata=metadata), "application/zip")))


async def test_an_xdm_cda_whose_metadata_names_another_patient_is_refused_904(world: World) -> None:
    entries = [Entry("Document01", "DOC0001.XML", sample(BIO_V1), unique_id="1.2.250.1.213.1.1.1.55.2021.6.1")]
    report = await world.file(_xdm(entries, patient_id=f"{OTHER_INS}^^^&1.2.250.1.213.1.4.10&ISO^NH"))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.INS_MISMATCH
    assert "contradicts itself" in (report.first_refusal.reason or "") and not report.in_record


async def test_an_xdm_entry_with_an_unreadable_birth_date_is_refused_905(world: World) -> None:
    entries = [Entry("Document01", "DOC0001.PDF", PDF, mime_type="application/pdf", unique_id="1.2.250.1.999.40",
                     patient_info=("PID-5|PAT-TROIS^DOMINIQUE^^^^^L", "PID-7|28/03/1979", "PID-8|F"))]
    report = await world.file(_xdm(entries))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.INS_INCOMPLETE


@pytest.mark.parametrize(("content", "what"), [
    (b"<?xml version='1.0'?><html xmlns='http://www.w3.org/1999/xhtml'><body>CR</body></html>", "an HTML page"),
    (b"<Report><Text>CR</Text></Report>", "an XML document that is not a CDA"),
    (b"MZ\x90\x00\x03\x00\x00\x00", "content of an unknown format"),
])
async def test_an_xdm_entry_the_record_does_not_hold_is_refused_906(world: World, content: bytes, what: str) -> None:
    entries = [Entry("Document01", "DOC0001.DAT", content, mime_type="application/pdf", unique_id="1.2.250.1.999.41")]
    report = await world.file(_xdm(entries))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.OTHER
    assert what in (report.first_refusal.reason or "") and "declared as 'application/pdf'" in report.first_refusal.reason
    assert not report.in_record


async def test_a_level_one_cda_with_an_html_body_is_refused_906(world: World) -> None:
    html_body = sample("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml").replace(b'mediaType="application/pdf"',
                                                                         b'mediaType="text/html"')
    report = await world.file(reparse(message_with(("img.xml", html_body, "text/xml"))))
    assert report.first_refusal is not None and report.first_refusal.code == IntegrationCode.OTHER
    assert "'text/html' is not a format the record holds" in (report.first_refusal.reason or "")


async def test_a_dicom_object_in_an_xdm_is_filed_as_dicom(world: World) -> None:
    dicom = b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"
    entries = [Entry("Document01", "KOS_1_1.DCM", dicom, mime_type="text/html", unique_id="1.2.250.1.999.42")]
    report = await world.file(_xdm(entries))
    assert [o.outcome for o in report.outcomes] == [OutcomeKind.FILED]
    document = await RecordStore(world.db, world.blobs).get("1.2.250.1.999.42")
    assert (document.body_kind, document.mime_type) == ("dicom", "application/octet-stream")  # not the declared text/html


async def test_an_xdm_mailed_to_a_professional_files_nothing_whatever_patient_it_names(world: World) -> None:
    entries = [Entry("Document01", "DOC0001.XML", sample(BIO_V1), unique_id="1.2.250.1.213.1.1.1.55.2021.6.1")]
    report = await world.file(_xdm(entries), to_patient_mailbox=False, sender=world.doctor_address)
    assert [o.outcome for o in report.outcomes] == [OutcomeKind.SKIPPED] and not report.in_record

"""The patient's own record from the webmail's service layer (SQLite and PostgreSQL): documents, controls, export,
closing; and the professional's FHIR reads that the controls change."""

from __future__ import annotations

import datetime as dt
import io
import zipfile

import pytest
from sqlalchemy import update

from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.access_history import AccessHistory
from gateway.dmp_bridge.fhir.server import record_access_from
from gateway.dmp_bridge.narrative import ReadableKind
from gateway.dmp_bridge.notice_tables import NoticeFrequency
from gateway.dmp_bridge.patient_export import PatientExport
from gateway.dmp_bridge.patient_space import DocumentFilter, PatientCaller, PatientControls, PatientDocuments
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import RecordDocument
from gateway.errors import Conflict, NotFound, UserError
from gateway.mailstore.delivery import LocalDelivery
from gateway.retention import shred_expired_patients
from gateway.security.at_rest import SealedDataError
from gateway.security.keys import KeyDestroyed
from gateway.storage.models import Patient, PatientState
from tests.dmp_bridge.filing_world import OTHER_INS, TEST_INS
from tests.fhir.world import BIO_V1_ID, IMAGING_ID, PASSWORD, PATIENT_QUERY, PSYCHIATRY_ID, VACCINATION_ID, FhirWorld

ME = PatientCaller(TEST_INS, "DOMINIQUE PAT-TROIS", "127.0.0.1")
SOMEONE_ELSE = PatientCaller(OTHER_INS, "PAUL MARTIN", "127.0.0.1")


def _documents(fhir: FhirWorld) -> PatientDocuments:
    access, _audit = record_access_from(fhir.world, fhir.settings, audit=fhir.audit, notifier=fhir.notifier)
    return PatientDocuments(access)


def _controls(fhir: FhirWorld) -> PatientControls:
    return PatientControls(fhir.world.db, fhir.choices, fhir.world.directory, retention_days=30)


async def test_the_record_lists_every_document_with_superseded_versions_marked(fhir: FhirWorld) -> None:
    listing = await _documents(fhir).listing(ME)
    assert listing.total == listing.matching == 5 and len(listing.documents) == 5
    first_page = await _documents(fhir).listing(ME, offset=0, limit=2)
    second_page = await _documents(fhir).listing(ME, offset=2, limit=2)
    assert [d.unique_id for d in first_page.documents + second_page.documents] == \
        [d.unique_id for d in listing.documents][:4] and first_page.matching == 5
    statuses = {d.unique_id: d.status for d in listing.documents}
    assert statuses[BIO_V1_ID] == "superseded" and statuses[IMAGING_ID] == "current"
    assert {t.code for t in listing.types} == {"87273-9", "68599-0", "11502-2", "18748-4"}
    assert all(d.title for d in listing.documents), "titles are unsealed"
    typed = await _documents(fhir).listing(ME, DocumentFilter(type_code="11502-2"))
    assert [d.unique_id for d in typed.documents] == [d.unique_id for d in listing.documents
                                                      if d.type_code == "11502-2"] and len(typed.documents) == 2
    current = await _documents(fhir).listing(ME, DocumentFilter(include_superseded=False))
    assert BIO_V1_ID not in {d.unique_id for d in current.documents} and len(current.documents) == 4
    nothing = await _documents(fhir).listing(ME, DocumentFilter(since=dt.date(2100, 1, 1)))
    assert nothing.documents == [] and nothing.types == listing.types


async def test_opening_a_document_is_audited_and_notifies_nobody(fhir: FhirWorld) -> None:
    opened = await _documents(fhir).open(ME, fhir.documents[IMAGING_ID])
    assert opened.readable.kind == ReadableKind.PDF and opened.readable.pdf is not None
    cda = await _documents(fhir).open(ME, fhir.documents[VACCINATION_ID])
    assert cda.readable.kind == ReadableKind.SECTIONS and cda.readable.sections
    reads = await fhir.audit.search(patient=TEST_INS, events=[AuditEvent.DOCUMENT_CONTENT_READ])
    assert {(r.actor.kind, r.actor.id, r.source.door) for r in reads} == {("patient", TEST_INS, "webmail")}
    assert fhir.notifier.sent == [], "the patient reading their own record is not told about it"


async def test_another_patients_document_is_missing_and_the_attempt_audited(fhir: FhirWorld) -> None:
    with pytest.raises(NotFound):
        await _documents(fhir).open(SOMEONE_ELSE, fhir.documents[IMAGING_ID])
    with pytest.raises(NotFound):
        await _documents(fhir).open(ME, "999999")
    with pytest.raises(NotFound):
        await _documents(fhir).open(ME, "../1")
    refused = await fhir.audit.search(events=[AuditEvent.ACCESS_REFUSED])
    assert any(r.actor.id == OTHER_INS and r.outcome.reason == "other-patient" for r in refused)
    assert (await _documents(fhir).listing(SOMEONE_ELSE)).documents == []


async def test_a_document_invisible_to_the_patient_does_not_exist_for_them(fhir: FhirWorld) -> None:
    async with fhir.world.db.session() as session:
        await session.execute(update(RecordDocument).where(RecordDocument.unique_id == PSYCHIATRY_ID)
                              .values(invisible_to_patient=True))
    listing = await _documents(fhir).listing(ME)
    assert PSYCHIATRY_ID not in {d.unique_id for d in listing.documents}
    with pytest.raises(NotFound):
        await _documents(fhir).open(ME, fhir.documents[PSYCHIATRY_ID])


async def test_hiding_blocking_and_refusing_emergency_access_change_what_professionals_read(fhir: FhirWorld) -> None:
    controls = _controls(fhir)
    await controls.hide(ME, IMAGING_ID)
    async with fhir.client("doctor") as client:
        assert (await client.get(f"/Binary/{fhir.documents[IMAGING_ID]}")).status_code == 404
    await controls.unhide(ME, IMAGING_ID)
    async with fhir.client("doctor") as client:
        assert (await client.get(f"/Binary/{fhir.documents[IMAGING_ID]}")).status_code == 200
    state = await controls.state(ME)
    doctor = next(p for p in state.blockable if p.id == fhir.people.idnps["doctor"])
    assert doctor.name == "Dr Claire MEDECIN" and doctor.profession == "médecin"
    await controls.block(ME, doctor.id)
    async with fhir.client("doctor") as client:
        assert (await client.get("/DocumentReference", params={"patient.identifier": PATIENT_QUERY})).status_code == 403
    assert [p.id for p in (await controls.state(ME)).blocked] == [doctor.id]
    await controls.set_emergency_access(ME, allowed=False)
    async with fhir.client("traitant") as client:  # a physician, who could otherwise break the glass
        response = await client.get("/DocumentReference", params={"patient.identifier": PATIENT_QUERY},
                                    headers={"X-Emergency-Access-Reason": "urgence"})
    assert response.status_code == 403 and "emergency-access-opposed" in response.text
    assert (await controls.state(ME)).emergency_access_opposed
    events = [e.event_code for e in await fhir.audit.search(patient=TEST_INS, limit=1000)]
    for event in (AuditEvent.DOCUMENT_HIDDEN, AuditEvent.DOCUMENT_UNHIDDEN, AuditEvent.PROFESSIONAL_BLOCKED,
                  AuditEvent.EMERGENCY_ACCESS_OPPOSED):
        assert event in events


async def test_controls_refuse_what_is_not_this_patients(fhir: FhirWorld) -> None:
    controls = _controls(fhir)
    with pytest.raises(NotFound):
        await controls.hide(SOMEONE_ELSE, IMAGING_ID)  # another patient's document
    with pytest.raises(NotFound):
        await controls.block(ME, "899999999999")


async def test_notification_preferences_are_checked_and_audited(fhir: FhirWorld) -> None:
    controls = _controls(fhir)
    with pytest.raises(UserError) as refused:
        await controls.set_notifications(ME, address="moi@gmail.com", frequency="weekly")
    assert refused.value.field == "address"
    with pytest.raises(UserError):
        await controls.set_notifications(ME, address="", frequency="hourly")
    await controls.set_notifications(ME, address=f"  {fhir.people.addresses['patient'].upper()} ", frequency="weekly")
    chosen = await controls.notifications(ME)
    assert chosen.address == fhir.people.addresses["patient"] and chosen.frequency == NoticeFrequency.WEEKLY
    [entry] = await fhir.audit.search(patient=TEST_INS, events=[AuditEvent.NOTIFICATION_PREFERENCES_CHANGED])
    assert entry.details == {"own_mailbox": False, "frequency": "weekly"}


async def test_export_holds_messages_documents_and_history(fhir: FhirWorld) -> None:
    patient_box = (await fhir.world.directory.account(fhir.people.addresses["patient"]))
    assert patient_box is not None
    await LocalDelivery(fhir.world.mailstore).deliver(
        patient_box.mailbox_id, b"From: a@b.fr\r\nSubject: Bonjour\r\n\r\nCorps du message\r\n", delivery_key="x:1")
    access, _audit = record_access_from(fhir.world, fhir.settings, audit=fhir.audit)
    store = RecordStore(fhir.world.db, fhir.world.blobs)
    export = PatientExport(access, store, fhir.world.mailstore, AccessHistory(fhir.world.db, fhir.audit, store))
    chunks = [chunk async for chunk in await export.stream(ME, [patient_box.mailbox_id], lambda item: item.event.name)]
    archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    names = archive.namelist()
    assert "messages/INBOX/1.eml" in names and b"Corps du message" in archive.read("messages/INBOX/1.eml")
    documents = [name for name in names if name.startswith("documents/") and not name.endswith(".csv")]
    assert len(documents) == 5
    index = archive.read("documents/index.csv").decode("utf-8")
    assert "remplacé par une version plus récente" in index
    assert "RECORD_EXPORTED" in archive.read("historique.txt").decode() and archive.testzip() is None
    [entry] = await fhir.audit.search(patient=TEST_INS, events=[AuditEvent.RECORD_EXPORTED])
    assert entry.details["documents"] == 5 and entry.actor.id == TEST_INS


async def test_closing_the_space_stops_sign_in_and_leads_to_shredding(fhir: FhirWorld) -> None:
    controls = _controls(fhir)
    address = fhir.people.addresses["patient"]
    assert await fhir.world.directory.authenticate(address, PASSWORD) is not None
    shred_at = await controls.close_space(ME)
    assert await fhir.world.directory.authenticate(address, PASSWORD) is None
    with pytest.raises(Conflict):
        await controls.close_space(ME)
    async with fhir.world.db.session() as session:
        patient = await session.get(Patient, fhir.world.patient_id)
        assert patient is not None and patient.state == PatientState.CLOSED.value
    [entry] = await fhir.audit.search(patient=TEST_INS, events=[AuditEvent.SPACE_CLOSED])
    assert entry.details == {"retention_days": 30}
    assert await shred_expired_patients(fhir.world.db, fhir.world.keys, 30) == [], "not before the retention"
    shredded = await shred_expired_patients(fhir.world.db, fhir.world.keys, 30, now=shred_at + dt.timedelta(minutes=1))
    assert [space.ins for space in shredded] == [TEST_INS]
    with pytest.raises((KeyDestroyed, SealedDataError)):
        store = RecordStore(fhir.world.db, fhir.world.blobs)
        await store.read_content(await store.get(IMAGING_ID))

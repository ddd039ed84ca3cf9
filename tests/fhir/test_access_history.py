"""The patient's access history from the audit log of real FHIR calls (SQLite and PostgreSQL): who (named from
the directory), what (this record's document titles, unsealed), refusals and emergency accesses with their reasons."""

from __future__ import annotations

from gateway.audit.chain import Actor, Door, Source, Subject
from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.access_history import AccessHistory
from gateway.dmp_bridge.record import RecordStore
from tests.dmp_bridge.filing_world import OTHER_INS, TEST_INS
from tests.fhir.world import BIO_V1_ID, IMAGING_ID, PATIENT_QUERY, PSYCHIATRY_ID, FhirWorld


def _history(fhir: FhirWorld) -> AccessHistory:
    return AccessHistory(fhir.world.db, fhir.audit, RecordStore(fhir.world.db, fhir.world.blobs))


async def test_a_professionals_read_names_them_and_the_document(fhir: FhirWorld) -> None:
    async with fhir.client("doctor") as client:
        assert (await client.get(f"/Binary/{fhir.documents[IMAGING_ID]}")).status_code == 200
    page = await _history(fhir).page(TEST_INS)
    read = next(item for item in page.items if item.event == AuditEvent.DOCUMENT_CONTENT_READ)
    title = (await RecordStore(fhir.world.db, fhir.world.blobs).get(IMAGING_ID)).title
    assert title and read.document_title == title and read.document_id == IMAGING_ID
    assert (read.actor.name, read.actor.profession, read.door) == ("Dr Claire MEDECIN", "médecin", "fhir")
    assert read.operation == "binary" and not read.refused and not read.emergency
    assert page.items == sorted(page.items, key=lambda item: item.seq, reverse=True), "newest first"


async def test_refusals_and_emergency_accesses_say_why(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    await fhir.choices.block_professional(TEST_INS, fhir.people.idnps["pharmacist"], actor=actor, source=source)
    async with fhir.client("pharmacist") as client:
        assert (await client.get("/DocumentReference", params={"patient.identifier": PATIENT_QUERY})).status_code == 403
    reason = "Patient inconscient aux urgences"
    async with fhir.client("traitant") as client:  # a physician: main reserves emergency access to them
        response = await client.get(f"/Binary/{fhir.documents[PSYCHIATRY_ID]}",
                                    headers={"X-Emergency-Access-Reason": reason.replace(" ", "%20")})
        assert response.status_code == 200
    items = (await _history(fhir).page(TEST_INS)).items
    refused = next(item for item in items if item.event == AuditEvent.ACCESS_REFUSED)
    assert refused.refused and refused.refusal_reason == "blocked-by-patient" and refused.operation == "search"
    assert (refused.actor.name, refused.actor.profession) == ("Test PHARMACIEN", "pharmacien")
    blocked = next(item for item in items if item.event == AuditEvent.PROFESSIONAL_BLOCKED)
    assert blocked.actor.is_patient and blocked.professional_subject is not None
    assert blocked.professional_subject.name == "Test PHARMACIEN"
    emergency = next(item for item in items if item.event == AuditEvent.EMERGENCY_ACCESS)
    assert emergency.emergency and emergency.emergency_reason == reason and emergency.document_title


async def test_the_history_never_shows_another_patients_events(fhir: FhirWorld) -> None:
    """Attack: entries about another patient, even naming one of this patient's documents, never appear."""
    doctor = Actor.professional(fhir.people.idnps["doctor"], "Dr Claire MEDECIN", "10")
    await fhir.audit.append(AuditEvent.DOCUMENT_CONTENT_READ, actor=doctor, patient=OTHER_INS,
                            source=Source(Door.FHIR, "127.0.0.1"), subject=Subject.document(BIO_V1_ID))
    await fhir.audit.append(AuditEvent.ACCESS_REFUSED, actor=doctor, patient=None,
                            source=Source(Door.FHIR, "127.0.0.1"), subject=Subject.document(BIO_V1_ID))
    mine = await _history(fhir).page(TEST_INS, limit=1000)
    assert all(item.event != AuditEvent.DOCUMENT_CONTENT_READ for item in mine.items)
    assert all(item.event != AuditEvent.ACCESS_REFUSED for item in mine.items)
    theirs = await _history(fhir).page(OTHER_INS)
    [only] = theirs.items
    assert only.document_title is None, "another record's title is never unsealed for them"


async def test_pages_follow_each_other_without_overlap(fhir: FhirWorld) -> None:
    async with fhir.client("doctor") as client:
        for unique_id in (IMAGING_ID, BIO_V1_ID, PSYCHIATRY_ID, IMAGING_ID, BIO_V1_ID):
            await client.get(f"/DocumentReference/{fhir.documents[unique_id]}")
    history = _history(fhir)
    first = await history.page(TEST_INS, limit=3)
    assert first.next_before is not None and len(first.items) == 3
    second = await history.page(TEST_INS, limit=3, before=first.next_before)
    assert {item.seq for item in first.items}.isdisjoint({item.seq for item in second.items})
    assert max(item.seq for item in second.items) < min(item.seq for item in first.items)

"""The patient's choices service on SQLite and PostgreSQL: each choice stored, checked and audited."""

from __future__ import annotations

import pytest

from gateway.audit.events import AuditEvent
from gateway.errors import Conflict, NotFound
from tests.dmp_bridge.filing_world import TEST_INS
from tests.fhir.world import VACCINATION_ID, FhirWorld


async def test_hide_block_oppose_are_stored_and_audited(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    choices = fhir.choices
    await choices.hide_document(TEST_INS, VACCINATION_ID, actor=actor, source=source)
    await choices.hide_document(TEST_INS, VACCINATION_ID, actor=actor, source=source)  # idempotent
    await choices.block_professional(TEST_INS, fhir.people.idnps["dentist"], actor=actor, source=source)
    await choices.oppose_emergency_access(TEST_INS, actor=actor, source=source)
    state = await choices.choices(TEST_INS)
    assert state.hidden_documents == {VACCINATION_ID} and state.blocked_professionals == {fhir.people.idnps["dentist"]}
    assert state.emergency_access_opposed
    await choices.unhide_document(TEST_INS, VACCINATION_ID, actor=actor, source=source)
    await choices.unblock_professional(TEST_INS, fhir.people.idnps["dentist"], actor=actor, source=source)
    await choices.allow_emergency_access(TEST_INS, actor=actor, source=source)
    state = await choices.choices(TEST_INS)
    assert not state.hidden_documents and not state.blocked_professionals and not state.emergency_access_opposed
    events = [entry.event_code for entry in await fhir.audit.entries_for_patient(TEST_INS, limit=100)]
    for event in (AuditEvent.DOCUMENT_HIDDEN, AuditEvent.DOCUMENT_UNHIDDEN, AuditEvent.PROFESSIONAL_BLOCKED,
                  AuditEvent.PROFESSIONAL_UNBLOCKED, AuditEvent.EMERGENCY_ACCESS_OPPOSED,
                  AuditEvent.EMERGENCY_ACCESS_OPPOSITION_LIFTED):
        assert int(event) in events


async def test_the_treating_doctor_is_a_doctor_and_cannot_be_blocked(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    with pytest.raises(Conflict):
        await fhir.choices.set_treating_doctor(TEST_INS, fhir.people.idnps["dentist"])
    await fhir.choices.set_treating_doctor(TEST_INS, fhir.people.idnps["traitant"])
    with pytest.raises(Conflict):
        await fhir.choices.block_professional(TEST_INS, fhir.people.idnps["traitant"], actor=actor, source=source)
    await fhir.choices.block_professional(TEST_INS, fhir.people.idnps["doctor"], actor=actor, source=source)
    with pytest.raises(Conflict):
        await fhir.choices.set_treating_doctor(TEST_INS, fhir.people.idnps["doctor"])
    assert (await fhir.choices.choices(TEST_INS)).treating_doctor_idnps == fhir.people.idnps["traitant"]


async def test_unknown_patient_document_or_professional(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    with pytest.raises(NotFound):
        await fhir.choices.hide_document(TEST_INS, "1.2.3.4.5", actor=actor, source=source)
    with pytest.raises(NotFound):
        await fhir.choices.block_professional(TEST_INS, "810000000011", actor=actor, source=source)
    with pytest.raises(NotFound):
        await fhir.choices.oppose_emergency_access("185077505612331", actor=actor, source=source)

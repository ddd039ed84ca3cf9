"""The FHIR API from the attacker's side: no credentials, bad certificates, the matrix, the patient's choices."""

from __future__ import annotations

import httpx
import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.tables import RecordDocument
from gateway.storage.models import Certificate, Patient, PatientState
from sqlalchemy import update

from gateway.storage.models import utcnow
from tests.dmp_bridge.filing_world import OTHER_INS, TEST_INS
from tests.fhir.world import (
    BIO_V1_ID,
    IMAGING_ID,
    PASSWORD,
    PATIENT_QUERY,
    PSYCHIATRY_ID,
    VACCINATION_ID,
    FhirWorld,
)

SEARCH = {"patient.identifier": PATIENT_QUERY}


def refusal_code(response: httpx.Response) -> str:
    outcome = OperationOutcome.model_validate(response.json())
    details = outcome.issue[0].details
    assert details is not None and details.coding
    return str(details.coding[0].code)


def found_ids(fhir: FhirWorld, response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    by_fhir_id = {fhir_id: unique for unique, fhir_id in fhir.documents.items()}
    return {by_fhir_id[entry["resource"]["id"]] for entry in response.json().get("entry", [])}


async def audited(fhir: FhirWorld, event: AuditEvent, *, patient: str | None = TEST_INS) -> list[dict[str, object]]:
    entries = await fhir.audit.search(patient=patient, events=[event], limit=100)
    return [{"actor": e.actor.id, "reason": e.outcome.reason, "details": e.details,
             "subject": e.subject.id if e.subject else None} for e in entries]


async def test_no_credentials_is_401_with_a_challenge_and_audited(fhir: FhirWorld) -> None:
    async with fhir.client() as client:
        response = await client.get("/DocumentReference", params=SEARCH)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic ")
    assert OperationOutcome.model_validate(response.json()).issue[0].code == "login"
    refusals = await fhir.audit.search(events=[AuditEvent.ACCESS_REFUSED])
    assert any(entry.outcome.reason == "unauthenticated" for entry in refusals)


async def test_wrong_password_is_401(fhir: FhirWorld) -> None:
    async with fhir.client("doctor", password=PASSWORD + "x") as client:
        response = await client.get(f"/Binary/{fhir.documents[VACCINATION_ID]}")
    assert response.status_code == 401


async def test_a_certificate_bound_to_no_mailbox_is_401(fhir: FhirWorld) -> None:
    stranger = fhir.pki.issue_client("stranger", "Stranger")
    async with fhir.client(certificate=stranger) as client:
        response = await client.get("/DocumentReference", params=SEARCH)
    assert response.status_code == 401


async def test_a_certificate_revoked_in_the_directory_is_401(fhir: FhirWorld) -> None:
    issued = fhir.pki.issue_client("doctor-card", "Claire MEDECIN")
    await fhir.world.directory.register_certificate(fhir.people.addresses["doctor"], issued.certificate_pem, usage="auth")
    async with fhir.client(certificate=issued) as client:
        assert (await client.get("/DocumentReference", params=SEARCH)).status_code == 200
    async with fhir.world.db.session() as session:
        await session.execute(update(Certificate).where(Certificate.fingerprint_sha256 == issued.fingerprint_sha256)
                              .values(revoked_at=utcnow()))
    async with fhir.client(certificate=issued) as client:
        assert (await client.get("/DocumentReference", params=SEARCH)).status_code == 401


async def test_a_certificate_on_the_crl_fails_the_handshake(fhir: FhirWorld) -> None:
    """The listener loads the CRLs at start: a certificate revoked before never gets an HTTP answer."""
    assert fhir.listener is not None
    revoked = fhir.pki.issue_client("revoked-card", "Revoked")
    await fhir.world.directory.register_certificate(fhir.people.addresses["doctor"], revoked.certificate_pem, usage="auth")
    fhir.pki.revoke("revoked-card", "keyCompromise")
    await fhir.listener.aclose()
    from gateway.dmp_bridge.fhir.server import start_http_listener
    from tests.fhir.world import Services
    fhir.listener = await start_http_listener(Services(fhir.world.db, fhir.world.blobs, fhir.world.directory, fhir.pki),
                                              fhir.settings, audit=fhir.audit, notifier=fhir.notifier)
    async with fhir.client(certificate=revoked) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/DocumentReference", params=SEARCH)


async def test_a_dentist_does_not_see_the_psychiatry_summary(fhir: FhirWorld) -> None:
    async with fhir.client("dentist") as client:
        listed = found_ids(fhir, await client.get("/DocumentReference", params=SEARCH))
        direct = await client.get(f"/DocumentReference/{fhir.documents[PSYCHIATRY_ID]}")
        content = await client.get(f"/Binary/{fhir.documents[PSYCHIATRY_ID]}")
    assert PSYCHIATRY_ID not in listed and VACCINATION_ID in listed
    assert direct.status_code == 403 and refusal_code(direct) == "not-in-matrix"
    assert content.status_code == 403
    refusals = await audited(fhir, AuditEvent.ACCESS_REFUSED)
    assert {"actor": fhir.people.idnps["dentist"], "reason": "not-in-matrix", "details": {"operation": "read"},
            "subject": PSYCHIATRY_ID} in refusals
    searches = await audited(fhir, AuditEvent.RECORD_SEARCHED)
    assert searches[0]["details"]["withheld"] == {"not-in-matrix": 1}  # type: ignore[index]


async def test_a_closed_space_is_read_by_no_professional(fhir: FhirWorld) -> None:
    async with fhir.world.db.session() as session:
        await session.execute(update(Patient).where(Patient.ins == TEST_INS).values(state=PatientState.CLOSED.value))
        await session.commit()
    async with fhir.client("dentist") as client:
        listed = await client.get("/DocumentReference", params=SEARCH)
        direct = await client.get(f"/DocumentReference/{fhir.documents[VACCINATION_ID]}")
        content = await client.get(f"/Binary/{fhir.documents[VACCINATION_ID]}")
    assert listed.status_code == 403 and refusal_code(listed) == "record-closed"
    assert direct.status_code == 403 and content.status_code == 403
    refusals = await audited(fhir, AuditEvent.ACCESS_REFUSED)
    assert any(entry["reason"] == "record-closed" for entry in refusals)


async def test_a_pharmacist_sees_biology_not_imaging(fhir: FhirWorld) -> None:
    async with fhir.client("pharmacist") as client:
        listed = found_ids(fhir, await client.get("/DocumentReference", params=SEARCH))
    assert "1.2.250.1.213.1.1.1.55.2021.6.2" in listed or any("55.2021" in i for i in listed)
    assert IMAGING_ID not in listed and PSYCHIATRY_ID not in listed


async def test_a_profession_outside_the_matrix_sees_nothing(fhir: FhirWorld) -> None:
    async with fhir.client("nobody") as client:
        response = await client.get("/DocumentReference", params=SEARCH)
    assert found_ids(fhir, response) == set() and response.json()["total"] == 0


async def test_a_blocked_professional_gets_nothing(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    await fhir.choices.block_professional(TEST_INS, fhir.people.idnps["doctor"], actor=actor, source=source)
    async with fhir.client("doctor") as client:
        search = await client.get("/DocumentReference", params=SEARCH)
        read = await client.get(f"/DocumentReference/{fhir.documents[VACCINATION_ID]}")
        content = await client.get(f"/Binary/{fhir.documents[VACCINATION_ID]}")
    assert search.status_code == 403 and refusal_code(search) == "blocked-by-patient"
    assert read.status_code == 403 and content.status_code == 403
    assert len([r for r in await audited(fhir, AuditEvent.ACCESS_REFUSED) if r["reason"] == "blocked-by-patient"]) == 3


async def test_a_blocked_author_does_not_see_even_their_own_document(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    await fhir.choices.block_professional(TEST_INS, fhir.people.idnps["author"], actor=actor, source=source)
    async with fhir.client("author") as client:
        assert (await client.get(f"/DocumentReference/{fhir.documents[VACCINATION_ID]}")).status_code == 403


async def test_a_hidden_document_is_absent_and_404_but_its_author_and_the_treating_doctor_see_it(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    await fhir.choices.hide_document(TEST_INS, VACCINATION_ID, actor=actor, source=source)
    await fhir.choices.set_treating_doctor(TEST_INS, fhir.people.idnps["traitant"])
    hidden_id = fhir.documents[VACCINATION_ID]
    async with fhir.client("doctor") as client:
        assert VACCINATION_ID not in found_ids(fhir, await client.get("/DocumentReference", params=SEARCH))
        read = await client.get(f"/DocumentReference/{hidden_id}")
        missing = await client.get("/DocumentReference/999999")
        assert (read.status_code, missing.status_code) == (404, 404)
        assert read.json() == missing.json()  # nothing tells a hidden document from a missing one
        assert (await client.get(f"/Binary/{hidden_id}")).status_code == 404
    for who in ("author", "traitant"):
        async with fhir.client(who) as client:
            assert VACCINATION_ID in found_ids(fhir, await client.get("/DocumentReference", params=SEARCH))
            assert (await client.get(f"/Binary/{hidden_id}")).status_code == 200


async def test_masque_ps_set_by_the_author_hides_the_document_from_other_professionals(fhir: FhirWorld) -> None:
    target = fhir.documents[VACCINATION_ID]
    async with fhir.client("author") as client:
        current = (await client.get(f"/DocumentReference/{target}")).json()
        current["securityLabel"].append({"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.13", "code": "MASQUE_PS"}]})
        response = await client.put(f"/DocumentReference/{target}", json=current)
    assert response.status_code == 200, response.text
    async with fhir.client("doctor") as client:
        assert (await client.get(f"/DocumentReference/{target}")).status_code == 404
    async with fhir.client("patient") as client:
        assert (await client.get(f"/DocumentReference/{target}")).status_code == 200  # the patient still sees it
    assert await audited(fhir, AuditEvent.DOCUMENT_METADATA_UPDATED)


async def test_invisible_patient_documents_are_concealed_from_the_patient(fhir: FhirWorld) -> None:
    async with fhir.world.db.session() as session:
        await session.execute(update(RecordDocument).where(RecordDocument.unique_id == IMAGING_ID)
                              .values(invisible_to_patient=True))
    async with fhir.client("patient") as client:
        listed = found_ids(fhir, await client.get("/DocumentReference", params=SEARCH))
        assert IMAGING_ID not in listed and VACCINATION_ID in listed
        assert (await client.get(f"/DocumentReference/{fhir.documents[IMAGING_ID]}")).status_code == 404


async def test_another_patients_record_is_empty_for_a_professional_and_refused_to_a_patient(fhir: FhirWorld) -> None:
    other = {"patient.identifier": f"urn:oid:1.2.250.1.213.1.4.10|{OTHER_INS}"}
    async with fhir.client("doctor") as client:
        response = await client.get("/DocumentReference", params=other)
    assert response.status_code == 200 and response.json()["total"] == 0
    assert await audited(fhir, AuditEvent.RECORD_SEARCHED, patient=OTHER_INS)
    async with fhir.client("patient") as client:
        refused = await client.get("/DocumentReference", params=other)
    assert refused.status_code == 403 and refusal_code(refused) == "other-patient"
    assert [r["reason"] for r in await audited(fhir, AuditEvent.ACCESS_REFUSED, patient=OTHER_INS)] == ["other-patient"]


async def test_an_application_mailbox_cannot_read_the_record(fhir: FhirWorld) -> None:
    async with fhir.client("lab") as client:
        search = await client.get("/DocumentReference", params=SEARCH)
        read = await client.get(f"/Binary/{fhir.documents[BIO_V1_ID]}")
    assert search.status_code == 403 and refusal_code(search) == "application-not-allowed"
    assert read.status_code == 403


async def test_emergency_access_needs_a_reason(fhir: FhirWorld) -> None:
    async with fhir.client("dentist") as client:
        response = await client.get(f"/DocumentReference/{fhir.documents[PSYCHIATRY_ID]}",
                                    headers={"X-Emergency-Access-Reason": "%20%20"})
    assert response.status_code == 400 and refusal_code(response) == "emergency-reason-required"
    assert any(r["reason"] == "emergency-reason-required" for r in await audited(fhir, AuditEvent.ACCESS_REFUSED))


async def test_emergency_access_with_a_reason_bypasses_the_matrix_and_is_flagged(fhir: FhirWorld) -> None:
    await fhir.restart(emergency_access_professions=["10", "40"])  # dentists may break the glass here
    reason = "Patient inconscient aux urgences, allergies inconnues"
    async with fhir.client("dentist") as client:
        response = await client.get(f"/Binary/{fhir.documents[PSYCHIATRY_ID]}",
                                    headers={"X-Emergency-Access-Reason": reason.replace(" ", "%20")})
    assert response.status_code == 200
    [entry] = await audited(fhir, AuditEvent.EMERGENCY_ACCESS)
    assert entry["details"] == {"operation": "binary", "emergency": True, "justification": reason}
    assert entry["actor"] == fhir.people.idnps["dentist"]
    assert any("urgence" in text for ins, text in fhir.notifier.sent if ins == TEST_INS)


async def test_emergency_access_does_not_open_hidden_documents(fhir: FhirWorld) -> None:
    await fhir.restart(emergency_access_professions=["10", "40"])
    actor, source = fhir.patient_actor()
    await fhir.choices.hide_document(TEST_INS, PSYCHIATRY_ID, actor=actor, source=source)
    async with fhir.client("dentist") as client:
        response = await client.get(f"/DocumentReference/{fhir.documents[PSYCHIATRY_ID]}",
                                    headers={"X-Emergency-Access-Reason": "urgence vitale"})
    assert response.status_code == 404


async def test_emergency_access_is_refused_when_the_patient_opposed(fhir: FhirWorld) -> None:
    actor, source = fhir.patient_actor()
    await fhir.choices.set_emergency_access(TEST_INS, False, actor=actor, source=source)
    assert not await fhir.choices.emergency_access_allowed(TEST_INS)
    async with fhir.client("doctor") as client:
        response = await client.get("/DocumentReference", params=SEARCH,
                                    headers={"X-Emergency-Access-Reason": "urgence vitale"})
    assert response.status_code == 403 and refusal_code(response) == "emergency-access-opposed"
    assert await audited(fhir, AuditEvent.EMERGENCY_ACCESS) == []
    [refusal] = [r for r in await audited(fhir, AuditEvent.ACCESS_REFUSED) if r["reason"] == "emergency-access-opposed"]
    assert refusal["actor"] == fhir.people.idnps["doctor"]
    assert refusal["details"] == {"operation": "search", "emergency": True, "justification": "urgence vitale"}
    [choice] = await audited(fhir, AuditEvent.EMERGENCY_ACCESS_OPPOSED)
    assert choice["actor"] == TEST_INS


async def test_emergency_access_is_refused_to_a_pharmacist_and_audited(fhir: FhirWorld) -> None:
    async with fhir.client("pharmacist") as client:
        response = await client.get(f"/DocumentReference/{fhir.documents[IMAGING_ID]}",
                                    headers={"X-Emergency-Access-Reason": "urgence vitale"})
        plain = await client.get(f"/DocumentReference/{fhir.documents[IMAGING_ID]}")
    assert response.status_code == 403 and refusal_code(response) == "emergency-access-not-allowed"
    assert plain.status_code == 403 and refusal_code(plain) == "not-in-matrix"
    refusals = await audited(fhir, AuditEvent.ACCESS_REFUSED)
    assert {"actor": fhir.people.idnps["pharmacist"], "reason": "emergency-access-not-allowed", "subject": IMAGING_ID,
            "details": {"operation": "read", "emergency": True, "justification": "urgence vitale"}} in refusals
    assert await audited(fhir, AuditEvent.EMERGENCY_ACCESS) == []


async def test_put_of_another_field_is_405_and_changes_nothing(fhir: FhirWorld) -> None:
    target = fhir.documents[VACCINATION_ID]
    async with fhir.client("author") as client:
        current = (await client.get(f"/DocumentReference/{target}")).json()
        changed = {**current, "description": "Autre titre"}
        assert (await client.put(f"/DocumentReference/{target}", json=changed)).status_code == 405
        patch = [{"op": "replace", "path": "/description", "value": "Autre titre"}]
        response = await client.patch(f"/DocumentReference/{target}", json=patch,
                                      headers={"Content-Type": "application/json-patch+json"})
        assert response.status_code == 405
        assert (await client.post("/DocumentReference", json=current)).status_code == 405
        assert (await client.delete(f"/DocumentReference/{target}")).status_code == 405
        assert (await client.get(f"/DocumentReference/{target}")).json()["description"] == current["description"]


async def test_only_the_depositor_may_update(fhir: FhirWorld) -> None:
    target = fhir.documents[VACCINATION_ID]
    async with fhir.client("doctor") as client:
        current = (await client.get(f"/DocumentReference/{target}")).json()
        response = await client.put(f"/DocumentReference/{target}", json={**current, "status": "superseded"})
    assert response.status_code == 403 and refusal_code(response) == "update-reserved-to-depositor"

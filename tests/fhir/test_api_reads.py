"""What an allowed reader gets: resources valid against FHIR R4 (fhir.resources R4B models), ITI-67 and ITI-68."""

from __future__ import annotations

import base64
import hashlib

from fhir.resources.R4B.binary import Binary
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.documentreference import DocumentReference

from gateway.audit.events import AuditEvent
from tests.dmp_bridge.filing_world import TEST_INS, sample
from tests.fhir.world import BIO_V1_ID, PATIENT_QUERY, VACCINATION_ID, FhirWorld

SEARCH = {"patient.identifier": PATIENT_QUERY}
BIO_V2_ID = "1.2.250.1.213.1.1.1.55.2021.6.2"


async def test_search_returns_a_valid_searchset_of_pdsm_document_references(fhir: FhirWorld) -> None:
    async with fhir.client("doctor") as client:
        response = await client.get("/DocumentReference", params=SEARCH)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(response.json())
    assert bundle.type == "searchset" and bundle.total == len(bundle.entry or []) == 4
    references = [DocumentReference.model_validate(entry.resource.model_dump()) for entry in bundle.entry or []]
    vaccination = next(r for r in references if r.masterIdentifier.value == f"urn:oid:{VACCINATION_ID}")
    assert vaccination.status == "current" and vaccination.type.coding[0].code == "87273-9"
    assert vaccination.subject.identifier.value == TEST_INS
    assert vaccination.author[0].reference == "#author" and vaccination.contained
    attachment = vaccination.content[0].attachment
    content = sample("VAC-NOTE_2023.01.xml")
    assert attachment.size == len(content) and attachment.language == "fr-FR"
    raw_attachment = next(e["resource"] for e in response.json()["entry"]
                          if e["resource"]["id"] == vaccination.id)["content"][0]["attachment"]
    assert base64.b64decode(raw_attachment["hash"]) == hashlib.sha1(content).digest()  # FHIR: base64 of the SHA-1
    assert attachment.url.endswith(f"/Binary/{fhir.documents[VACCINATION_ID]}")


async def test_superseded_versions_only_when_asked(fhir: FhirWorld) -> None:
    async with fhir.client("doctor") as client:
        current = (await client.get("/DocumentReference", params=SEARCH)).json()
        old = (await client.get("/DocumentReference", params={**SEARCH, "status": "superseded"})).json()
    current_ids = {e["resource"]["masterIdentifier"]["value"] for e in current["entry"]}
    assert f"urn:oid:{BIO_V2_ID}" in current_ids and f"urn:oid:{BIO_V1_ID}" not in current_ids
    assert [e["resource"]["status"] for e in old["entry"]] == ["superseded"]
    v2 = next(e["resource"] for e in current["entry"] if e["resource"]["masterIdentifier"]["value"] == f"urn:oid:{BIO_V2_ID}")
    assert v2["relatesTo"][0]["code"] == "replaces"


async def test_type_filter_and_paging(fhir: FhirWorld) -> None:
    async with fhir.client("doctor") as client:
        typed = (await client.get("/DocumentReference",
                                  params={**SEARCH, "type": "http://loinc.org|11502-2"})).json()
        first = (await client.get("/DocumentReference", params={**SEARCH, "_count": "3"})).json()
        following = [link["url"] for link in first["link"] if link["relation"] == "next"]
        second = (await client.get(following[0])).json()
        future = (await client.get("/DocumentReference", params={**SEARCH, "date": "ge2100-01-01"})).json()
    assert [e["resource"]["type"]["coding"][0]["code"] for e in typed["entry"]] == ["11502-2"]
    assert len(first["entry"]) == 3 and first["total"] == 4 and len(second["entry"]) == 1
    assert future["total"] == 0


async def test_binary_gives_the_filed_bytes_or_a_fhir_binary(fhir: FhirWorld) -> None:
    target = fhir.documents[VACCINATION_ID]
    async with fhir.client("doctor") as client:
        raw = await client.get(f"/Binary/{target}")
        as_fhir = await client.get(f"/Binary/{target}", headers={"Accept": "application/fhir+json"})
    assert raw.status_code == 200 and raw.content == sample("VAC-NOTE_2023.01.xml")
    assert raw.headers["Content-Type"].startswith("text/xml") and raw.headers["Cache-Control"] == "no-store"
    resource = Binary.model_validate(as_fhir.json())
    assert resource.contentType == "text/xml" and base64.b64decode(as_fhir.json()["data"]) == raw.content
    reads = await fhir.audit.search(patient=TEST_INS, events=[AuditEvent.DOCUMENT_CONTENT_READ])
    assert len(reads) == 2 and all(entry.subject and entry.subject.id == VACCINATION_ID for entry in reads)
    assert sum(1 for ins, _text in fhir.notifier.sent if ins == TEST_INS) >= 2


async def test_the_patient_reads_their_own_record_without_notifying_themself(fhir: FhirWorld) -> None:
    async with fhir.client("patient") as client:
        response = await client.get("/DocumentReference", params=SEARCH)
    assert response.status_code == 200 and response.json()["total"] == 4
    assert fhir.notifier.sent == []


async def test_status_update_by_the_author_and_archiving(fhir: FhirWorld) -> None:
    target = fhir.documents[VACCINATION_ID]
    patch = [{"op": "replace", "path": "/extension/0/valueBoolean", "value": True}]
    async with fhir.client("author") as client:
        response = await client.patch(f"/DocumentReference/{target}", json=patch,
                                      headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 200, response.text
    updated = DocumentReference.model_validate(response.json())
    assert updated.extension[0].valueBoolean is True


async def test_metadata_is_a_capability_statement(fhir: FhirWorld) -> None:
    async with fhir.client() as client:
        response = await client.get("/metadata")
    statement = CapabilityStatement.model_validate(response.json())
    assert statement.fhirVersion == "4.0.1"
    assert {resource.type for resource in statement.rest[0].resource} == {"DocumentReference", "Binary"}

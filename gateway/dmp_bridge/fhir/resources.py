"""FHIR R4 resources built from record rows: DocumentReference (PDSm), Bundle, Binary, OperationOutcome.

DocumentReference follows the PDSm Comprehensive profile (IHE MHD 4.0.1 as
profiled by ANS, mssante.md §3.4): masterIdentifier = XDS uniqueId, status
current/superseded, type (JDV_J07), category (J06 classCode), subject (the
patient by INS identifier), date, author (a contained Practitioner with its
IDNPS), custodian, relatesTo replaces, securityLabel (JDV_J08),
content.attachment (language, size, SHA-1 hash in base64 as FHIR requires,
title, url of the Binary, creation), content.format (J10), context.period,
facilityType, practiceSetting, and the isArchived extension.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from gateway.dmp_bridge.content_types import served_type
from gateway.dmp_bridge.record import security_labels
from gateway.dmp_bridge.tables import RecordDocument

FHIR_JSON = "application/fhir+json"
PDSM_PROFILE = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/PDSm_ComprehensiveDocumentReference"
IS_ARCHIVED_URL = "http://esante.gouv.fr/cisis/fhir/StructureDefinition/PDSm_isArchived"
IDNPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
IDNST_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"  # 2.16.840.1.113883.5.25
VISIBILITY_SYSTEM = "urn:oid:1.2.250.1.213.1.1.4.13"  # MASQUE_PS, INVISIBLE_PATIENT, INVISIBLE_REPRESENTANTS_LEGAUX
LOINC = "http://loinc.org"
KNOWN_SYSTEMS = {"2.16.840.1.113883.6.1": LOINC, "2.16.840.1.113883.5.25": CONFIDENTIALITY_SYSTEM}
AUTHOR_REF = "author"


def system_uri(system: str | None) -> str | None:
    """A code system OID as a FHIR URI (urn:oid:..., or the canonical URL FHIR gives it)."""
    if not system:
        return None
    if system in KNOWN_SYSTEMS:
        return KNOWN_SYSTEMS[system]
    return system if ":" in system else f"urn:oid:{system}"


def ins_system(oid: str) -> str:
    return f"urn:oid:{oid}"


def fhir_instant(value: dt.datetime | None) -> str | None:
    """FHIR instant/dateTime: with seconds and a zone (stored times are UTC)."""
    if value is None:
        return None
    aware = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return aware.isoformat(timespec="seconds")


def _concept(code: str | None, system: str | None, display: str | None) -> dict[str, Any] | None:
    if not code:
        return None
    coding = {"system": system_uri(system), "code": code, "display": display}
    return {"coding": [{key: value for key, value in coding.items() if value}]}


def _security_label(code: str) -> dict[str, Any]:
    system = CONFIDENTIALITY_SYSTEM if code in ("N", "R", "V") else VISIBILITY_SYSTEM
    return {"coding": [{"system": system, "code": code}]}


def _author(document: RecordDocument) -> dict[str, Any] | None:
    if not document.author_idnps and not document.author_name:
        return None
    practitioner: dict[str, Any] = {"resourceType": "Practitioner", "id": AUTHOR_REF}
    if document.author_idnps:
        practitioner["identifier"] = [{"system": IDNPS_SYSTEM, "value": document.author_idnps}]
    if document.author_name:
        practitioner["name"] = [{"text": document.author_name}]
    return practitioner


def _custodian(document: RecordDocument) -> dict[str, Any] | None:
    idnst = document.custodian_idnst or document.author_organisation_idnst
    name = document.custodian_name or document.author_organisation_name
    if not idnst and not name:
        return None
    reference: dict[str, Any] = {"type": "Organization"}
    if idnst:
        reference["identifier"] = {"system": IDNST_SYSTEM, "value": idnst}
    if name:
        reference["display"] = name
    return reference


def _attachment(document: RecordDocument, base_url: str) -> dict[str, Any]:
    attachment = {
        "contentType": served_type(document.mime_type),
        "language": document.language_code,
        "url": f"{base_url}/Binary/{document.id}",
        "size": document.size,
        "hash": base64.b64encode(bytes.fromhex(document.sha1)).decode("ascii"),  # FHIR: base64 of the SHA-1
        "title": document.title,
        "creation": fhir_instant(document.creation_time),
    }
    return {key: value for key, value in attachment.items() if value is not None}


def _content(document: RecordDocument, base_url: str) -> dict[str, Any]:
    content: dict[str, Any] = {"attachment": _attachment(document, base_url)}
    if document.format_code:
        content["format"] = {key: value for key, value in {
            "system": system_uri(document.format_code_system), "code": document.format_code}.items() if value}
    return content


def _context(document: RecordDocument) -> dict[str, Any] | None:
    context: dict[str, Any] = {}
    period = {key: value for key, value in {"start": fhir_instant(document.service_start),
                                            "end": fhir_instant(document.service_stop)}.items() if value}
    if period:
        context["period"] = period
    facility = _concept(document.facility_type_code, document.facility_type_system, document.facility_type_display)
    setting = _concept(document.practice_setting_code, document.practice_setting_system,
                       document.practice_setting_display)
    if facility:
        context["facilityType"] = facility
    if setting:
        context["practiceSetting"] = setting
    return context or None


def document_reference(document: RecordDocument, base_url: str, *, archived: bool = False) -> dict[str, Any]:
    """The PDSm DocumentReference of a filed document (never its content)."""
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": str(document.id),
        "meta": {"profile": [PDSM_PROFILE]},
        "extension": [{"url": IS_ARCHIVED_URL, "valueBoolean": archived}],
        "masterIdentifier": _identifier(document.unique_id),
        "status": document.status,
        "subject": {"type": "Patient", "identifier": {"system": ins_system(document.patient_ins_oid),
                                                      "value": document.patient_ins}},
        "securityLabel": [_security_label(code) for code in security_labels(document)],
        "content": [_content(document, base_url)],
    }
    _add_optional(resource, document)
    return resource


def _add_optional(resource: dict[str, Any], document: RecordDocument) -> None:
    author = _author(document)
    optional: dict[str, Any] = {
        "type": _concept(document.type_code, document.type_code_system, document.type_display),
        "category": [c] if (c := _concept(document.class_code, document.class_code_system, document.class_display)) else None,
        "date": fhir_instant(document.filed_at),
        "custodian": _custodian(document),
        "description": document.title,
        "context": _context(document),
        "relatesTo": [{"code": "replaces", "target": {"type": "DocumentReference",
                                                      "identifier": _identifier(document.replaces_unique_id)}}]
        if document.replaces_unique_id else None,
    }
    if author is not None:
        resource["contained"] = [author]
        resource["author"] = [{"reference": f"#{AUTHOR_REF}"}]
    resource.update({key: value for key, value in optional.items() if value is not None})


def _identifier(unique_id: str) -> dict[str, str]:
    """An XDS uniqueId as an Identifier: an OID is the URI urn:oid:... (MHD); root^extension stays a plain value."""
    if unique_id and all(part.isdigit() for part in unique_id.split(".")):
        return {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{unique_id}"}
    return {"value": unique_id}


def searchset(entries: list[dict[str, Any]], total: int, self_url: str, next_url: str | None,
              base_url: str) -> dict[str, Any]:
    """An ITI-67 response: a searchset Bundle of DocumentReferences, with paging links."""
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle", "type": "searchset", "total": total, "link": links,
        "entry": [{"fullUrl": f"{base_url}/DocumentReference/{entry['id']}", "resource": entry,
                   "search": {"mode": "match"}} for entry in entries],
    }


def binary(document: RecordDocument, content: bytes) -> dict[str, Any]:
    """ITI-68 answered as a FHIR Binary (when the client's Accept asks for FHIR JSON)."""
    return {"resourceType": "Binary", "id": str(document.id), "contentType": served_type(document.mime_type),
            "data": base64.b64encode(content).decode("ascii")}


def operation_outcome(code: str, diagnostics: str, *, severity: str = "error",
                      details_code: str | None = None) -> dict[str, Any]:
    """An error as FHIR OperationOutcome; ``code`` from the IssueType value set, ``details_code`` ours."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if details_code:
        issue["details"] = {"coding": [{"system": "urn:mss-gateway:access-reason", "code": details_code}]}
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def capability_statement(base_url: str, *, emergency_enabled: bool) -> dict[str, Any]:
    """What this server does: MHD Document Responder reads (ITI-67, ITI-68) and the limited update."""
    search_params = [
        {"name": "patient.identifier", "type": "token", "documentation": "system|INS, e.g. urn:oid:1.2.250.1.213.1.4.10|..."},
        {"name": "type", "type": "token"}, {"name": "category", "type": "token"},
        {"name": "date", "type": "date", "documentation": "ge / le / gt / lt / eq prefixes"},
        {"name": "status", "type": "token", "documentation": "current (default) or superseded"},
        {"name": "_count", "type": "number"},
    ]
    security = "mTLS client certificate or HTTP Basic (mailbox credentials) over TLS."
    if emergency_enabled:
        security += " Emergency access: header X-Emergency-Access-Reason (UTF-8, percent-encoding allowed)."
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": fhir_instant(dt.datetime.now(dt.timezone.utc)),
        "kind": "instance", "fhirVersion": "4.0.1", "format": ["application/fhir+json"],
        "implementation": {"description": "MSS gateway: patient record (PDSm / IHE MHD Document Responder)", "url": base_url},
        "rest": [{
            "mode": "server", "security": {"description": security},
            "resource": [
                {"type": "DocumentReference", "profile": PDSM_PROFILE,
                 "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "update"}, {"code": "patch"}],
                 "searchParam": search_params},
                {"type": "Binary", "interaction": [{"code": "read"}]},
            ],
        }],
    }

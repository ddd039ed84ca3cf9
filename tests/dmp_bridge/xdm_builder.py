"""Builders of IHE XDM packages and their METADATA.XML for tests (ebRIM 3.0, CI-SIS value formats)."""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
TEST_PATIENT_ID = "279035121518989^^^&1.2.250.1.213.1.4.10&ISO^NH"
TEST_PATIENT_INFO = ("PID-5|PAT-TROIS^DOMINIQUE^^^^^L", "PID-7|19790328", "PID-8|F")


@dataclass(frozen=True)
class Entry:
    """A DocumentEntry to write in a test METADATA."""

    entry_id: str
    uri: str | None
    content: bytes
    type_code: str = "11502-2"
    mime_type: str = "text/xml"
    unique_id: str | None = None
    hash: str | None = None  # default: the real SHA-1 of content
    size: int | None = None  # default: the real size of content
    format_code: str = "urn:ihe:iti:xds-sd:pdf:2008"
    patient_info: tuple[str, ...] | None = TEST_PATIENT_INFO  # the sourcePatientInfo values; None: no slot


def _slot(name: str, *values: str) -> str:
    inner = "".join(f"<rim:Value>{escape(v)}</rim:Value>" for v in values)
    return f'<rim:Slot name="{name}"><rim:ValueList>{inner}</rim:ValueList></rim:Slot>'


def _classification(scheme: str, owner: str, code: str, coding_scheme: str, display: str) -> str:
    return (
        f'<rim:Classification classificationScheme="urn:uuid:{scheme}" classifiedObject={quoteattr(owner)} nodeRepresentation={quoteattr(code)} id="c-{scheme[:4]}-{escape(owner)}">'
        f"{_slot('codingScheme', coding_scheme)}<rim:Name><rim:LocalizedString value={quoteattr(display)}/></rim:Name></rim:Classification>"
    )


def _external_id(scheme: str, owner: str, value: str) -> str:
    return f'<rim:ExternalIdentifier identificationScheme="urn:uuid:{scheme}" registryObject={quoteattr(owner)} value={quoteattr(value)} id="e-{scheme[:4]}-{escape(owner)}"/>'


def _entry_xml(entry: Entry, patient_id: str) -> str:
    slots = [
        _slot("creationTime", "20210104150527"),
        _slot("serviceStartTime", "20210104082200"),
        _slot("serviceStopTime", "20210104150500"),
        _slot("languageCode", "fr-FR"),
        _slot("sourcePatientId", "1234567890121^^^&1.2.3.4.567.8.9.10&ISO^PI"),
        *([_slot("sourcePatientInfo", *entry.patient_info)] if entry.patient_info is not None else []),
        _slot("hash", entry.hash if entry.hash is not None else hashlib.sha1(entry.content).hexdigest()),
        _slot("size", str(entry.size if entry.size is not None else len(entry.content))),
        _slot("legalAuthenticator", "801234534765^CAMPARINI^Marcel^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"),
    ]
    if entry.uri is not None:
        slots.append(_slot("URI", entry.uri))
    author = (
        f'<rim:Classification classificationScheme="urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d" classifiedObject={quoteattr(entry.entry_id)} nodeRepresentation="" id="a-{escape(entry.entry_id)}">'
        + _slot("authorPerson", "801234534765^CAMPARINI^Marcel^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS")
        + _slot("authorInstitution", "Laboratoire des charmes^^^^^&1.2.250.1.71.4.2.2&ISO^IDNST^^^11120459876")
        + _slot("authorRole", "Biologiste")
        + _slot("authorSpecialty", "G15_10/SM03^Médecin - Biologie médicale (SM)^1.2.250.1.213.1.1.4.5")
        + "</rim:Classification>"
    )
    return (
        f'<rim:ExtrinsicObject id={quoteattr(entry.entry_id)} mimeType={quoteattr(entry.mime_type)} objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">'
        + "".join(slots)
        + f'<rim:Name><rim:LocalizedString value="Document {escape(entry.entry_id)}"/></rim:Name>'
        + author
        + _classification("41a5887f-8865-4c09-adf7-e362475b143a", entry.entry_id, "11", "1.2.250.1.213.1.1.4.1", "Compte rendu")
        + _classification("f4f85eac-e6cb-4883-b524-f2705394840f", entry.entry_id, "N", "2.16.840.1.113883.5.25", "Normal")
        + _classification("a09d5840-386c-46f2-b5ad-9c3699a4309d", entry.entry_id, entry.format_code, "1.3.6.1.4.1.19376.1.2.3", "Format")
        + _classification("f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1", entry.entry_id, "SA25", "1.2.250.1.71.4.2.4", "Laboratoire")
        + _classification("cccf5598-8b07-4b77-a05e-ae952c785ead", entry.entry_id, "AMBULATOIRE", "1.2.250.1.213.1.1.4.9", "Ambulatoire")
        + _classification("f0306f51-975f-434e-a61c-c59651d33983", entry.entry_id, entry.type_code, "2.16.840.1.113883.6.1", "Type")
        + _classification("2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4", entry.entry_id, "18725-2", "2.16.840.1.113883.6.1", "Microbiologie")
        + _external_id("58a6f841-87b3-4a3e-92fd-a8ffeff98427", entry.entry_id, patient_id)
        + _external_id("2e82c1f6-a085-4c72-9da3-8640a32e42ab", entry.entry_id, entry.unique_id or f"1.2.250.1.999.{abs(hash(entry.entry_id)) % 10_000}")
        + "</rim:ExtrinsicObject>"
    )


def metadata_xml(entries: list[Entry], *, patient_id: str = TEST_PATIENT_ID, declare_prefixes: bool = True, signs: tuple[str, str] | None = None) -> bytes:
    """A SubmitObjectsRequest like the CI-SIS ones; without ``declare_prefixes`` the prefixes are left undeclared (DRIMbox)."""
    declarations = ' xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0" xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"' if declare_prefixes else ""
    package = (
        '<rim:RegistryPackage id="SubmissionSet01">'
        + _slot("submissionTime", "20210104160000")
        + _slot("intendedRecipient", "|^^Internet^279035121518989@patient.mssante.fr")
        + '<rim:Name><rim:LocalizedString value="Envoi"/></rim:Name>'
        + '<rim:Classification classificationScheme="urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d" classifiedObject="SubmissionSet01" nodeRepresentation="" id="ssa">'
        + _slot("authorPerson", "801234534765^CAMPARINI^Marcel^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS")
        + "</rim:Classification>"
        + _classification("aa543740-bdda-424e-8c96-df4873be8500", "SubmissionSet01", "04", "1.2.250.1.213.1.1.4.12", "Hospitalisation")
        + _external_id("96fdda7c-d067-4183-912e-bf5ee74998a8", "SubmissionSet01", "1.2.250.1.999.1")
        + _external_id("554ac39e-e3fe-47fe-b233-965d2a147832", "SubmissionSet01", "1.2.250.1.999")
        + _external_id("6b5aea1a-874d-4603-a4bc-96a0a7b38446", "SubmissionSet01", patient_id)
        + "</rim:RegistryPackage>"
        + '<rim:Classification classifiedObject="SubmissionSet01" classificationNode="urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd" id="ssnode"/>'
    )
    associations = "".join(
        f'<rim:Association associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember" sourceObject="SubmissionSet01" targetObject={quoteattr(e.entry_id)} id="as-{escape(e.entry_id)}">'
        + _slot("SubmissionSetStatus", "Original")
        + "</rim:Association>"
        for e in entries
    )
    if signs:
        associations += f'<rim:Association associationType="urn:ihe:iti:2007:AssociationType:signs" sourceObject={quoteattr(signs[0])} targetObject="SubmissionSet01" id="sig"/>'
    body = "".join(_entry_xml(e, patient_id) for e in entries) + package + associations
    return f'<?xml version="1.0" encoding="UTF-8"?><lcm:SubmitObjectsRequest{declarations}><rim:RegistryObjectList>{body}</rim:RegistryObjectList></lcm:SubmitObjectsRequest>'.encode()


def zip_bytes(members: list[tuple[str | zipfile.ZipInfo, bytes]], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicates some tests need
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            for name, content in members:
                archive.writestr(name, content)
    return buffer.getvalue()


def build_xdm(entries: list[Entry], *, top: str = "", subset: str = "SUBSET01", metadata: bytes | None = None, extra: list[tuple[str | zipfile.ZipInfo, bytes]] | None = None) -> bytes:
    members: list[tuple[str | zipfile.ZipInfo, bytes]] = [
        (f"{top}INDEX.HTM", b"<html><body>Index</body></html>"),
        (f"{top}README.TXT", b"Test XDM package"),
        (f"{top}IHE_XDM/{subset}/METADATA.XML", metadata if metadata is not None else metadata_xml(entries)),
    ]
    members += [(f"{top}IHE_XDM/{subset}/{e.uri or e.entry_id + '.xml'}", e.content) for e in entries if "/" not in (e.uri or "")]
    members += [(f"{top}IHE_XDM/{e.uri}", e.content) for e in entries if "/" in (e.uri or "")]
    return zip_bytes(members + (extra or []))


CDA_BYTES = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><id root="1.2.3"/></ClinicalDocument>'

"""HL7 CDA R2 header reading for filing (CI-SIS "Structuration minimale", mssante.md §3.1).

``parse_cda`` turns bytes into a ``CdaDocument``: the header fields the DMP
needs (ids, type, dates, confidentiality, patient and traits, authors,
custodian, legal authenticator, service events, facility, practice setting,
replaced versions) and the body kind, with the decoded document for a level-1
``nonXMLBody``. It reads, it does not judge: identification rules live in
``patient.py``. Unusual but harmless content becomes a warning; what makes the
document unusable (not a CDA, no id, bad base64, oversized body) raises.
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from enum import Enum
from functools import lru_cache
from zoneinfo import ZoneInfo

from gateway.directory.identifiers import IDNPS_OID, IDNST_OID
from gateway.dmp_bridge.errors import CdaContentError, NotACdaError
from gateway.dmp_bridge.safe_xml import DEFAULT_XML_LIMITS, XmlLimits, local_name, namespace_of, parse_xml

HL7_NAMESPACE = "urn:hl7-org:v3"
CDA_TYPE_ID = "POCD_HD000040"
# CI-SIS documents are produced in France: a time without offset is French local time.
FRENCH_TIME = ZoneInfo("Europe/Paris")
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024

_HL7_TIME = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,9}")


class BodyKind(str, Enum):
    UNSTRUCTURED = "nonXMLBody"  # CDA level 1 (IHE XDS-SD, template 1.3.6.1.4.1.19376.1.2.20)
    STRUCTURED = "structuredBody"  # CDA level 2/3


@dataclass(frozen=True)
class InstanceIdentifier:
    """An HL7 II: ``root`` (an OID or UUID) and an optional ``extension``."""

    root: str
    extension: str | None = None

    @property
    def xds_unique_id(self) -> str:
        """The XDS uniqueId form of a CDA id: ``root^extension``, or ``root`` alone (IHE ITI TF-3 4.2.3.2.26)."""
        return f"{self.root}^{self.extension}" if self.extension else self.root


@dataclass(frozen=True)
class Code:
    code: str
    code_system: str | None = None
    display_name: str | None = None


@dataclass(frozen=True)
class PersonName:
    family: str | None
    given: tuple[str, ...] = ()
    prefix: str | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class Organization:
    ids: tuple[InstanceIdentifier, ...]
    idnst: str | None  # extension of the id whose root is the IDNST OID 1.2.250.1.71.4.2.2
    name: str | None
    industry_class: Code | None  # standardIndustryClassCode: the practice setting (1.2.250.1.213.1.1.4.9)


@dataclass(frozen=True)
class CdaAuthor:
    time: datetime | None
    ids: tuple[InstanceIdentifier, ...]
    idnps: str | None  # extension of the id whose root is the IDNPS OID 1.2.250.1.71.4.2.1
    profession: Code | None  # assignedAuthor/code, e.g. G15_10/SM44 in 1.2.250.1.213.1.1.4.5
    name: PersonName | None
    device_name: str | None
    organization: Organization | None


@dataclass(frozen=True)
class LegalAuthenticator:
    time: datetime | None
    signature_code: str | None
    ids: tuple[InstanceIdentifier, ...]
    idnps: str | None
    name: PersonName | None
    organization: Organization | None


@dataclass(frozen=True)
class ServiceEvent:
    code: Code | None
    start: datetime | None
    stop: datetime | None
    # performer/assignedEntity/representedOrganization/standardIndustryClassCode: "cadre d'exercice"
    performer_practice_setting: Code | None = None


@dataclass(frozen=True)
class CdaPatient:
    """``recordTarget/patientRole``: every id with its root, and the INS identity traits as written."""

    ids: tuple[InstanceIdentifier, ...]
    birth_family_name: str | None
    first_given_name: str | None
    given_names: tuple[str, ...]
    used_family_name: str | None
    used_given_name: str | None
    sex: str | None
    birth_date: date | None
    birth_time_raw: str | None
    birthplace_code: str | None  # INSEE COG code of the birth commune (birthplace/place/addr/county)
    mailto: tuple[str, ...]


@dataclass(frozen=True)
class CdaBody:
    kind: BodyKind
    media_type: str | None = None
    representation: str | None = None
    content: bytes | None = None  # the decoded level-1 document (a PDF for CI-SIS level 1)


@dataclass(frozen=True)
class CdaDocument:
    id: InstanceIdentifier
    set_id: InstanceIdentifier | None
    version_number: int | None
    code: Code | None
    title: str | None
    effective_time: datetime | None
    confidentiality: Code | None
    language_code: str | None
    realm_code: str | None
    template_ids: tuple[InstanceIdentifier, ...]
    patient: CdaPatient | None
    authors: tuple[CdaAuthor, ...]
    custodian: Organization | None
    legal_authenticator: LegalAuthenticator | None
    service_events: tuple[ServiceEvent, ...]
    healthcare_facility_type: Code | None
    practice_setting: Code | None
    replaces: tuple[InstanceIdentifier, ...]  # relatedDocument@typeCode="RPLC"/parentDocument/id
    body: CdaBody | None
    warnings: tuple[str, ...] = ()


def parse_cda(data: bytes, *, xml_limits: XmlLimits = DEFAULT_XML_LIMITS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> CdaDocument:
    """Parse CDA R2 bytes; raises ``NotACdaError`` for other XML and ``DocumentError`` for unsafe or unusable input."""
    return cda_from_element(parse_xml(data, limits=xml_limits), max_body_bytes=max_body_bytes)


def is_cda_root(element: ET.Element) -> bool:
    return element.tag == f"{{{HL7_NAMESPACE}}}ClinicalDocument"


def cda_from_element(root: ET.Element, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> CdaDocument:
    _require_cda_root(root)
    reader = _CdaReader(root, max_body_bytes)
    return reader.document()


def parse_hl7_time(value: str, *, default_tz: tzinfo = FRENCH_TIME) -> datetime:
    """An HL7 v3 TS (``YYYY[MM[DD[HH[MM[SS[.f]]]]]][+-ZZZZ]``) as an aware datetime.

    Missing parts take their lowest value; a missing offset means ``default_tz``.
    Raises ``ValueError`` on anything else.
    """
    match = _HL7_TIME.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not an HL7 timestamp (YYYYMMDDHHMMSS+ZZZZ)")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz = _offset(offset) if offset else default_tz
    micro = int((fraction or "0").ljust(6, "0"))
    return datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0), micro, tzinfo=tz)


def _offset(text: str) -> timezone:
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        raise ValueError(f"{text!r} is not a timezone offset")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _require_cda_root(root: ET.Element) -> None:
    if is_cda_root(root):
        return
    name, namespace = local_name(root.tag), namespace_of(root.tag)
    if name == "ClinicalDocument":
        raise NotACdaError(f"not a CDA R2 document: ClinicalDocument is in namespace {namespace!r}, expected {HL7_NAMESPACE!r}")
    raise NotACdaError(f"not a CDA R2 document: the root element is <{name}>, expected <ClinicalDocument xmlns={HL7_NAMESPACE!r}>")


@lru_cache(maxsize=256)
def _qualified(path: str) -> str:
    """``recordTarget/patientRole`` -> the same path with every step in the HL7 v3 namespace."""
    return "/".join(f"{{{HL7_NAMESPACE}}}{step}" if step not in (".", "..", "*") else step for step in path.split("/"))


def _find(element: ET.Element | None, path: str) -> ET.Element | None:
    return None if element is None else element.find(_qualified(path))


def _find_all(element: ET.Element | None, path: str) -> list[ET.Element]:
    return [] if element is None else element.findall(_qualified(path))


def _text(element: ET.Element | None) -> str | None:
    """Element text with whitespace runs collapsed; ``None`` when empty."""
    if element is None:
        return None
    joined = " ".join("".join(element.itertext()).split())
    return joined or None


def _qualifiers(element: ET.Element) -> set[str]:
    return set(element.get("qualifier", "").upper().split())


class _CdaReader:
    """Reads one ClinicalDocument; collects warnings instead of failing on optional fields."""

    def __init__(self, root: ET.Element, max_body_bytes: int) -> None:
        self._root = root
        self._max_body_bytes = max_body_bytes
        self._warnings: list[str] = []

    def document(self) -> CdaDocument:
        root = self._root
        self._check_type_id()
        document_id = self._instance_id(_find(root, "id"))
        if document_id is None:
            raise CdaContentError("CDA without a document id (ClinicalDocument/id@root is mandatory)")
        authors = tuple(self._author(element) for element in _find_all(root, "author"))
        events = tuple(self._service_event(e) for e in _find_all(root, "documentationOf/serviceEvent"))
        return CdaDocument(
            id=document_id,
            set_id=self._instance_id(_find(root, "setId")),
            version_number=self._version_number(),
            code=self._code(_find(root, "code")),
            title=_text(_find(root, "title")),
            effective_time=self._time(_find(root, "effectiveTime"), "effectiveTime"),
            confidentiality=self._code(_find(root, "confidentialityCode")),
            language_code=self._attribute(_find(root, "languageCode"), "code"),
            realm_code=self._attribute(_find(root, "realmCode"), "code"),
            template_ids=self._instance_ids(_find_all(root, "templateId")),
            patient=self._patient(),
            authors=authors,
            custodian=self._organization(_find(root, "custodian/assignedCustodian/representedCustodianOrganization")),
            legal_authenticator=self._legal_authenticator(_find(root, "legalAuthenticator")),
            service_events=events,
            healthcare_facility_type=self._code(_find(root, "componentOf/encompassingEncounter/location/healthCareFacility/code")),
            practice_setting=_practice_setting(events, authors),
            replaces=self._replaced_ids(),
            body=self._body(),
            warnings=tuple(self._warnings),
        )

    # -- small readers -------------------------------------------------

    @staticmethod
    def _attribute(element: ET.Element | None, name: str) -> str | None:
        if element is None:
            return None
        value = (element.get(name) or "").strip()
        return value or None

    def _instance_id(self, element: ET.Element | None) -> InstanceIdentifier | None:
        root = self._attribute(element, "root")
        if root is None:
            return None
        return InstanceIdentifier(root, self._attribute(element, "extension"))

    def _instance_ids(self, elements: list[ET.Element]) -> tuple[InstanceIdentifier, ...]:
        return tuple(ii for ii in (self._instance_id(e) for e in elements) if ii is not None)

    def _code(self, element: ET.Element | None) -> Code | None:
        code = self._attribute(element, "code")
        if code is None:
            return None
        return Code(code, self._attribute(element, "codeSystem"), self._attribute(element, "displayName"))

    def _time(self, element: ET.Element | None, field: str) -> datetime | None:
        value = self._attribute(element, "value")
        if value is None:
            return None
        try:
            parsed = parse_hl7_time(value)
        except ValueError as error:
            self._warnings.append(f"{field}: {error}; ignored")
            return None
        if not re.search(r"[+-][0-9]{4}$", value) and len(value) > 8:
            self._warnings.append(f"{field} {value!r} has no timezone offset: read as Europe/Paris time")
        return parsed

    def _version_number(self) -> int | None:
        value = self._attribute(_find(self._root, "versionNumber"), "value")
        if value is None:
            return None
        if not _DIGITS.fullmatch(value):
            self._warnings.append(f"versionNumber {value!r} is not an integer; ignored")
            return None
        return int(value)

    def _ids_with_root(self, elements: list[ET.Element], root: str) -> str | None:
        return next((ii.extension for ii in self._instance_ids(elements) if ii.root == root and ii.extension), None)

    def _check_type_id(self) -> None:
        extension = self._attribute(_find(self._root, "typeId"), "extension")
        if extension is not None and extension != CDA_TYPE_ID:
            self._warnings.append(f"typeId extension {extension!r} is not {CDA_TYPE_ID} (CDA R2)")

    # -- participants ----------------------------------------------------

    def _person_name(self, element: ET.Element | None) -> PersonName | None:
        if element is None:
            return None
        return PersonName(
            family=_text(_find(element, "family")),
            given=tuple(t for t in (_text(g) for g in _find_all(element, "given")) if t),
            prefix=_text(_find(element, "prefix")),
            suffix=_text(_find(element, "suffix")),
        )

    def _organization(self, element: ET.Element | None) -> Organization | None:
        if element is None:
            return None
        ids = _find_all(element, "id")
        return Organization(
            ids=self._instance_ids(ids),
            idnst=self._ids_with_root(ids, IDNST_OID),
            name=_text(_find(element, "name")),
            industry_class=self._code(_find(element, "standardIndustryClassCode")),
        )

    def _author(self, element: ET.Element) -> CdaAuthor:
        assigned = _find(element, "assignedAuthor")
        ids = _find_all(assigned, "id")
        return CdaAuthor(
            time=self._time(_find(element, "time"), "author/time"),
            ids=self._instance_ids(ids),
            idnps=self._ids_with_root(ids, IDNPS_OID),
            profession=self._code(_find(assigned, "code")),
            name=self._person_name(_find(assigned, "assignedPerson/name")),
            device_name=_text(_find(assigned, "assignedAuthoringDevice/softwareName")),
            organization=self._organization(_find(assigned, "representedOrganization")),
        )

    def _legal_authenticator(self, element: ET.Element | None) -> LegalAuthenticator | None:
        if element is None:
            return None
        assigned = _find(element, "assignedEntity")
        ids = _find_all(assigned, "id")
        return LegalAuthenticator(
            time=self._time(_find(element, "time"), "legalAuthenticator/time"),
            signature_code=self._attribute(_find(element, "signatureCode"), "code"),
            ids=self._instance_ids(ids),
            idnps=self._ids_with_root(ids, IDNPS_OID),
            name=self._person_name(_find(assigned, "assignedPerson/name")),
            organization=self._organization(_find(assigned, "representedOrganization")),
        )

    def _service_event(self, element: ET.Element) -> ServiceEvent:
        return ServiceEvent(
            code=self._code(_find(element, "code")),
            start=self._time(_find(element, "effectiveTime/low"), "serviceEvent/effectiveTime/low"),
            stop=self._time(_find(element, "effectiveTime/high"), "serviceEvent/effectiveTime/high"),
            performer_practice_setting=self._code(_find(element, "performer/assignedEntity/representedOrganization/standardIndustryClassCode")),
        )

    def _replaced_ids(self) -> tuple[InstanceIdentifier, ...]:
        related = [e for e in _find_all(self._root, "relatedDocument") if (e.get("typeCode") or "").upper() == "RPLC"]
        return self._instance_ids([i for e in related for i in _find_all(e, "parentDocument/id")])

    # -- patient -----------------------------------------------------------

    def _patient(self) -> CdaPatient | None:
        roles = _find_all(self._root, "recordTarget/patientRole")
        if not roles:
            self._warnings.append("no recordTarget/patientRole: the document names no patient")
            return None
        if len(roles) > 1:
            self._warnings.append(f"{len(roles)} recordTargets: only the first is read (a document concerns one patient)")
        role = roles[0]
        person = _find(role, "patient")
        birth_time = self._attribute(_find(person, "birthTime"), "value")
        names = _identity_names(_find_all(person, "name"))
        return CdaPatient(
            ids=self._instance_ids(_find_all(role, "id")),
            birth_family_name=names.birth_family,
            first_given_name=names.first_given,
            given_names=names.given_names,
            used_family_name=names.used_family,
            used_given_name=names.used_given,
            sex=self._attribute(_find(person, "administrativeGenderCode"), "code"),
            birth_date=self._birth_date(birth_time),
            birth_time_raw=birth_time,
            birthplace_code=_text(_find(person, "birthplace/place/addr/county")),
            mailto=self._mailto(_find_all(role, "telecom")),
        )

    def _birth_date(self, value: str | None) -> date | None:
        if value is None:
            return None
        digits = value.strip()[:8]
        try:
            return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8])) if re.fullmatch(r"[0-9]{8}", digits) else None
        except ValueError:
            self._warnings.append(f"birthTime {value!r} is not a valid date; ignored")
            return None

    @staticmethod
    def _mailto(telecoms: list[ET.Element]) -> tuple[str, ...]:
        values = [(t.get("value") or "").strip() for t in telecoms]
        return tuple(v[len("mailto:"):] for v in values if v.lower().startswith("mailto:") and len(v) > len("mailto:"))

    # -- body ------------------------------------------------------------------

    def _body(self) -> CdaBody | None:
        if _find(self._root, "component/structuredBody") is not None:
            return CdaBody(BodyKind.STRUCTURED)
        non_xml = _find(self._root, "component/nonXMLBody")
        if non_xml is None:
            self._warnings.append("no component/structuredBody nor component/nonXMLBody: the document has no body")
            return None
        return self._non_xml_body(_find(non_xml, "text"))

    def _non_xml_body(self, text: ET.Element | None) -> CdaBody:
        media_type = self._attribute(text, "mediaType")
        representation = (self._attribute(text, "representation") or "TXT").upper()
        if text is None:
            self._warnings.append("nonXMLBody without text: no content")
            return CdaBody(BodyKind.UNSTRUCTURED)
        if self._attribute(text, "compression"):
            raise CdaContentError(f"nonXMLBody compressed with {text.get('compression')!r}: not supported")
        if _find(text, "reference") is not None and not (text.text or "").strip():
            self._warnings.append("nonXMLBody refers to an external document (reference): content not fetched")
            return CdaBody(BodyKind.UNSTRUCTURED, media_type, representation)
        return CdaBody(BodyKind.UNSTRUCTURED, media_type, representation, self._decode_body(text.text or "", representation))

    def _decode_body(self, payload: str, representation: str) -> bytes:
        if representation != "B64":
            content = payload.encode("utf-8")
        else:
            compact = "".join(payload.split())
            if len(compact) // 4 * 3 > self._max_body_bytes:
                raise CdaContentError(f"nonXMLBody larger than {self._max_body_bytes} bytes refused")
            try:
                content = base64.b64decode(compact, validate=True)
            except (binascii.Error, ValueError) as error:
                raise CdaContentError(f"nonXMLBody is not valid base64: {error}") from None
        if len(content) > self._max_body_bytes:
            raise CdaContentError(f"nonXMLBody larger than {self._max_body_bytes} bytes refused")
        return content


def _practice_setting(events: tuple[ServiceEvent, ...], authors: tuple[CdaAuthor, ...]) -> Code | None:
    """XDS practiceSettingCode: the performer's "cadre d'exercice" (CI-SIS), else the author organisation's."""
    from_events = (e.performer_practice_setting for e in events if e.performer_practice_setting)
    from_authors = (a.organization.industry_class for a in authors if a.organization and a.organization.industry_class)
    return next(from_events, None) or next(from_authors, None)


@dataclass(frozen=True)
class _IdentityNames:
    birth_family: str | None
    first_given: str | None
    given_names: tuple[str, ...]
    used_family: str | None
    used_given: str | None


def _identity_names(names: list[ET.Element]) -> _IdentityNames:
    """INS traits from patient/name: ``BR`` marks birth names, ``CL``/``SP`` the used ones (CI-SIS).

    Birth family name: ``family@qualifier=BR``, else the first unqualified
    ``family``. First given name: ``given@qualifier=BR``, else the first
    ``given``. All given names: the unqualified ``given`` elements (CI-SIS puts
    the whole list of birth given names there).
    """
    families = [e for name in names for e in _find_all(name, "family")]
    givens = [e for name in names for e in _find_all(name, "given")]
    birth_family = _first_text([f for f in families if "BR" in _qualifiers(f)] or [f for f in families if not _qualifiers(f)] or families)
    first_given = _first_text([g for g in givens if "BR" in _qualifiers(g)] or givens)
    unqualified_givens = tuple(t for t in (_text(g) for g in givens if not _qualifiers(g)) if t)
    return _IdentityNames(
        birth_family=birth_family,
        first_given=first_given,
        given_names=unqualified_givens or ((first_given,) if first_given else ()),
        used_family=_first_text([f for f in families if _qualifiers(f) & {"CL", "SP"}]),
        used_given=_first_text([g for g in givens if "CL" in _qualifiers(g)]),
    )


def _first_text(elements: list[ET.Element]) -> str | None:
    return next((t for t in (_text(e) for e in elements) if t), None)

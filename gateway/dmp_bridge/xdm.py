"""IHE XDM packages (IHE ITI TF-1 §16, TF-2b §3.32): a zip read safely, its METADATA read leniently.

Safety (the archive comes from a stranger): entry names with ``..``, an
absolute or drive path, backslashes, control characters or empty components
are refused, as are symlinks and other non-regular entries, duplicate names
(compared without case), encrypted entries, compression methods other than
stored/deflate, too many entries, and zip bombs: declared per-entry and total
sizes and the compression ratio are checked before reading, and the bytes are
counted again while reading, because headers can lie (a size that does not
match the data shows up as a CRC mismatch, which is refused too). Nested
archives are never opened.

Leniency (real packages are untidy, mssante.md §3.2): names compare without
case, one wrapping top folder is accepted (``samplexdm/IHE_XDM/...``),
``METADATA.XML`` may be spelt in any case, METADATA is parsed without
namespaces (the DRIMbox sample leaves ``ns3:`` undeclared), a missing URI slot
falls back to the file named after the entry id, and a document URI is
resolved against its SUBSET directory first, then against ``IHE_XDM/``.

Decision on the malformed ``IHE_XDM/SUBSET01METADATA.xml`` layout (a ``/``
missing, DirectProjectJavaRI xdm.zip): refused with a reason naming the
entry. Salvaging would mean guessing where a directory name ends in every
path of a hostile archive; the message is delivered anyway and the sender is
told why the package was not filed.
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import struct
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import unquote

from gateway.dmp_bridge.cda import parse_hl7_time
from gateway.dmp_bridge.errors import ArchiveSecurityError, DocumentError, IntegrityError, XdmError
from gateway.dmp_bridge.safe_xml import DEFAULT_XML_LIMITS, XmlLimits, parse_xml

# ebRIM / XDS identifiers (IHE ITI TF-3 §4.2.5), as listed in mssante.md §3.2.
DOCUMENT_ENTRY_STABLE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
DOCUMENT_ENTRY_ON_DEMAND = "urn:uuid:34268e47-0cb9-4da4-8e3a-8d0d6c45b89c"
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS_CODE = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_CONFIDENTIALITY_CODE = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_FORMAT_CODE = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_FACILITY_TYPE_CODE = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE_SETTING_CODE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_TYPE_CODE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_EVENT_CODE = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE_CODE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"

_METADATA_NAME = "metadata.xml"
_XDM_FOLDER = "ihe_xdm"
_SHA1_HEX = re.compile(r"^[0-9a-fA-F]{40}$")
_EOCD = struct.Struct("<4s4H2LH")
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ZipLimits:
    """Bounds for one archive; a real XDM holds a few CDA/PDF documents."""

    max_archive_bytes: int = 64 * 1024 * 1024
    max_entries: int = 1000
    max_entry_bytes: int = 50 * 1024 * 1024
    max_total_bytes: int = 200 * 1024 * 1024
    max_ratio: int = 100
    # Small entries may compress very well (a blank page, padding): harmless below this size.
    ratio_floor_bytes: int = 1024 * 1024


DEFAULT_ZIP_LIMITS = ZipLimits()


# -- metadata model ---------------------------------------------------------------


@dataclass(frozen=True)
class XdsCode:
    code: str
    scheme: str | None = None  # the codingScheme slot: an OID in CI-SIS packages
    display_name: str | None = None


@dataclass(frozen=True)
class PatientRef:
    """An HL7v2 CX such as ``279035121518989^^^&1.2.250.1.213.1.4.10&ISO^NH``."""

    id: str
    oid: str | None
    type_code: str | None
    raw: str


@dataclass(frozen=True)
class XcnPerson:
    """An HL7v2 XCN (authorPerson, legalAuthenticator): ``id^family^given^...^&OID&ISO^...^IDNPS``."""

    raw: str
    id: str | None
    family: str | None
    given: str | None
    authority_oid: str | None
    id_type: str | None


@dataclass(frozen=True)
class XonOrganization:
    """An HL7v2 XON (authorInstitution): ``name^^^^^&OID&ISO^IDNST^^^identifier``."""

    raw: str
    name: str | None
    id: str | None
    authority_oid: str | None


@dataclass(frozen=True)
class XdsAuthor:
    person: XcnPerson | None
    institutions: tuple[XonOrganization, ...] = ()
    roles: tuple[str, ...] = ()
    specialties: tuple[str, ...] = ()
    telecoms: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourcePatientInfo:
    """sourcePatientInfo: ``PID-3`` ids, ``PID-5`` name, ``PID-7`` birth date, ``PID-8`` sex."""

    ids: tuple[str, ...] = ()
    family: str | None = None
    given: str | None = None
    birth_date: str | None = None
    sex: str | None = None


@dataclass(frozen=True)
class DocumentEntry:
    entry_id: str
    unique_id: str | None
    object_type: str | None
    patient: PatientRef | None
    source_patient_id: PatientRef | None
    source_patient_info: SourcePatientInfo
    class_code: XdsCode | None
    type_code: XdsCode | None
    format_code: XdsCode | None
    confidentiality_codes: tuple[XdsCode, ...]
    healthcare_facility_type_code: XdsCode | None
    practice_setting_code: XdsCode | None
    event_codes: tuple[XdsCode, ...]
    authors: tuple[XdsAuthor, ...]
    creation_time: datetime | None
    service_start_time: datetime | None
    service_stop_time: datetime | None
    hash: str | None
    size: int | None
    uri: str | None
    mime_type: str | None
    title: str | None
    comments: str | None
    language_code: str | None
    legal_authenticator: XcnPerson | None


@dataclass(frozen=True)
class SubmissionSet:
    entry_id: str
    unique_id: str | None
    source_id: str | None
    patient: PatientRef | None
    content_type_code: XdsCode | None
    authors: tuple[XdsAuthor, ...]
    submission_time: datetime | None
    title: str | None
    intended_recipients: tuple[str, ...]


@dataclass(frozen=True)
class Association:
    association_type: str  # short form: HasMember, signs, RPLC, APND, XFRM...
    source: str
    target: str
    status: str | None = None


@dataclass(frozen=True)
class XdmMetadata:
    submission_set: SubmissionSet | None
    entries: tuple[DocumentEntry, ...]
    associations: tuple[Association, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class XdmDocument:
    entry: DocumentEntry
    path: str  # the archive member holding the document
    content: bytes


@dataclass(frozen=True)
class XdmSubset:
    path: str  # the SUBSET directory inside the archive, e.g. "samplexdm/IHE_XDM/SUBSET01/"
    submission_set: SubmissionSet | None
    documents: tuple[XdmDocument, ...]
    associations: tuple[Association, ...]


@dataclass(frozen=True)
class XdmPackage:
    subsets: tuple[XdmSubset, ...]
    warnings: tuple[str, ...] = ()

    @property
    def submission_set(self) -> SubmissionSet | None:
        """The first subset's submission set (XDM over mail carries one)."""
        return self.subsets[0].submission_set if self.subsets else None

    @property
    def documents(self) -> tuple[XdmDocument, ...]:
        return tuple(document for subset in self.subsets for document in subset.documents)

    @property
    def signature_entry_ids(self) -> frozenset[str]:
        """Entries that sign others (IHE DSG ``signs`` association): signatures, not reports."""
        return frozenset(a.source for s in self.subsets for a in s.associations if a.association_type.casefold() == "signs")


# -- public entry points -------------------------------------------------------------


def read_xdm(data: bytes, *, limits: ZipLimits = DEFAULT_ZIP_LIMITS, xml_limits: XmlLimits = DEFAULT_XML_LIMITS) -> XdmPackage:
    """Read an IHE XDM zip: safe extraction, layout, METADATA, and hash/size verified documents."""
    members = read_zip_safely(data, limits=limits)
    index = {name.casefold(): name for name in members}
    subset_dirs = _find_subsets(list(members))
    warnings: list[str] = []
    subsets = tuple(_read_subset(subset_dir, members, index, xml_limits, warnings) for subset_dir in subset_dirs)
    return XdmPackage(subsets, tuple(warnings))


def parse_metadata(data: bytes, *, xml_limits: XmlLimits = DEFAULT_XML_LIMITS) -> XdmMetadata:
    """Parse an ebRIM 3.0 SubmitObjectsRequest, ignoring namespaces (undeclared prefixes are common)."""
    root = parse_xml(data, limits=xml_limits, namespace_aware=False)
    if root.tag not in ("SubmitObjectsRequest", "ProvideAndRegisterDocumentSetRequest", "RegistryObjectList"):
        raise XdmError(f"METADATA root is <{root.tag}>, expected an ebRIM SubmitObjectsRequest")
    return _MetadataReader(root).read()


def read_zip_safely(data: bytes, *, limits: ZipLimits = DEFAULT_ZIP_LIMITS) -> dict[str, bytes]:
    """Every regular file of the archive by name, after the safety checks of this module's docstring."""
    if len(data) > limits.max_archive_bytes:
        raise ArchiveSecurityError(f"archive of {len(data)} bytes refused: the limit is {limits.max_archive_bytes} bytes")
    _check_declared_entry_count(data, limits)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    # NotImplementedError: zipfile's answer to a central directory claiming a newer zip version.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error, UnicodeDecodeError,
            IndexError, KeyError, OverflowError, NotImplementedError) as error:
        raise XdmError(f"not a readable zip archive: {error}") from None
    with archive:
        files = _checked_members(archive.infolist(), limits)
        return _read_members(archive, files, limits)


def unsafe_path_reason(name: str) -> str | None:
    """Why ``name`` cannot be used as a path inside the archive, or ``None`` when it is safe."""
    if not name:
        return "empty name"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "control character in the name"
    if "\\" in name:
        return "backslash in the name (a Windows path separator)"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        return "'..' component (path traversal)"
    if any(part in ("", ".") for part in parts):
        return "empty or '.' path component"
    return None


# -- zip safety ---------------------------------------------------------------------


def _check_declared_entry_count(data: bytes, limits: ZipLimits) -> None:
    """Refuse a huge entry count from the end record before zipfile reads the whole central directory."""
    position = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if position < 0 or position + _EOCD.size > len(data):
        return  # zipfile reports the missing end record itself
    total_entries = _EOCD.unpack_from(data, position)[4]
    if total_entries != 0xFFFF and total_entries > limits.max_entries:
        raise ArchiveSecurityError(f"archive declares {total_entries} entries: the limit is {limits.max_entries}")


def _checked_members(infos: list[zipfile.ZipInfo], limits: ZipLimits) -> list[zipfile.ZipInfo]:
    if len(infos) > limits.max_entries:
        raise ArchiveSecurityError(f"archive has {len(infos)} entries: the limit is {limits.max_entries}")
    seen: dict[str, str] = {}
    declared_total = 0
    files: list[zipfile.ZipInfo] = []
    for info in infos:
        _check_member(info, limits)
        folded = info.filename.rstrip("/").casefold()
        if folded in seen:
            raise ArchiveSecurityError(f"duplicate entry {info.filename!r} (same name as {seen[folded]!r}, ignoring case)")
        seen[folded] = info.filename
        if not info.is_dir():
            declared_total += info.file_size
            files.append(info)
    if declared_total > limits.max_total_bytes:
        raise ArchiveSecurityError(f"archive declares {declared_total} uncompressed bytes: the limit is {limits.max_total_bytes}")
    return files


def _check_member(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    name = info.orig_filename
    reason = unsafe_path_reason(name)
    if reason:
        raise ArchiveSecurityError(f"entry {name!r} refused: {reason}")
    if info.flag_bits & 0x1:
        raise ArchiveSecurityError(f"entry {name!r} is encrypted: refused")
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        raise ArchiveSecurityError(f"entry {name!r} is a symbolic link: refused")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveSecurityError(f"entry {name!r} is not a regular file (mode {oct(file_type)}): refused")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ArchiveSecurityError(f"entry {name!r} uses compression method {info.compress_type}: only stored and deflate are accepted")
    _check_declared_size(info, limits)


def _check_declared_size(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    if info.file_size > limits.max_entry_bytes:
        raise ArchiveSecurityError(f"entry {info.filename!r} declares {info.file_size} bytes: the limit is {limits.max_entry_bytes}")
    ratio_exceeded = info.file_size > limits.max_ratio * max(info.compress_size, 1)
    if info.file_size > limits.ratio_floor_bytes and ratio_exceeded:
        raise ArchiveSecurityError(
            f"entry {info.filename!r} expands {info.compress_size} bytes into {info.file_size}: compression ratio above {limits.max_ratio}:1 (zip bomb)"
        )


def _read_members(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: ZipLimits) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    budget = limits.max_total_bytes
    for info in files:
        content = _read_member(archive, info, min(limits.max_entry_bytes, info.file_size, budget))
        budget -= len(content)
        members[info.filename] = content
    return members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, allowed: int) -> bytes:
    """Read one entry, never more than ``allowed`` bytes whatever the headers say."""
    chunks: list[bytes] = []
    total = 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(_READ_CHUNK):
                total += len(chunk)
                if total > allowed:
                    raise ArchiveSecurityError(f"entry {info.filename!r} holds more data than its header declares or the limits allow: refused")
                chunks.append(chunk)
    except zipfile.BadZipFile as error:
        raise ArchiveSecurityError(f"entry {info.filename!r} does not match its header ({error}): the archive lies or is corrupt") from None
    except (zlib.error, EOFError, ValueError, OSError, RuntimeError, NotImplementedError, struct.error, OverflowError) as error:
        raise XdmError(f"entry {info.filename!r} cannot be read: {error}") from None
    return b"".join(chunks)


# -- layout ----------------------------------------------------------------------------


def _find_subsets(names: list[str]) -> list[str]:
    """The SUBSET directories holding a METADATA.XML, at the root or under one wrapping folder."""
    subsets: list[str] = []
    for name in names:
        parts = name.split("/")
        folded = [part.casefold() for part in parts]
        if _XDM_FOLDER not in folded[:2]:
            continue
        position = folded.index(_XDM_FOLDER)
        if len(parts) == position + 3 and folded[-1] == _METADATA_NAME:
            subsets.append("/".join(parts[:-1]) + "/")
    if not subsets:
        raise XdmError(_missing_metadata_reason(names))
    roots = {subset.casefold().rsplit(f"{_XDM_FOLDER}/", 1)[0] for subset in subsets}
    if len(roots) > 1:
        raise XdmError(f"ambiguous XDM layout: IHE_XDM folders under several top folders ({', '.join(sorted(roots))})")
    return sorted(subsets, key=str.casefold)


def _missing_metadata_reason(names: list[str]) -> str:
    for name in names:
        parts = name.split("/")
        folded = [part.casefold() for part in parts]
        if _XDM_FOLDER in folded[:2] and len(parts) == folded.index(_XDM_FOLDER) + 2 and folded[-1].endswith(_METADATA_NAME) and folded[-1] != _METADATA_NAME:
            subset = parts[-1][: -len(_METADATA_NAME)]
            return (
                f"malformed XDM: {name!r} looks like {subset}/METADATA.xml with the '/' missing; "
                "the layout is not guessed (IHE ITI TF-2b §3.32 requires IHE_XDM/<subset>/METADATA.XML)"
            )
    return "not an IHE XDM package: no IHE_XDM/<subset>/METADATA.XML entry"


def _read_subset(subset_dir: str, members: dict[str, bytes], index: dict[str, str], xml_limits: XmlLimits, warnings: list[str]) -> XdmSubset:
    metadata_name = index[(subset_dir + "METADATA.xml").casefold()]
    try:
        metadata = parse_metadata(members[metadata_name], xml_limits=xml_limits)
    except DocumentError as error:
        raise XdmError(f"{metadata_name}: {error}") from None
    warnings.extend(f"{metadata_name}: {warning}" for warning in metadata.warnings)
    documents = tuple(_load_document(entry, subset_dir, members, index, warnings) for entry in metadata.entries)
    return XdmSubset(subset_dir, metadata.submission_set, documents, metadata.associations)


def _load_document(entry: DocumentEntry, subset_dir: str, members: dict[str, bytes], index: dict[str, str], warnings: list[str]) -> XdmDocument:
    path = _resolve_document_path(entry, subset_dir, index, warnings)
    content = members[path]
    _verify_integrity(entry, path, content, warnings)
    if content.startswith(b"PK\x03\x04"):
        warnings.append(f"{path}: the document is itself a zip archive; it is kept as is and not opened")
    return XdmDocument(entry, path, content)


def _resolve_document_path(entry: DocumentEntry, subset_dir: str, index: dict[str, str], warnings: list[str]) -> str:
    label = _entry_label(entry)
    if entry.uri is None:
        return _path_from_entry_id(entry, subset_dir, index, warnings)
    uri = unquote(entry.uri.strip())
    reason = unsafe_path_reason(uri)
    if reason:
        raise XdmError(f"document {label}: URI {entry.uri!r} refused: {reason}")
    xdm_dir = subset_dir.rstrip("/").rsplit("/", 1)[0] + "/"
    for candidate in (subset_dir + uri, xdm_dir + uri):
        if candidate.casefold() in index:
            return index[candidate.casefold()]
    raise XdmError(f"document {label}: URI {entry.uri!r} is neither in {subset_dir} nor in {xdm_dir}")


def _path_from_entry_id(entry: DocumentEntry, subset_dir: str, index: dict[str, str], warnings: list[str]) -> str:
    """No URI slot (the Direct sample): accept the one file of the subset named after the entry id."""
    prefix = subset_dir.casefold()
    stem = entry.entry_id.casefold()
    matches = [real for folded, real in index.items() if folded.startswith(prefix) and folded[len(prefix):].rsplit(".", 1)[0] == stem and "/" not in folded[len(prefix):]]
    if len(matches) != 1:
        raise XdmError(f"document {_entry_label(entry)}: no URI slot, and {len(matches)} files of {subset_dir} are named after entry {entry.entry_id!r}")
    warnings.append(f"document {_entry_label(entry)}: no URI slot; using {matches[0]}, named after the entry id")
    return matches[0]


def _verify_integrity(entry: DocumentEntry, path: str, content: bytes, warnings: list[str]) -> None:
    label = _entry_label(entry)
    if entry.size is None:
        warnings.append(f"document {label}: no size declared")
    elif entry.size != len(content):
        raise IntegrityError(f"document {label} ({path}): {len(content)} bytes, but METADATA declares size {entry.size}")
    if entry.hash is None:
        warnings.append(f"document {label}: no hash declared")
        return
    actual = hashlib.sha1(content, usedforsecurity=False).hexdigest()
    if actual != entry.hash.lower():
        raise IntegrityError(f"document {label} ({path}): SHA-1 {actual} does not match the declared hash {entry.hash}")


def _entry_label(entry: DocumentEntry) -> str:
    return entry.unique_id or entry.entry_id


# -- HL7v2 data types in XDS slots -----------------------------------------------------------


def _components(value: str) -> list[str]:
    return value.split("^")


def _component(parts: list[str], index: int) -> str | None:
    value = parts[index].strip() if index < len(parts) else ""
    return value or None


def _authority_oid(value: str | None) -> str | None:
    """``&1.2.250.1.213.1.4.10&ISO`` -> the universal id (HD.2)."""
    if not value:
        return None
    subparts = value.split("&")
    oid = subparts[1].strip() if len(subparts) > 1 else subparts[0].strip()
    return oid if oid and oid.casefold() != "null" else None


def parse_cx(value: str | None) -> PatientRef | None:
    """A patient id ``id^^^&OID&ISO^type``; ``None`` when empty or the placeholder ``null``."""
    if not value or not value.strip():
        return None
    parts = _components(value.strip())
    identifier = _component(parts, 0)
    if identifier is None or identifier.casefold() == "null":
        return None
    authority = _component(parts, 3) or next((p for p in parts[1:3] if "&" in p), None)
    return PatientRef(identifier, _authority_oid(authority), _component(parts, 4), value.strip())


def parse_xcn(value: str) -> XcnPerson:
    parts = _components(value)
    return XcnPerson(value, _component(parts, 0), _component(parts, 1), _component(parts, 2), _authority_oid(_component(parts, 8)), _component(parts, 12))


def parse_xon(value: str) -> XonOrganization:
    parts = _components(value)
    identifier = _component(parts, 9) or _component(parts, 2)
    return XonOrganization(value, _component(parts, 0), identifier, _authority_oid(_component(parts, 5)))


def _source_patient_info(values: list[str]) -> SourcePatientInfo:
    fields: dict[str, list[str]] = {}
    for value in values:
        key, _, content = value.partition("|")
        fields.setdefault(key.strip().upper(), []).append(content.strip())
    name = _components(fields.get("PID-5", [""])[0])
    return SourcePatientInfo(
        ids=tuple(v for v in fields.get("PID-3", []) if v),
        family=_component(name, 0),
        given=_component(name, 1),
        birth_date=(fields.get("PID-7", [""])[0] or None),
        sex=(fields.get("PID-8", [""])[0] or None),
    )


# -- METADATA reader ------------------------------------------------------------------------------


class _MetadataReader:
    """Reads DocumentEntries, the SubmissionSet and Associations by local names and XDS UUIDs."""

    def __init__(self, root: ET.Element) -> None:
        self.root = root
        self.warnings: list[str] = []
        self._classifications: dict[str, list[ET.Element]] = {}
        self._external_ids: dict[str, dict[str, str]] = {}

    def read(self) -> XdmMetadata:
        self._classifications = _classifications_by_object(self.root)
        self._external_ids = _external_ids_by_object(self.root)
        entries = tuple(self._document_entry(e) for e in self._extrinsic_objects())
        if not entries:
            self.warnings.append("no DocumentEntry in METADATA")
        return XdmMetadata(self._submission_set(), entries, self._associations(), tuple(self.warnings))

    def _extrinsic_objects(self) -> Iterator[ET.Element]:
        for element in self.root.iter("ExtrinsicObject"):
            object_type = element.get("objectType")
            if object_type in (DOCUMENT_ENTRY_STABLE, DOCUMENT_ENTRY_ON_DEMAND, None):
                if object_type is None:
                    self.warnings.append(f"ExtrinsicObject {element.get('id')!r} has no objectType: read as a DocumentEntry")
                yield element
            else:
                self.warnings.append(f"ExtrinsicObject {element.get('id')!r} of objectType {object_type!r} ignored")

    def _document_entry(self, element: ET.Element) -> DocumentEntry:
        entry_id = element.get("id") or ""
        slots = _slots(element)
        classes = self._classifications.get(entry_id, [])
        external = self._external_ids.get(entry_id, {})
        return DocumentEntry(
            entry_id=entry_id,
            unique_id=external.get(DE_UNIQUE_ID),
            object_type=element.get("objectType"),
            patient=parse_cx(external.get(DE_PATIENT_ID)),
            source_patient_id=parse_cx(_first(slots, "sourcePatientId")),
            source_patient_info=_source_patient_info(slots.get("sourcePatientInfo", [])),
            class_code=_first_code(classes, DE_CLASS_CODE),
            type_code=_first_code(classes, DE_TYPE_CODE),
            format_code=_first_code(classes, DE_FORMAT_CODE),
            confidentiality_codes=_codes(classes, DE_CONFIDENTIALITY_CODE),
            healthcare_facility_type_code=_first_code(classes, DE_FACILITY_TYPE_CODE),
            practice_setting_code=_first_code(classes, DE_PRACTICE_SETTING_CODE),
            event_codes=_codes(classes, DE_EVENT_CODE),
            authors=_authors(classes, DE_AUTHOR),
            creation_time=self._time(slots, "creationTime", entry_id),
            service_start_time=self._time(slots, "serviceStartTime", entry_id),
            service_stop_time=self._time(slots, "serviceStopTime", entry_id),
            hash=self._hash(slots, entry_id),
            size=self._size(slots, entry_id),
            uri=self._uri(slots),
            mime_type=element.get("mimeType"),
            title=_localized(element, "Name"),
            comments=_localized(element, "Description"),
            language_code=_first(slots, "languageCode"),
            legal_authenticator=_optional_xcn(_first(slots, "legalAuthenticator")),
        )

    def _submission_set(self) -> SubmissionSet | None:
        package = self._submission_set_package()
        if package is None:
            self.warnings.append("no SubmissionSet in METADATA")
            return None
        package_id = package.get("id") or ""
        slots = _slots(package)
        classes = self._classifications.get(package_id, [])
        external = self._external_ids.get(package_id, {})
        return SubmissionSet(
            entry_id=package_id,
            unique_id=external.get(SS_UNIQUE_ID),
            source_id=external.get(SS_SOURCE_ID),
            patient=parse_cx(external.get(SS_PATIENT_ID)),
            content_type_code=_first_code(classes, SS_CONTENT_TYPE_CODE),
            authors=_authors(classes, SS_AUTHOR),
            submission_time=self._time(slots, "submissionTime", package_id),
            title=_localized(package, "Name"),
            intended_recipients=tuple(slots.get("intendedRecipient", [])),
        )

    def _submission_set_package(self) -> ET.Element | None:
        packages = list(self.root.iter("RegistryPackage"))
        for package in packages:
            package_id = package.get("id") or ""
            nodes = {c.get("classificationNode") for c in self._classifications.get(package_id, [])}
            if SUBMISSION_SET_NODE in nodes or SS_UNIQUE_ID in self._external_ids.get(package_id, {}):
                return package
        return None

    def _associations(self) -> tuple[Association, ...]:
        associations = []
        for element in self.root.iter("Association"):
            kind = (element.get("associationType") or "").rsplit(":", 1)[-1]
            status = _first(_slots(element), "SubmissionSetStatus")
            associations.append(Association(kind, element.get("sourceObject") or "", element.get("targetObject") or "", status))
        return tuple(associations)

    def _time(self, slots: dict[str, list[str]], name: str, owner: str) -> datetime | None:
        value = _first(slots, name)
        if value is None:
            return None
        try:
            # XDS metadata times are UTC (IHE ITI TF-3 §4.2.3.1.5).
            return parse_hl7_time(value, default_tz=timezone.utc)
        except ValueError as error:
            self.warnings.append(f"{owner}: {name}: {error}; ignored")
            return None

    def _hash(self, slots: dict[str, list[str]], owner: str) -> str | None:
        value = _first(slots, "hash")
        if value is not None and not _SHA1_HEX.match(value):
            raise XdmError(f"entry {owner!r}: hash {value!r} is not a SHA-1 in hexadecimal")
        return value.lower() if value else None

    def _size(self, slots: dict[str, list[str]], owner: str) -> int | None:
        value = _first(slots, "size")
        if value is not None and not re.fullmatch(r"[0-9]{1,15}", value):
            raise XdmError(f"entry {owner!r}: size {value!r} is not a number of bytes")
        return int(value) if value else None

    @staticmethod
    def _uri(slots: dict[str, list[str]]) -> str | None:
        # Long URIs may be split over several values ("1|part", "2|part"); plain ones are a single value.
        values = slots.get("URI", [])
        if len(values) > 1 and all(re.match(r"^[0-9]{1,6}\|", v) for v in values):
            ordered = sorted(values, key=lambda v: int(v.split("|", 1)[0]))
            return "".join(v.split("|", 1)[1] for v in ordered) or None
        return values[0] if values else None


def _classifications_by_object(root: ET.Element) -> dict[str, list[ET.Element]]:
    """Every Classification, nested or top-level, grouped by its classifiedObject."""
    grouped: dict[str, list[ET.Element]] = {}
    for element in root.iter("Classification"):
        grouped.setdefault(element.get("classifiedObject") or "", []).append(element)
    return grouped


def _external_ids_by_object(root: ET.Element) -> dict[str, dict[str, str]]:
    """ExternalIdentifier values per registryObject, by identificationScheme (first one wins)."""
    grouped: dict[str, dict[str, str]] = {}
    for element in root.iter("ExternalIdentifier"):
        scheme, value = element.get("identificationScheme"), (element.get("value") or "").strip()
        if scheme and value:
            grouped.setdefault(element.get("registryObject") or "", {}).setdefault(scheme, value)
    return grouped


def _slots(element: ET.Element) -> dict[str, list[str]]:
    slots: dict[str, list[str]] = {}
    for slot in element.findall("Slot"):
        values = [" ".join((v.text or "").split()) for v in slot.iter("Value")]
        slots.setdefault(slot.get("name") or "", []).extend(v for v in values if v)
    return slots


def _first(slots: dict[str, list[str]], name: str) -> str | None:
    values = slots.get(name)
    return values[0] if values else None


def _localized(element: ET.Element, child: str) -> str | None:
    holder = element.find(child)
    strings = holder.findall("LocalizedString") if holder is not None else []
    return next((s.get("value", "").strip() for s in strings if s.get("value", "").strip()), None)


def _code(classification: ET.Element) -> XdsCode | None:
    code = (classification.get("nodeRepresentation") or "").strip()
    if not code:
        return None
    return XdsCode(code, _first(_slots(classification), "codingScheme"), _localized(classification, "Name"))


def _codes(classifications: list[ET.Element], scheme: str) -> tuple[XdsCode, ...]:
    codes = (_code(c) for c in classifications if c.get("classificationScheme") == scheme)
    return tuple(code for code in codes if code is not None)


def _first_code(classifications: list[ET.Element], scheme: str) -> XdsCode | None:
    codes = _codes(classifications, scheme)
    return codes[0] if codes else None


def _authors(classifications: list[ET.Element], scheme: str) -> tuple[XdsAuthor, ...]:
    authors = []
    for classification in classifications:
        if classification.get("classificationScheme") != scheme:
            continue
        slots = _slots(classification)
        author = XdsAuthor(
            person=_optional_xcn(_first(slots, "authorPerson")),
            institutions=tuple(parse_xon(v) for v in slots.get("authorInstitution", [])),
            roles=tuple(slots.get("authorRole", [])),
            specialties=tuple(slots.get("authorSpecialty", [])),
            telecoms=tuple(slots.get("authorTelecommunication", [])),
        )
        if author != XdsAuthor(person=None):  # an empty author classification says nothing
            authors.append(author)
    return tuple(authors)


def _optional_xcn(value: str | None) -> XcnPerson | None:
    return parse_xcn(value) if value else None

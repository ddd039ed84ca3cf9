"""IHE XDM reading: the Direct samples, packages built here, and hostile archives."""

from __future__ import annotations

import hashlib
import stat
import struct
import zipfile
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dmp_bridge.errors import ArchiveSecurityError, DocumentError, IntegrityError, XdmError
from gateway.dmp_bridge.xdm import ZipLimits, parse_cx, parse_metadata, parse_xcn, parse_xon, read_xdm, read_zip_safely, unsafe_path_reason
from tests.dmp_bridge.xdm_builder import CDA_BYTES, SAMPLES, TEST_PATIENT_ID, Entry, build_xdm, metadata_xml, needs_samples, zip_bytes


# -- the Direct samples --------------------------------------------------------------------------------------


@needs_samples
def test_direct_sample_with_wrapping_folder_and_mixed_case() -> None:
    package = read_xdm((SAMPLES / "samplexdm.zip").read_bytes())
    assert len(package.subsets) == 1 and package.subsets[0].path == "samplexdm/IHE_XDM/SUBSET01/"
    [document] = package.documents
    assert document.path == "samplexdm/IHE_XDM/SUBSET01/Document01.xml"
    assert hashlib.sha1(document.content).hexdigest() == "2f016bdeba83855ec76bd1102d9da6a79590f1a9"
    entry = document.entry
    assert entry.hash == "2f016bdeba83855ec76bd1102d9da6a79590f1a9"
    assert entry.unique_id == "1.3.6.1.4.1.21367.2005.3.9999.32"
    assert entry.type_code is not None and entry.type_code.code == "34133-9"
    assert entry.mime_type == "text/xml" and entry.language_code == "en-us"
    assert entry.source_patient_info.family == "Doe" and entry.source_patient_info.birth_date == "19560527"
    assert entry.creation_time == datetime(2005, 12, 24, tzinfo=timezone.utc)
    assert entry.authors[0].person is not None and entry.authors[0].person.authority_oid == "1.3.6.1.4.1.21367.3100.1"
    submission = package.submission_set
    assert submission is not None and submission.unique_id == "1.3.6.1.4.1.21367.2005.3.9999.33" and submission.source_id == "3670984664"
    assert package.subsets[0].associations[0].association_type == "HasMember"
    # No URI and no size slot in this sample: salvaged by entry id, and said so.
    assert any("no URI slot" in w for w in package.warnings)
    assert any("no size declared" in w for w in package.warnings)


@needs_samples
def test_malformed_direct_sample_is_refused_with_its_reason() -> None:
    with pytest.raises(XdmError, match=r"SUBSET01METADATA\.xml.*'/' missing"):
        read_xdm((SAMPLES / "xdm.zip").read_bytes())


@needs_samples
def test_malformed_sample_metadata_itself_parses_leniently() -> None:
    with zipfile.ZipFile(SAMPLES / "xdm.zip") as archive:
        metadata = parse_metadata(archive.read("IHE_XDM/SUBSET01METADATA.xml"))
    [entry] = metadata.entries
    assert entry.patient is None and entry.source_patient_id is None  # "null^^^&null&ISO"
    assert entry.size == 4 and entry.uri == "871efced-488f-4699-b38d-015791e7ef04.txt"
    assert metadata.submission_set is not None and metadata.submission_set.patient is None


# -- packages built here ------------------------------------------------------------------------------------


def test_french_package_reads_every_field() -> None:
    pdf = b"%PDF-1.4\n%%EOF\n"
    package = read_xdm(build_xdm([Entry("DOC0001", "DOC0001.XML", CDA_BYTES, unique_id="1.2.3"), Entry("DOC0002", "DOC0002.PDF", pdf, mime_type="application/pdf")]))
    first, second = package.documents
    assert first.content == CDA_BYTES and second.content == pdf
    entry = first.entry
    assert entry.patient is not None and (entry.patient.id, entry.patient.oid, entry.patient.type_code) == ("279035121518989", "1.2.250.1.213.1.4.10", "NH")
    assert entry.source_patient_id is not None and entry.source_patient_id.oid == "1.2.3.4.567.8.9.10"
    info = entry.source_patient_info
    assert (info.family, info.given, info.birth_date, info.sex) == ("PAT-TROIS", "DOMINIQUE", "19790328", "F")
    assert entry.class_code is not None and (entry.class_code.code, entry.class_code.scheme) == ("11", "1.2.250.1.213.1.1.4.1")
    assert [c.code for c in entry.confidentiality_codes] == ["N"]
    assert entry.healthcare_facility_type_code is not None and entry.healthcare_facility_type_code.code == "SA25"
    assert entry.practice_setting_code is not None and entry.practice_setting_code.code == "AMBULATOIRE"
    assert [c.code for c in entry.event_codes] == ["18725-2"]
    assert entry.format_code is not None and entry.format_code.code == "urn:ihe:iti:xds-sd:pdf:2008"
    [author] = entry.authors
    assert author.person is not None and (author.person.id, author.person.family, author.person.id_type) == ("801234534765", "CAMPARINI", "IDNPS")
    assert author.institutions[0].id == "11120459876" and author.institutions[0].authority_oid == "1.2.250.1.71.4.2.2"
    assert author.specialties == ("G15_10/SM03^Médecin - Biologie médicale (SM)^1.2.250.1.213.1.1.4.5",)
    assert entry.legal_authenticator is not None and entry.legal_authenticator.id == "801234534765"
    assert (entry.service_start_time, entry.service_stop_time) == (datetime(2021, 1, 4, 8, 22, tzinfo=timezone.utc), datetime(2021, 1, 4, 15, 5, tzinfo=timezone.utc))
    assert entry.title == "Document DOC0001" and entry.unique_id == "1.2.3"
    submission = package.submission_set
    assert submission is not None and submission.patient is not None and submission.patient.id == "279035121518989"
    assert submission.content_type_code is not None and submission.content_type_code.code == "04"
    assert submission.submission_time == datetime(2021, 1, 4, 16, 0, tzinfo=timezone.utc)
    assert package.warnings == ()


def test_undeclared_prefixes_are_read() -> None:
    entries = [Entry("DOC0001", "DOC0001.XML", CDA_BYTES)]
    package = read_xdm(build_xdm(entries, metadata=metadata_xml(entries, declare_prefixes=False)))
    assert package.documents[0].content == CDA_BYTES


def test_uri_relative_to_ihe_xdm_like_the_drimbox_sample() -> None:
    package = read_xdm(build_xdm([Entry("KOS", "SUBSET01/KOS_1_1.DCM", b"DICM", mime_type="application/dicom")]))
    assert package.documents[0].path == "IHE_XDM/SUBSET01/KOS_1_1.DCM"


def test_names_compare_without_case_and_one_top_folder_is_accepted() -> None:
    entries = [Entry("DOC0001", "doc0001.xml", CDA_BYTES)]
    data = zip_bytes([("Envoi/ihe_xdm/subset01/metadata.xml", metadata_xml(entries)), ("Envoi/ihe_xdm/subset01/DOC0001.XML", CDA_BYTES)])
    package = read_xdm(data)
    assert package.documents[0].path == "Envoi/ihe_xdm/subset01/DOC0001.XML"


def test_several_subsets_are_all_read() -> None:
    first, second = [Entry("A", "A.XML", CDA_BYTES)], [Entry("B", "B.XML", b"<x/>")]
    data = zip_bytes([
        ("IHE_XDM/SUBSET01/METADATA.XML", metadata_xml(first)), ("IHE_XDM/SUBSET01/A.XML", CDA_BYTES),
        ("IHE_XDM/SUBSET02/METADATA.XML", metadata_xml(second)), ("IHE_XDM/SUBSET02/B.XML", b"<x/>"),
    ])
    package = read_xdm(data)
    assert [d.path for d in package.documents] == ["IHE_XDM/SUBSET01/A.XML", "IHE_XDM/SUBSET02/B.XML"]


def test_signature_entries_are_recognised() -> None:
    entries = [Entry("DOC0001", "DOC0001.XML", CDA_BYTES), Entry("SIG", "SIG.XML", b"<Signature/>", format_code="http://www.w3.org/2000/09/xmldsig#")]
    package = read_xdm(build_xdm(entries, metadata=metadata_xml(entries, signs=("SIG", "SubmissionSet01"))))
    assert package.signature_entry_ids == frozenset({"SIG"})


def test_nested_zip_is_kept_but_not_opened() -> None:
    inner = zip_bytes([("../../evil", b"x")])
    package = read_xdm(build_xdm([Entry("Z", "Z.ZIP", inner, mime_type="application/zip")]))
    assert package.documents[0].content == inner
    assert any("not opened" in w for w in package.warnings)


# -- integrity --------------------------------------------------------------------------------------------------


def test_wrong_hash_names_the_document() -> None:
    with pytest.raises(IntegrityError, match=r"1\.2\.250\.1\.999\.7 .*does not match the declared hash"):
        read_xdm(build_xdm([Entry("DOC0001", "DOC0001.XML", CDA_BYTES, unique_id="1.2.250.1.999.7", hash="0" * 40)]))


def test_wrong_size_names_the_document() -> None:
    with pytest.raises(IntegrityError, match="DOC0001.XML.*declares size 5"):
        read_xdm(build_xdm([Entry("DOC0001", "DOC0001.XML", CDA_BYTES, size=5)]))


def test_malformed_hash_is_refused() -> None:
    with pytest.raises(XdmError, match="not a SHA-1"):
        read_xdm(build_xdm([Entry("DOC0001", "DOC0001.XML", CDA_BYTES, hash="xyz")]))


@pytest.mark.parametrize("uri", ["../../etc/passwd", "/etc/passwd", "..\\..\\evil", "%2e%2e/%2e%2e/evil", "C:/evil"])
def test_uri_outside_the_package_is_refused(uri: str) -> None:
    entries = [Entry("DOC0001", uri, CDA_BYTES)]
    data = zip_bytes([("IHE_XDM/SUBSET01/METADATA.XML", metadata_xml(entries)), ("IHE_XDM/SUBSET01/DOC0001.XML", CDA_BYTES)])
    with pytest.raises(XdmError, match="URI .* refused"):
        read_xdm(data)


def test_missing_document_is_refused() -> None:
    entries = [Entry("DOC0001", "DOC0001.XML", CDA_BYTES)]
    with pytest.raises(XdmError, match="neither in"):
        read_xdm(zip_bytes([("IHE_XDM/SUBSET01/METADATA.XML", metadata_xml(entries))]))


def test_package_without_metadata_is_not_xdm() -> None:
    with pytest.raises(XdmError, match="no IHE_XDM/<subset>/METADATA.XML"):
        read_xdm(zip_bytes([("IHE_XDM/SUBSET01/DOC.XML", CDA_BYTES)]))


def test_metadata_too_deep_in_the_tree_is_not_found() -> None:
    with pytest.raises(XdmError, match="no IHE_XDM"):
        read_xdm(zip_bytes([("a/b/IHE_XDM/SUBSET01/METADATA.XML", metadata_xml([]))]))


def test_two_top_folders_are_ambiguous() -> None:
    data = zip_bytes([("a/IHE_XDM/SUBSET01/METADATA.XML", metadata_xml([])), ("b/IHE_XDM/SUBSET01/METADATA.XML", metadata_xml([]))])
    with pytest.raises(XdmError, match="ambiguous"):
        read_xdm(data)


def test_hostile_metadata_is_refused() -> None:
    bomb = b'<!DOCTYPE x [<!ENTITY a "aaaa">]><SubmitObjectsRequest>&a;</SubmitObjectsRequest>'
    with pytest.raises(XdmError, match="METADATA.XML: XML with a DTD"):
        read_xdm(build_xdm([], metadata=bomb))
    with pytest.raises(XdmError, match="expected an ebRIM SubmitObjectsRequest"):
        read_xdm(build_xdm([], metadata=b"<html/>"))


# -- hostile archives -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil", "path traversal"),
        ("IHE_XDM/../../evil", "path traversal"),
        ("/etc/cron.d/evil", "absolute path"),
        ("C:/Windows/evil", "absolute path"),
        ("IHE_XDM\\..\\evil", "backslash"),
        ("IHE_XDM//evil", "empty or '.'"),
        ("IHE_XDM/./evil", "empty or '.'"),
        ("IHE_XDM/evil\x01", "control character"),
    ],
)
def test_unsafe_entry_names_are_refused(name: str, reason: str) -> None:
    with pytest.raises(ArchiveSecurityError, match=reason):
        read_xdm(zip_bytes([("IHE_XDM/SUBSET01/METADATA.XML", metadata_xml([])), (name, b"x")]))


def test_duplicate_names_are_refused_even_with_another_case() -> None:
    for second in ("IHE_XDM/SUBSET01/DOC.XML", "ihe_xdm/subset01/doc.xml"):
        with pytest.raises(ArchiveSecurityError, match="duplicate entry"):
            read_zip_safely(zip_bytes([("IHE_XDM/SUBSET01/DOC.XML", b"a"), (second, b"b")]))


def test_symlink_entry_is_refused() -> None:
    link = zipfile.ZipInfo("IHE_XDM/SUBSET01/DOC.XML")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(ArchiveSecurityError, match="symbolic link"):
        read_zip_safely(zip_bytes([(link, b"/etc/passwd")]))


def test_device_entry_is_refused() -> None:
    fifo = zipfile.ZipInfo("fifo")
    fifo.create_system = 3
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    with pytest.raises(ArchiveSecurityError, match="not a regular file"):
        read_zip_safely(zip_bytes([(fifo, b"")]))


def test_encrypted_entry_is_refused() -> None:
    data = bytearray(zip_bytes([("secret.xml", b"<a/>")], compression=zipfile.ZIP_STORED))
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        position = data.find(signature)
        flags = struct.unpack_from("<H", data, position + flag_offset)[0]
        struct.pack_into("<H", data, position + flag_offset, flags | 0x1)
    with pytest.raises(ArchiveSecurityError, match="encrypted"):
        read_zip_safely(bytes(data))


def test_other_compression_methods_are_refused() -> None:
    with pytest.raises(ArchiveSecurityError, match="compression method"):
        read_zip_safely(zip_bytes([("a.xml", b"<a/>")], compression=zipfile.ZIP_BZIP2))


def patch_declared_size(data: bytes, uncompressed: int) -> bytes:
    """Rewrite the uncompressed size of every entry, in local headers and central directory."""
    patched = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        position = patched.find(signature)
        while position >= 0:
            struct.pack_into("<L", patched, position + offset, uncompressed)
            position = patched.find(signature, position + 4)
    return bytes(patched)


def test_one_gigabyte_declared_entry_is_refused_before_reading() -> None:
    data = patch_declared_size(zip_bytes([("big.xml", b"<a/>")]), 1 << 30)
    with pytest.raises(ArchiveSecurityError, match="declares 1073741824 bytes"):
        read_zip_safely(data)


def test_thousand_to_one_ratio_bomb_is_refused() -> None:
    data = zip_bytes([("bomb.xml", b"\0" * (5 * 1024 * 1024))])
    assert len(data) < 10_000
    with pytest.raises(ArchiveSecurityError, match="zip bomb"):
        read_zip_safely(data)


def test_total_declared_size_is_bounded() -> None:
    data = zip_bytes([(f"f{i}.bin", bytes(range(256)) * 40) for i in range(5)])
    with pytest.raises(ArchiveSecurityError, match="declares 51200 uncompressed bytes"):
        read_zip_safely(data, limits=ZipLimits(max_total_bytes=50_000))


def test_lying_size_header_is_caught_while_reading() -> None:
    # The headers claim 10 bytes: the ratio check passes, the data holds 5 MB.
    data = patch_declared_size(zip_bytes([("bomb.xml", b"\0" * (5 * 1024 * 1024))]), 10)
    with pytest.raises(ArchiveSecurityError, match="does not match its header"):
        read_zip_safely(data)


def test_too_many_entries_are_refused() -> None:
    data = zip_bytes([(f"f{i}", b"") for i in range(30)])
    with pytest.raises(ArchiveSecurityError, match="30 entries"):
        read_zip_safely(data, limits=ZipLimits(max_entries=20))


def test_oversized_archive_is_refused() -> None:
    with pytest.raises(ArchiveSecurityError, match="limit is 100 bytes"):
        read_zip_safely(zip_bytes([("a", b"x" * 1000)], compression=zipfile.ZIP_STORED), limits=ZipLimits(max_archive_bytes=100))


def test_not_a_zip() -> None:
    with pytest.raises(XdmError, match="not a readable zip"):
        read_xdm(b"%PDF-1.7 not a zip")


# -- value parsers ---------------------------------------------------------------------------------------------


def test_hl7v2_value_parsers() -> None:
    cx = parse_cx(TEST_PATIENT_ID)
    assert cx is not None and (cx.id, cx.oid, cx.type_code) == ("279035121518989", "1.2.250.1.213.1.4.10", "NH")
    assert parse_cx("null^^^&null&ISO") is None and parse_cx("") is None and parse_cx(None) is None
    xcn = parse_xcn("899700367909^DOC0036790^KIT^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS")
    assert (xcn.id, xcn.family, xcn.given, xcn.authority_oid, xcn.id_type) == ("899700367909", "DOC0036790", "KIT", "1.2.250.1.71.4.2.1", "IDNPS")
    xon = parse_xon("BCOM^^^^^&1.2.250.1.71.4.2.2&ISO^IDNST^^^499700367909006")
    assert (xon.name, xon.id, xon.authority_oid) == ("BCOM", "499700367909006", "1.2.250.1.71.4.2.2")


def test_unsafe_path_reason_accepts_ordinary_names() -> None:
    assert unsafe_path_reason("IHE_XDM/SUBSET01/DOC0001.XML") is None
    assert unsafe_path_reason("IHE_XDM/SUBSET01/") is None


# -- fuzzing ------------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_document_errors(data: bytes) -> None:
    try:
        read_xdm(data)
    except DocumentError:
        pass


VALID_PACKAGE = build_xdm([Entry("DOC0001", "DOC0001.XML", CDA_BYTES)])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(VALID_PACKAGE) - 1), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8))
def test_corrupted_package_raises_only_document_errors(changes: list[tuple[int, int]]) -> None:
    data = bytearray(VALID_PACKAGE)
    for position, value in changes:
        data[position] = value
    try:
        read_xdm(bytes(data))
    except DocumentError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=len(VALID_PACKAGE)))
def test_truncated_or_padded_package_raises_only_document_errors(junk: bytes, cut: int) -> None:
    for data in (VALID_PACKAGE[:cut], VALID_PACKAGE[:cut] + junk, junk + VALID_PACKAGE):
        try:
            read_xdm(data)
        except DocumentError:
            pass


def test_archive_claiming_an_unsupported_zip_version_is_refused() -> None:
    """Found by the corruption fuzz test: zipfile raises NotImplementedError for version 6.4 entries."""
    data = bytearray(build_xdm([Entry("Document01", "DOC0001.XML", CDA_BYTES)]))
    central = data.rfind(b"PK\x01\x02")
    data[central + 6] = 64  # "version needed to extract" = 6.4
    with pytest.raises(XdmError, match="not a readable zip archive"):
        read_zip_safely(bytes(data))

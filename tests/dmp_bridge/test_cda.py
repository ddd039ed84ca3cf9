"""CDA R2 header reading on the CI-SIS examples and the US CCD, and refusals of what is not a CDA."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dmp_bridge.cda import BodyKind, CdaDocument, InstanceIdentifier, parse_cda, parse_hl7_time
from gateway.dmp_bridge.errors import CdaContentError, DocumentError, NotACdaError

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"
PARIS_WINTER = timezone(timedelta(hours=1))
INS_TEST_OID = "1.2.250.1.213.1.4.10"

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def cda(name: str) -> CdaDocument:
    return parse_cda(sample(name))


# (file, id root, setId root, version, type code, title)
CI_SIS_SAMPLES = [
    ("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml", "1.2.250.1.213.1.1.1.45.2024.2.1", "1.2.250.1.213.1.1.1.45.2024.2", 2, "18748-4",
     "CR d’imagerie médicale - Scanner Tête + Cou + Thorax avec injection"),
    ("BIO-CR-BIO_2021.01_Microbiologie_V1.xml", "1.2.250.1.213.1.1.1.55.2021.6.1", "1.2.250.1.213.1.1.1.55.2021.6", 1, "11502-2",
     "Compte rendu d'examens biologiques"),
    ("BIO-CR-BIO_2021.01_Microbiologie_V2.xml", "1.2.250.1.213.1.1.1.55.2021.6.2", "1.2.250.1.213.1.1.1.55.2021.6", 2, "11502-2",
     "Compte rendu d'examens biologiques"),
    ("LDL-SES_2022.01.xml", "1.2.250.1.213.1.1.1.29.2022.1.1", "1.2.250.1.213.1.1.1.29.2022.1", 1, "11490-0",
     "Lettre de liaison à la sortie de l'établissement de santé"),
    ("CSE-MDE_2023.01.xml", "1.2.250.1.213.1.1.1.5.2023.1.1", "1.2.250.1.213.1.1.1.5.4.2023.1", 4, "29274-8",
     "Carnet de santé de l'enfant - Mesures de l'enfant"),
    ("VAC-NOTE_2023.01.xml", "1.2.250.1.213.1.1.1.46.2023.1.1", "1.2.250.1.213.1.1.1.46.2023.1", 1, "87273-9", "NOTE DE VACCINATION"),
]


@needs_samples
@pytest.mark.parametrize(("name", "doc_id", "set_id", "version", "type_code", "title"), CI_SIS_SAMPLES, ids=[s[0] for s in CI_SIS_SAMPLES])
def test_ci_sis_samples_header(name: str, doc_id: str, set_id: str, version: int, type_code: str, title: str) -> None:
    document = cda(name)
    assert document.id == InstanceIdentifier(doc_id)
    assert document.set_id == InstanceIdentifier(set_id)
    assert document.version_number == version
    assert document.code is not None and document.code.code == type_code
    assert document.code.code_system == "2.16.840.1.113883.6.1"
    assert document.title == title
    assert document.effective_time is not None and document.effective_time.tzinfo is not None
    assert document.confidentiality is not None and document.confidentiality.code == "N"
    assert document.language_code == "fr-FR" and document.realm_code == "FR"
    assert InstanceIdentifier("1.2.250.1.213.1.1.1.1") in document.template_ids
    assert document.warnings == ()


@needs_samples
@pytest.mark.parametrize("name", [s[0] for s in CI_SIS_SAMPLES if not s[0].startswith("CSE")])
def test_ci_sis_patient_traits(name: str) -> None:
    patient = cda(name).patient
    assert patient is not None
    assert InstanceIdentifier(INS_TEST_OID, "279035121518989") in patient.ids
    assert InstanceIdentifier("1.2.3.4.567.8.9.10", "1234567890121") in patient.ids
    assert patient.birth_family_name == "PAT-TROIS"
    assert patient.first_given_name == "DOMINIQUE"
    assert patient.given_names == ("DOMINIQUE MARIE-LOUISE",)
    assert patient.used_family_name == "PAT-TROIS" and patient.used_given_name == "DOMINIQUE"
    assert patient.sex == "F"
    assert patient.birth_date == date(1979, 3, 28)
    assert patient.birthplace_code == "51215"
    assert patient.mailto == ("279035121518989@patient.mssante.fr",)


@needs_samples
def test_production_root_sample_keeps_its_ids() -> None:
    patient = cda("CSE-MDE_2023.01.xml").patient
    assert patient is not None
    assert patient.ids[0] == InstanceIdentifier("1.2.250.1.213.1.4.8", "222127505611201")
    assert (patient.birth_family_name, patient.first_given_name, patient.birth_date) == ("DECOURCY", "Ruth", date(2022, 12, 25))
    assert patient.mailto == ()


@needs_samples
def test_level_1_document_yields_the_embedded_pdf() -> None:
    document = cda("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml")
    assert document.body is not None
    assert document.body.kind is BodyKind.UNSTRUCTURED
    assert document.body.media_type == "application/pdf" and document.body.representation == "B64"
    assert document.body.content is not None and document.body.content.startswith(b"%PDF-")
    assert document.body.content.rstrip().endswith(b"%%EOF")
    assert InstanceIdentifier("1.3.6.1.4.1.19376.1.2.20") in document.template_ids


@needs_samples
def test_level_1_header_participants() -> None:
    document = cda("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml")
    assert document.effective_time == datetime(2021, 1, 8, 11, 17, tzinfo=PARIS_WINTER)
    author = document.authors[0]
    assert author.idnps == "801234560801"
    assert author.profession is not None and (author.profession.code, author.profession.code_system) == ("G15_10/SM44", "1.2.250.1.213.1.1.4.5")
    assert author.name is not None and (author.name.family, author.name.given) == ("BIDEAULT", ("Jacques",))
    assert author.time == datetime(2021, 1, 8, 11, 17, tzinfo=PARIS_WINTER)
    assert author.organization is not None and author.organization.idnst == "1750803447"
    assert author.organization.name == "Centre de radiologie Ambroise"
    assert document.custodian is not None and document.custodian.idnst == "1750803447"
    assert document.legal_authenticator is not None and document.legal_authenticator.idnps == "801234560801"
    assert document.legal_authenticator.signature_code == "S"
    assert document.healthcare_facility_type is not None and document.healthcare_facility_type.code == "SA08"
    assert document.practice_setting is not None and document.practice_setting.code == "AMBULATOIRE"
    assert [e.code.code for e in document.service_events if e.code] == ["24727-0", "36235-0", "24978-9", "Z13.9"]
    first = document.service_events[0]
    assert (first.start, first.stop) == (datetime(2021, 1, 8, 10, 25, tzinfo=PARIS_WINTER), datetime(2021, 1, 8, 11, 17, tzinfo=PARIS_WINTER))
    assert document.replaces == (InstanceIdentifier("90E1C8EC-F951-4B26-A305-A34848818DD6"),)


@needs_samples
def test_bio_versions_share_a_set_and_v2_replaces_an_id_that_is_not_v1() -> None:
    v1, v2 = cda("BIO-CR-BIO_2021.01_Microbiologie_V1.xml"), cda("BIO-CR-BIO_2021.01_Microbiologie_V2.xml")
    assert v1.set_id == v2.set_id
    assert (v1.version_number, v2.version_number) == (1, 2)
    assert v1.replaces == ()
    assert v2.replaces == (InstanceIdentifier("1.2.250.1.213.1.1.1.55.12345.8"),)
    assert v1.id not in v2.replaces
    assert v1.body is not None and v1.body.kind is BodyKind.STRUCTURED and v1.body.content is None
    # The performer's "cadre d'exercice" wins over other organisations' settings.
    assert v1.practice_setting is not None and v1.practice_setting.code == "AMBULATOIRE"


@needs_samples
def test_us_ccd_parses_without_ins() -> None:
    document = cda("sampleccd.xml")
    assert document.id == InstanceIdentifier("db734647-fc99-424c-a864-7e3cda82e703")
    assert document.code is not None and document.code.code == "34133-9"
    assert document.set_id is None and document.version_number is None
    assert document.patient is not None
    assert document.patient.ids == (InstanceIdentifier("GSIHealth", "1111111111"),)
    assert (document.patient.birth_family_name, document.patient.first_given_name, document.patient.sex) == ("Doe", "John", "M")
    assert document.effective_time == datetime(2000, 4, 7, 13, 0, tzinfo=timezone(timedelta(hours=5)))


def minimal_cda(header: str = "", body: str = "<component><structuredBody/></component>") -> bytes:
    return f'<ClinicalDocument xmlns="urn:hl7-org:v3"><id root="1.2.3" extension="X"/>{header}{body}</ClinicalDocument>'.encode()


def test_minimal_document_reads_and_reports_what_is_missing() -> None:
    document = parse_cda(minimal_cda(body=""))
    assert document.id == InstanceIdentifier("1.2.3", "X")
    assert document.id.xds_unique_id == "1.2.3^X"
    assert document.patient is None and document.body is None
    assert any("no recordTarget" in w for w in document.warnings)
    assert any("no body" in w.lower() for w in document.warnings)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"<ClinicalDocument/>", "namespace None"),
        (b'<ClinicalDocument xmlns="urn:hl7-org:v2"/>', "namespace 'urn:hl7-org:v2'"),
        (b'<Bundle xmlns="http://hl7.org/fhir"/>', "root element is <Bundle>"),
        (b'<x:ClinicalDocument xmlns:x="urn:other"/>', "namespace 'urn:other'"),
    ],
)
def test_other_xml_is_not_a_cda(document: bytes, message: str) -> None:
    with pytest.raises(NotACdaError, match=message):
        parse_cda(document)


def test_missing_document_id_is_refused() -> None:
    with pytest.raises(CdaContentError, match="document id"):
        parse_cda(b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>x</title></ClinicalDocument>')


def test_bad_base64_body_is_refused() -> None:
    body = '<component><nonXMLBody><text mediaType="application/pdf" representation="B64">not*base64!</text></nonXMLBody></component>'
    with pytest.raises(CdaContentError, match="base64"):
        parse_cda(minimal_cda(body=body))


def test_oversized_body_is_refused() -> None:
    body = f'<component><nonXMLBody><text mediaType="application/pdf" representation="B64">{"QUFB" * 1000}</text></nonXMLBody></component>'
    with pytest.raises(CdaContentError, match="larger than 100 bytes"):
        parse_cda(minimal_cda(body=body), max_body_bytes=100)


def test_text_body_and_external_reference() -> None:
    text = parse_cda(minimal_cda(body='<component><nonXMLBody><text mediaType="text/plain">bonjour</text></nonXMLBody></component>'))
    assert text.body is not None and text.body.content == b"bonjour" and text.body.representation == "TXT"
    referenced = parse_cda(minimal_cda(body='<component><nonXMLBody><text mediaType="application/pdf"><reference value="x.pdf"/></text></nonXMLBody></component>'))
    assert referenced.body is not None and referenced.body.content is None
    assert any("reference" in w for w in referenced.warnings)


def test_names_without_qualifiers_and_bad_values_become_warnings() -> None:
    header = (
        '<effectiveTime value="2021-01-01"/><versionNumber value="two"/>'
        "<recordTarget><patientRole><id root=\"1.2\" extension=\"9\"/><patient><name><given>Jean Pierre</given><family>Martin</family></name>"
        '<birthTime value="19790231"/></patient></patientRole></recordTarget>'
    )
    document = parse_cda(minimal_cda(header))
    assert document.effective_time is None and document.version_number is None
    assert document.patient is not None
    assert (document.patient.birth_family_name, document.patient.first_given_name) == ("Martin", "Jean Pierre")
    assert document.patient.birth_date is None and document.patient.birth_time_raw == "19790231"
    assert len(document.warnings) == 3


def test_timestamp_without_offset_is_french_time_with_a_warning() -> None:
    document = parse_cda(minimal_cda('<effectiveTime value="20210701120000"/>'))
    assert document.effective_time is not None
    assert document.effective_time.utcoffset() == timedelta(hours=2)
    assert any("Europe/Paris" in w for w in document.warnings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20210108111700+0100", datetime(2021, 1, 8, 11, 17, tzinfo=PARIS_WINTER)),
        ("20210108", datetime(2021, 1, 8, tzinfo=timezone.utc)),
        ("2021", datetime(2021, 1, 1, tzinfo=timezone.utc)),
        ("20210108111700.5-0230", datetime(2021, 1, 8, 11, 17, 0, 500000, tzinfo=timezone(-timedelta(hours=2, minutes=30)))),
    ],
)
def test_parse_hl7_time(value: str, expected: datetime) -> None:
    assert parse_hl7_time(value, default_tz=timezone.utc) == expected


@pytest.mark.parametrize("value", ["", "2021-01-08", "20211308", "20210108111700+9900", "abc"])
def test_parse_hl7_time_refuses_garbage(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hl7_time(value)


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)), st.integers(min_value=-12 * 60, max_value=14 * 60))
def test_parse_hl7_time_round_trips(moment: datetime, offset_minutes: int) -> None:
    tz = timezone(timedelta(minutes=offset_minutes))
    aware = moment.replace(microsecond=0, tzinfo=tz)
    sign = "-" if offset_minutes < 0 else "+"
    text = aware.strftime("%Y%m%d%H%M%S") + f"{sign}{abs(offset_minutes) // 60:02d}{abs(offset_minutes) % 60:02d}"
    assert parse_hl7_time(text) == aware


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_document_errors(data: bytes) -> None:
    try:
        parse_cda(data)
    except DocumentError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_header_text_never_crashes(text: str) -> None:
    from xml.sax.saxutils import quoteattr

    header = f"<title>{text.replace('<', '').replace('&', '')}</title><effectiveTime value={quoteattr(text)}/><versionNumber value={quoteattr(text)}/>"
    try:
        parse_cda(minimal_cda(header))
    except DocumentError:
        pass

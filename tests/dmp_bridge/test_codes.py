"""classCode and formatCode from the ANS tables, for every CI-SIS sample; filed even when a mapping is missing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.dmp_bridge.cda import parse_cda
from gateway.dmp_bridge.codes import DATA_PACKAGE, code_tables, derive_xds_codes
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import OutcomeKind
from gateway.storage.db import Database
from tests.dmp_bridge.filing_world import BIO_V1, BIO_V2, SAMPLES, World, build_world, cda_message, message_with, sample

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")

A03 = "1.2.250.1.213.1.1.4.1"  # TRE_A03-ClasseDocument
A06 = "1.2.250.1.213.1.1.4.2.282"  # TRE_A06-FormatCodeComplementaire
A11 = "1.3.6.1.4.1.19376.1.2.3"  # TRE_A11-IheFormatCode

# sample -> (classCode, its display, formatCode, its system): the type code and the templateIds of each
# sample's header, looked up by hand in ASS_X04 and ASS_A11 / ASS_A12 (level 1).
EXPECTED = {
    "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml": ("31", "Imagerie médicale", "urn:ihe:iti:xds-sd:pdf:2008", A11),
    BIO_V1: ("10", "Compte rendu", "urn:ihe:lab:xd-lab:2008", A11),
    BIO_V2: ("10", "Compte rendu", "urn:ihe:lab:xd-lab:2008", A11),
    "LDL-SES_2022.01.xml": ("10", "Compte rendu", "urn:asip:ci-sis:ldl-ses:2017", A06),
    "CSE-MDE_2023.01.xml": ("10", "Compte rendu", "urn:ans:ci-sis:cse-mde:2023", A06),
    "VAC-NOTE_2023.01.xml": ("52", "Certificat, déclaration", "urn:asip:ci-sis:vac-note:2021", A06),
}
FILED_SAMPLES = {name: unique_id for name, unique_id in (
    ("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml", "1.2.250.1.213.1.1.1.45.2024.2.1"),
    (BIO_V1, "1.2.250.1.213.1.1.1.55.2021.6.1"),
    ("LDL-SES_2022.01.xml", "1.2.250.1.213.1.1.1.29.2022.1.1"),
    ("VAC-NOTE_2023.01.xml", "1.2.250.1.213.1.1.1.46.2023.1.1"),
)}


def test_every_ci_sis_sample_is_covered() -> None:
    cda_samples = {path.name for path in SAMPLES.glob("*.xml") if path.name != "sampleccd.xml"}
    assert cda_samples == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_codes_come_from_the_tables(name: str) -> None:
    class_code, class_display, format_code, format_system = EXPECTED[name]
    derived = derive_xds_codes(parse_cda(sample(name)), {})
    assert derived.gaps == ()
    assert derived.columns == {"class_code": class_code, "class_code_system": A03, "class_display": class_display,
                               "format_code": format_code, "format_code_system": format_system}


def test_the_us_ccd_gets_its_class_and_says_its_format_is_missing() -> None:
    derived = derive_xds_codes(parse_cda(sample("sampleccd.xml")), {})
    assert derived.columns == {"class_code": "11", "class_code_system": A03, "class_display": "Synthèse"}  # 34133-9
    assert len(derived.gaps) == 1 and "formatCode missing" in derived.gaps[0] and "2.16.840.1.113883.10.20.1" in derived.gaps[0]


def test_declared_values_are_kept() -> None:
    derived = derive_xds_codes(parse_cda(sample(BIO_V1)), {"class_code": "11", "format_code": "urn:x"})
    assert derived.columns == {} and derived.gaps == ()


def test_tables_are_data_with_known_code_systems() -> None:
    tables = code_tables()
    assert {coding.system for coding in tables.format_by_template.values()} == {A06, A11}
    assert {system for system, _code in tables.class_by_type} == {"2.16.840.1.113883.6.1", "1.2.250.1.213.1.1.4.12", "ASTM"}
    assert tables.format_by_media_type["application/pdf"].code == "urn:ihe:iti:xds-sd:pdf:2008"
    # Every class of the type table is a TRE_A03 class with a display (99, FEUILLE-DE-STYLE, has none published).
    from importlib import resources
    rows = list(csv.DictReader(resources.files(DATA_PACKAGE).joinpath("type_to_class.csv").read_text().splitlines()))
    assert len(rows) == len({(r["type_code_system"], r["type_code"]) for r in rows})  # no type mapped twice
    missing_display = {c.code for c in tables.class_by_type.values() if c.display is None}
    assert missing_display == {"99"}


@pytest.fixture
async def world(database: Database, settings: Settings) -> World:
    return await build_world(database, settings)


@pytest.mark.parametrize("name", sorted(FILED_SAMPLES))
async def test_filed_samples_carry_class_and_format(world: World, name: str) -> None:
    report = await world.file(cda_message(name))
    assert [o.outcome for o in report.outcomes] == [OutcomeKind.FILED] and report.outcomes[0].reason is None
    document = await RecordStore(world.db, world.blobs).get(FILED_SAMPLES[name])
    class_code, class_display, format_code, format_system = EXPECTED[name]
    assert (document.class_code, document.class_code_system, document.class_display) == (class_code, A03, class_display)
    assert (document.format_code, document.format_code_system) == (format_code, format_system)


async def test_a_document_without_mappings_is_filed_and_the_outcome_says_what_is_missing(world: World) -> None:
    content = (sample("VAC-NOTE_2023.01.xml").replace(b'root="1.2.250.1.213.1.1.1.46"', b'root="1.2.3.4.5"')
               .replace(b'code="87273-9"', b'code="99999-9"'))
    report = await world.file(message_with(("note.xml", content, "text/xml")))
    [outcome] = report.outcomes
    assert outcome.outcome == OutcomeKind.FILED
    assert outcome.reason is not None
    assert "classCode missing: document type 99999-9" in outcome.reason and "formatCode missing" in outcome.reason
    document = await RecordStore(world.db, world.blobs).get("1.2.250.1.213.1.1.1.46.2023.1.1")
    assert (document.class_code, document.format_code) == (None, None)

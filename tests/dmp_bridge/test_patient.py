"""INS identification: the four INS roots only, the NIR key, the mandatory traits, the production policy."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.directory.identifiers import add_nir_key
from gateway.dmp_bridge.cda import CdaPatient, InstanceIdentifier, parse_cda
from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.patient import (
    INS_ABSENT,
    INS_INCOMPLETE,
    INS_MISMATCH,
    UNKNOWN_PATIENT,
    IdentificationFailure,
    KnownPatientTraits,
    PatientIdentity,
    compare_with_known,
    identify_document,
    identify_patient,
    is_qualified_ins,
    normalize_name,
)

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
TEST_INS = "279035121518989"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def patient(ids: tuple[InstanceIdentifier, ...] = (InstanceIdentifier("1.2.250.1.213.1.4.10", TEST_INS),), **traits: object) -> CdaPatient:
    values: dict[str, object] = {
        "birth_family_name": "PAT-TROIS",
        "first_given_name": "DOMINIQUE",
        "given_names": ("DOMINIQUE MARIE-LOUISE",),
        "used_family_name": None,
        "used_given_name": None,
        "sex": "F",
        "birth_date": date(1979, 3, 28),
        "birth_time_raw": "19790328",
        "birthplace_code": "51215",
        "mailto": (),
    }
    values.update(traits)
    return CdaPatient(ids=ids, **values)  # type: ignore[arg-type]


@needs_samples
@pytest.mark.parametrize(
    "name",
    ["IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml", "BIO-CR-BIO_2021.01_Microbiologie_V1.xml", "BIO-CR-BIO_2021.01_Microbiologie_V2.xml",
     "LDL-SES_2022.01.xml", "VAC-NOTE_2023.01.xml"],
)
def test_ci_sis_samples_identify_the_test_ins(name: str) -> None:
    identity = identify_document(parse_cda(sample(name)), accept_production=False)
    assert isinstance(identity, PatientIdentity)
    assert (identity.ins, identity.oid, identity.kind) == (TEST_INS, "1.2.250.1.213.1.4.10", "INS-NIR test")
    assert (identity.birth_family_name, identity.first_given_name, identity.birth_date, identity.sex) == ("PAT-TROIS", "DOMINIQUE", date(1979, 3, 28), "F")
    assert identity.birthplace_code == "51215"
    assert not identity.is_production
    assert identity.xds_patient_id == f"{TEST_INS}^^^&1.2.250.1.213.1.4.10&ISO^NH"


@needs_samples
def test_production_root_is_refused_by_policy() -> None:
    failure = identify_document(parse_cda(sample("CSE-MDE_2023.01.xml")), accept_production=False)
    assert isinstance(failure, IdentificationFailure)
    assert failure.code is INS_ABSENT
    assert "production OID 1.2.250.1.213.1.4.8" in failure.reason


@needs_samples
def test_production_sample_value_is_fictitious_and_its_key_is_wrong() -> None:
    # Accepted by policy, the CSE-MDE value still fails the NIR key: it is not a usable INS.
    failure = identify_document(parse_cda(sample("CSE-MDE_2023.01.xml")), accept_production=True)
    assert isinstance(failure, IdentificationFailure)
    assert failure.code is INS_MISMATCH and "wrong INS key" in failure.reason
    assert failure.label != INS_ABSENT.label  # present with a wrong key: not "INS absent du document"


@needs_samples
def test_production_root_with_a_valid_key_is_accepted_when_allowed() -> None:
    valid = add_nir_key("2221275056112")
    document = parse_cda(sample("CSE-MDE_2023.01.xml").replace(b"222127505611201", valid.encode()))
    identity = identify_document(document, accept_production=True)
    assert isinstance(identity, PatientIdentity)
    assert identity.ins == valid and identity.is_production and identity.kind == "INS-NIR"
    assert (identity.birth_family_name, identity.first_given_name, identity.sex) == ("DECOURCY", "Ruth", "F")
    refused = identify_document(document, accept_production=False)
    assert isinstance(refused, IdentificationFailure) and refused.code is INS_ABSENT


@needs_samples
def test_us_ccd_has_no_ins() -> None:
    document = parse_cda(sample("sampleccd.xml"))
    failure = identify_document(document, accept_production=True)
    assert isinstance(failure, IdentificationFailure)
    assert failure.code is INS_ABSENT and failure.code == 903
    assert "GSIHealth" in failure.reason
    assert not is_qualified_ins(document.patient)


@needs_samples
def test_missing_traits_give_905() -> None:
    without_birth = re.sub(rb'<birthTime value="19790328"\s*/>', b"", sample("VAC-NOTE_2023.01.xml"))
    failure = identify_document(parse_cda(without_birth), accept_production=False)
    assert isinstance(failure, IdentificationFailure)
    assert failure.code is INS_INCOMPLETE and "birth date missing" in failure.reason


def test_every_missing_trait_is_named() -> None:
    failure = identify_patient(patient(birth_family_name=None, first_given_name=None, sex=None, birth_date=None), accept_production=True)
    assert isinstance(failure, IdentificationFailure) and failure.code is INS_INCOMPLETE
    for trait in ("birth family name", "first given name", "birth date", "sex"):
        assert trait in failure.reason


@pytest.mark.parametrize("root", ["1.2.250.1.213.1.4.13", "1.2.250.1.213.1.4.2"])
def test_other_roots_under_the_ins_arc_are_not_an_ins(root: str) -> None:
    failure = identify_patient(patient(ids=(InstanceIdentifier(root, TEST_INS),)), accept_production=True)
    assert isinstance(failure, IdentificationFailure) and failure.code is INS_ABSENT
    assert "not an INS" in failure.reason


def test_ins_with_a_wrong_key_or_non_ascii_digits_is_refused() -> None:
    for value in ("279035121518988", "２７９０３５１２１５１８９８９"):
        failure = identify_patient(patient(ids=(InstanceIdentifier("1.2.250.1.213.1.4.10", value),)), accept_production=True)
        # The INS is there, under an INS root: reported as an INS that does not match (904), not as absent (903).
        assert isinstance(failure, IdentificationFailure) and failure.code is INS_MISMATCH
        assert "present but not valid" in failure.reason and "absent" not in failure.label


def test_two_different_ins_contradict_each_other() -> None:
    other = add_nir_key("1790351215189")
    ids = (InstanceIdentifier("1.2.250.1.213.1.4.10", TEST_INS), InstanceIdentifier("1.2.250.1.213.1.4.11", other))
    failure = identify_patient(patient(ids=ids), accept_production=True)
    assert isinstance(failure, IdentificationFailure) and failure.code is INS_MISMATCH


def test_the_ins_is_picked_among_local_ids() -> None:
    ids = (InstanceIdentifier("1.2.3.4.567.8.9.10", "1234567890121"), InstanceIdentifier("1.2.250.1.213.1.4.11", TEST_INS))
    identity = identify_patient(patient(ids=ids), accept_production=False)
    assert isinstance(identity, PatientIdentity) and identity.oid == "1.2.250.1.213.1.4.11"


def test_no_record_target() -> None:
    failure = identify_patient(None, accept_production=True)
    assert isinstance(failure, IdentificationFailure) and failure.code is INS_ABSENT


def identity() -> PatientIdentity:
    result = identify_patient(patient(), accept_production=True)
    assert isinstance(result, PatientIdentity)
    return result


def test_comparison_ignores_case_and_accents() -> None:
    known = KnownPatientTraits("pat-trois", "Dominiqué", date(1979, 3, 28), "f", ins=TEST_INS)
    assert compare_with_known(identity(), known) is None


@pytest.mark.parametrize(
    ("known", "field"),
    [
        (KnownPatientTraits("PAT-QUATRE", "DOMINIQUE", date(1979, 3, 28), "F"), "birth family name"),
        (KnownPatientTraits("PAT-TROIS", "MARIE", date(1979, 3, 28), "F"), "first given name"),
        (KnownPatientTraits("PAT-TROIS", "DOMINIQUE", date(1979, 3, 29), "F"), "birth date"),
        (KnownPatientTraits("PAT-TROIS", "DOMINIQUE", date(1979, 3, 28), "M"), "sex"),
        (KnownPatientTraits("PAT-TROIS", "DOMINIQUE", date(1979, 3, 28), "F", ins="179035121518990"), "INS"),
    ],
)
def test_comparison_mismatch_is_904(known: KnownPatientTraits, field: str) -> None:
    failure = compare_with_known(identity(), known)
    assert failure is not None and failure.code is INS_MISMATCH and field in failure.reason


def test_codes_and_labels() -> None:
    assert [int(c) for c in IntegrationCode] == list(range(900, 907))
    assert UNKNOWN_PATIENT == 902
    assert IdentificationFailure(INS_INCOMPLETE, "x").label.startswith("INS incomplet")


def test_normalize_name_examples() -> None:
    assert normalize_name("  Zoé   d’Arc ") == "ZOE D'ARC"
    assert normalize_name("ÇÉLINE-ÂGNÈS") == "CELINE-AGNES"


@given(st.text(max_size=40))
def test_normalize_name_is_idempotent_and_case_blind(name: str) -> None:
    once = normalize_name(name)
    assert normalize_name(once) == once
    assert normalize_name(name.lower()) == normalize_name(name.upper()) or not name.isascii()

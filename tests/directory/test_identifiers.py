"""Property tests of the national identifier checks (Luhn for RPPS/FINESS/SIRET, mod 97 for the NIR)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.directory.identifiers import (
    IdentifierError,
    add_luhn_key,
    add_nir_key,
    luhn_valid,
    make_idnps,
    make_idnst,
    nir_key,
    parse_idnps,
    parse_idnst,
    validate_nir,
    validate_rpps,
)

digits = st.text(alphabet="0123456789", min_size=1, max_size=20)
rpps_bases = st.text(alphabet="0123456789", min_size=10, max_size=10)


@st.composite
def nir_bodies(draw: st.DrawFn) -> str:
    """The first 13 characters of a NIR: sex, year, month, department (incl. 2A/2B), commune, order."""
    sex = draw(st.sampled_from("123478"))
    year = draw(st.integers(0, 99))
    month = draw(st.integers(1, 12))
    department = draw(st.one_of(st.sampled_from(["2A", "2B"]), st.integers(1, 99).map(lambda d: f"{d:02d}")))
    commune = draw(st.integers(1, 999))
    order = draw(st.integers(1, 999))
    return f"{sex}{year:02d}{month:02d}{department}{commune:03d}{order:03d}"


@given(digits)
def test_add_luhn_key_always_validates(base: str) -> None:
    assert luhn_valid(add_luhn_key(base))


@given(rpps_bases, st.data())
def test_any_single_digit_change_breaks_an_rpps(base: str, data: st.DataObject) -> None:
    rpps = add_luhn_key(base)
    assert validate_rpps(rpps) == rpps
    position = data.draw(st.integers(0, len(rpps) - 1))
    replacement = data.draw(st.sampled_from([d for d in "0123456789" if d != rpps[position]]))
    changed = rpps[:position] + replacement + rpps[position + 1:]
    with pytest.raises(IdentifierError, match="Luhn key is wrong"):
        validate_rpps(changed)


@given(rpps_bases)
def test_idnps_of_an_rpps_round_trips(base: str) -> None:
    rpps = add_luhn_key(base)
    built = make_idnps("RPPS", rpps)
    assert built.idnps == "8" + rpps
    assert parse_idnps(built.idnps) == built


@given(st.text(alphabet="0123456789", min_size=8, max_size=8), st.text(alphabet="0123456789", min_size=13, max_size=13))
def test_finess_and_siret_with_their_keys_are_valid_idnst(finess_base: str, siret_base: str) -> None:
    finess = make_idnst("FINESS", add_luhn_key(finess_base))
    assert parse_idnst(finess.idnst) == finess and finess.idnst.startswith("1")
    if not siret_base.startswith("356000000"):  # La Poste's establishments follow another rule
        siret = make_idnst("SIRET", add_luhn_key(siret_base))
        assert parse_idnst(siret.idnst) == siret and siret.idnst.startswith("3")


@given(nir_bodies())
def test_nir_keys_from_add_nir_key_validate(body: str) -> None:
    nir = add_nir_key(body)
    assert len(nir) == 15
    assert validate_nir(nir) == nir
    assert validate_nir(nir.lower().replace("", " ").strip()) == nir  # spaces and case are tolerated


@given(nir_bodies(), st.integers(1, 96))
def test_a_wrong_nir_key_is_refused(body: str, shift: int) -> None:
    wrong = (nir_key(body) + shift - 1) % 97 + 1  # another key in 1..97
    with pytest.raises(IdentifierError, match="wrong INS key"):
        validate_nir(f"{body}{wrong:02d}")


@given(nir_bodies(), st.data())
def test_any_single_digit_change_in_a_nir_body_is_detected(body: str, data: st.DataObject) -> None:
    nir = add_nir_key(body)
    positions = [i for i, char in enumerate(body) if char.isdigit()]
    position = data.draw(st.sampled_from(positions))
    choices = [d for d in "0123456789" if d != nir[position]]
    changed = nir[:position] + data.draw(st.sampled_from(choices)) + nir[position + 1:]
    with pytest.raises(IdentifierError):
        validate_nir(changed)


def test_corsican_departments_count_as_19_and_18() -> None:
    assert nir_key("185072A123456") == 97 - int("1850719123456") % 97
    assert nir_key("185072B123456") == 97 - int("1850718123456") % 97
    assert validate_nir(add_nir_key("185072B123456")).endswith(f"{nir_key('1850718123456'):02d}")

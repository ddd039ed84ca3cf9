"""National identifiers and their checks.

- INS (Identifiant National de Santé): the NIR or NIA, 13 characters plus a
  2-digit key = 97 - (number mod 97), Corsican departments 2A/2B counted as
  19/18; qualified by its OID under 1.2.250.1.213.1.4 (.8 NIR, .9 NIA,
  .10 test, .11 demonstration).
- IDNPS, a professional's national id: type prefix + RPPS (8 + 11 digits,
  Luhn key) or + ADELI (0 + 9 characters).
- IDNST, a structure's national id: 1 + FINESS (9, Luhn key), 2 + SIREN (9,
  Luhn), 3 + SIRET (14, Luhn), 4 + RPPS-rang, 0 + ADELI-rang.

Every check raises ``IdentifierError`` saying what is wrong, for the field it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import UserError

INS_ROOT = "1.2.250.1.213.1.4"
INS_OIDS: dict[str, str] = {
    f"{INS_ROOT}.8": "INS-NIR",
    f"{INS_ROOT}.9": "INS-NIA",
    f"{INS_ROOT}.10": "INS-NIR test",
    f"{INS_ROOT}.11": "INS-NIR demonstration",
}
PRODUCTION_INS_OIDS = frozenset({f"{INS_ROOT}.8", f"{INS_ROOT}.9"})
IDNPS_OID = "1.2.250.1.71.4.2.1"
IDNST_OID = "1.2.250.1.71.4.2.2"


class IdentifierError(UserError):
    """An identifier that breaks its format or check-key rule."""


_NIR = re.compile(r"^[1-478]\d{4}(?:\d{2}|2A|2B)\d{6}\d{2}$")


_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # 2 * d, less 9 when above 9


def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) check over a string of digits, key included as the last digit."""
    # From the right: the key and every other digit as they are, the digits between them doubled.
    backwards = digits[::-1]
    total = sum(map(int, backwards[::2])) + sum(map(_LUHN_DOUBLED.__getitem__, map(int, backwards[1::2])))
    return total % 10 == 0


def nir_key(first13: str) -> int:
    """The NIR control key of the first 13 characters (2A -> 19, 2B -> 18, per INSEE)."""
    numeric = first13.upper().replace("2A", "19", 1) if first13[5:7].upper() == "2A" else first13
    numeric = numeric.upper().replace("2B", "18", 1) if first13[5:7].upper() == "2B" else numeric
    return 97 - int(numeric) % 97


def validate_nir(value: str, *, field: str = "ins") -> str:
    """Return the NIR/NIA normalised (upper case, no spaces) or raise IdentifierError."""
    nir = value.replace(" ", "").upper()
    if len(nir) != 15:
        raise IdentifierError(f"{value!r} is not an INS: it must have 15 characters (13 + 2-digit key), it has {len(nir)}", field=field)
    if not _NIR.match(nir):
        raise IdentifierError(f"{value!r} is not an INS: expected sex digit, year, month, department (digits, 2A or 2B), commune, order and key", field=field)
    expected = nir_key(nir[:13])
    if int(nir[13:]) != expected:
        raise IdentifierError(f"{value!r} has a wrong INS key: {nir[13:]} given, {expected:02d} expected", field=field)
    return nir


def well_formed_nir(value: str | None) -> str | None:
    """``value`` normalised when it is a well-formed NIR/NIA, else None (to file an audit entry
    under a patient only when the identifier the caller gave really is one)."""
    if value is None:
        return None
    try:
        return validate_nir(value)
    except IdentifierError:
        return None


def validate_ins_oid(oid: str, *, accept_production: bool = True, field: str = "ins_oid") -> str:
    if oid not in INS_OIDS:
        known = ", ".join(f"{k} ({v})" for k, v in INS_OIDS.items())
        raise IdentifierError(f"{oid!r} is not an INS OID; use one of {known}", field=field)
    if oid in PRODUCTION_INS_OIDS and not accept_production:
        raise IdentifierError(f"{oid} is a production INS OID, refused by directory.accept_production_ins", field=field)
    return oid


@dataclass(frozen=True)
class ProfessionalId:
    idnps: str
    id_type: str  # RPPS | ADELI
    id_value: str


_RPPS = re.compile(r"\d{11}")


def validate_rpps(value: str, *, field: str = "rpps") -> str:
    if not _RPPS.fullmatch(value):
        raise IdentifierError(f"{value!r} is not an RPPS number: 11 digits expected", field=field)
    if not luhn_valid(value):
        raise IdentifierError(f"{value!r} is not an RPPS number: its Luhn key is wrong", field=field)
    return value


def validate_adeli(value: str, *, field: str = "adeli") -> str:
    if not re.fullmatch(r"(?:\d{2}|2A|2B)\d{7}", value.upper()):
        raise IdentifierError(f"{value!r} is not an ADELI number: 9 characters (department + 7 digits) expected", field=field)
    return value.upper()


def parse_idnps(value: str, *, field: str = "idnps") -> ProfessionalId:
    """Read an IDNPS: '8' + RPPS or '0' + ADELI."""
    value = value.strip()
    if value.startswith("8") and len(value) == 12:
        return ProfessionalId(value, "RPPS", validate_rpps(value[1:], field=field))
    if value.startswith("0") and len(value) == 10:
        adeli = validate_adeli(value[1:], field=field)
        return ProfessionalId("0" + adeli, "ADELI", adeli)
    raise IdentifierError(f"{value!r} is not an IDNPS: expected 8 + RPPS (12 digits) or 0 + ADELI (10 characters)", field=field)


def make_idnps(id_type: str, id_value: str, *, field: str = "idnps") -> ProfessionalId:
    """Build the IDNPS from a type (RPPS/8 or ADELI/0) and the raw number."""
    kind = {"8": "RPPS", "RPPS": "RPPS", "0": "ADELI", "ADELI": "ADELI"}.get(id_type.strip().upper())
    if kind == "RPPS":
        return ProfessionalId("8" + validate_rpps(id_value, field=field), "RPPS", id_value)
    if kind == "ADELI":
        adeli = validate_adeli(id_value, field=field)
        return ProfessionalId("0" + adeli, "ADELI", adeli)
    raise IdentifierError(f"{id_type!r} is not a professional id type: use RPPS (8) or ADELI (0)", field=field)


@dataclass(frozen=True)
class StructureId:
    idnst: str
    id_type: str  # FINESS | SIREN | SIRET | RPPS_RANG | ADELI_RANG
    id_value: str


_STRUCTURE_PREFIX = {"1": "FINESS", "2": "SIREN", "3": "SIRET", "4": "RPPS_RANG", "0": "ADELI_RANG"}
_STRUCTURE_TYPES = {v: k for k, v in _STRUCTURE_PREFIX.items()} | {"RPPS": "4", "ADELI": "0"}


def _check_structure(kind: str, value: str, field: str) -> str:
    value = value.strip().upper()
    if kind == "FINESS":
        if not re.fullmatch(r"(?:\d{2}|2A|2B)\d{7}", value):
            raise IdentifierError(f"{value!r} is not a FINESS number: 9 characters expected", field=field)
        if value[:2].isascii() and value[:2].isdigit() and not luhn_valid(value):
            raise IdentifierError(f"{value!r} is not a FINESS number: its Luhn key is wrong", field=field)
    elif kind in ("SIREN", "SIRET"):
        length = 9 if kind == "SIREN" else 14
        if not re.fullmatch(rf"\d{{{length}}}", value):
            raise IdentifierError(f"{value!r} is not a {kind} number: {length} digits expected", field=field)
        # La Poste's establishments (SIREN 356000000) follow a different rule.
        if not value.startswith("356000000") and not luhn_valid(value):
            raise IdentifierError(f"{value!r} is not a {kind} number: its Luhn key is wrong", field=field)
    elif not re.fullmatch(r"[0-9A-Z/]{1,30}", value):
        raise IdentifierError(f"{value!r} is not a valid {kind} structure id", field=field)
    return value


def parse_idnst(value: str, *, field: str = "idnst") -> StructureId:
    """Read an IDNST: its first character gives the type (1 FINESS, 2 SIREN, 3 SIRET, 4 RPPS rang, 0 ADELI rang)."""
    value = value.strip()
    kind = _STRUCTURE_PREFIX.get(value[:1])
    if not kind:
        raise IdentifierError(f"{value!r} is not an IDNST: it must start with 1 (FINESS), 2 (SIREN), 3 (SIRET), 4 (RPPS rang) or 0 (ADELI rang)", field=field)
    raw = _check_structure(kind, value[1:], field)
    return StructureId(value[:1] + raw, kind, raw)


def make_idnst(id_type: str, id_value: str, *, field: str = "idnst") -> StructureId:
    """Build the IDNST from a type name or prefix digit and the raw number."""
    token = id_type.strip().upper()
    prefix = token if token in _STRUCTURE_PREFIX else _STRUCTURE_TYPES.get(token)
    if prefix is None:
        raise IdentifierError(f"{id_type!r} is not a structure id type: use FINESS, SIREN, SIRET, RPPS_RANG or ADELI_RANG", field=field)
    kind = _STRUCTURE_PREFIX[prefix]
    raw = _check_structure(kind, id_value, field)
    return StructureId(prefix + raw, kind, raw)


def add_luhn_key(digits: str) -> str:
    """Append the Luhn key to ``digits`` (used to build valid demo and test identifiers)."""
    for key in "0123456789":
        if luhn_valid(digits + key):
            return digits + key
    raise AssertionError("unreachable: one Luhn key always exists")


def add_nir_key(first13: str) -> str:
    return f"{first13}{nir_key(first13):02d}"

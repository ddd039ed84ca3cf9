"""Patient identification by INS (mssante.md §3.1 and §7, CI-SIS integration codes §1.7).

A document is filed only for a patient identified by an INS: a recordTarget
id whose root is one of the four INS OIDs (…4.8 NIR, …4.9 NIA, …4.10 test,
…4.11 demonstration), whose NIR key is right, and that comes with the
identity traits the CI-SIS schematron makes mandatory with an INS root:
birth family name, first given name, birth date and sex. Other roots under
1.2.250.1.213.1.4 (…4.13 mother's NIR, …4.2 insured person's id) are never
an INS.

Decisions (CI-SIS only names the codes):
- no INS root, or a production INS refused by the ``accept_production``
  policy -> 903 (no usable INS in the document);
- an INS present under an INS root but invalid (wrong NIR check key, not 15
  characters, not ASCII digits) -> 904: the CI-SIS table describes 904 as "the
  INS is present in the document but its matricule or traits do not match",
  which is what happened; 903 ("INS absent du document") would tell the sender
  to add an INS that is already there;
- INS roots carrying two different values -> 904 (the document contradicts itself);
- traits missing -> 905; traits differing from the patient on record -> 904;
- 902 (unknown patient) is decided by the caller, who owns the directory.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import date

from gateway.directory.identifiers import INS_OIDS, PRODUCTION_INS_OIDS, IdentifierError, validate_nir
from gateway.dmp_bridge.cda import CdaDocument, CdaPatient, InstanceIdentifier
from gateway.dmp_bridge.errors import IntegrationCode

UNKNOWN_PATIENT = IntegrationCode.UNKNOWN_PATIENT
INS_ABSENT = IntegrationCode.INS_ABSENT
INS_MISMATCH = IntegrationCode.INS_MISMATCH
INS_INCOMPLETE = IntegrationCode.INS_INCOMPLETE

# Roots under the INS arc that the CI-SIS examples use for other roles.
NOT_INS_ROOTS: dict[str, str] = {
    "1.2.250.1.213.1.4.13": "a mother's NIR used as social-security number",
    "1.2.250.1.213.1.4.2": "an insured person's id",
}


@dataclass(frozen=True)
class PatientIdentity:
    """A qualified INS: matricule + OID + the four mandatory traits (and the optional ones we have)."""

    ins: str
    oid: str
    birth_family_name: str
    first_given_name: str
    birth_date: date
    sex: str
    given_names: tuple[str, ...] = ()
    used_family_name: str | None = None
    birthplace_code: str | None = None

    @property
    def kind(self) -> str:
        return INS_OIDS[self.oid]

    @property
    def is_production(self) -> bool:
        return self.oid in PRODUCTION_INS_OIDS

    @property
    def xds_patient_id(self) -> str:
        """The XDS patientId form, ``INS^^^&OID&ISO^NH`` (mssante.md §3.1)."""
        return f"{self.ins}^^^&{self.oid}&ISO^NH"


@dataclass(frozen=True)
class IdentificationFailure:
    code: IntegrationCode
    reason: str

    @property
    def label(self) -> str:
        return self.code.label


@dataclass(frozen=True)
class KnownPatientTraits:
    """What the record already holds about the patient, to compare a document against."""

    birth_family_name: str
    first_given_name: str
    birth_date: date
    sex: str
    ins: str | None = None


def identify_document(document: CdaDocument, *, accept_production: bool) -> PatientIdentity | IdentificationFailure:
    return identify_patient(document.patient, accept_production=accept_production)


def identify_patient(patient: CdaPatient | None, *, accept_production: bool) -> PatientIdentity | IdentificationFailure:
    """The patient's qualified INS, or why the document cannot be filed (903, 904 or 905)."""
    if patient is None:
        return IdentificationFailure(INS_ABSENT, "the document has no recordTarget: no INS")
    chosen = _choose_ins(patient.ids)
    if isinstance(chosen, IdentificationFailure):
        return chosen
    if chosen.root in PRODUCTION_INS_OIDS and not accept_production:
        return IdentificationFailure(INS_ABSENT, f"the INS uses the production OID {chosen.root} ({INS_OIDS[chosen.root]}), refused by the accept_production policy")
    try:
        if not (chosen.extension or "").isascii():
            raise IdentifierError(f"{chosen.extension!r} is not an INS: only ASCII digits are allowed", field="ins")
        ins = validate_nir(chosen.extension or "")
    except IdentifierError as error:
        return IdentificationFailure(INS_MISMATCH, f"the INS under {chosen.root} is present but not valid: {error}")
    return _with_traits(patient, ins, chosen.root)


def is_qualified_ins(patient: CdaPatient | None) -> bool:
    """True when the document carries a qualified INS, whatever our production policy (X-MSS-INS)."""
    return isinstance(identify_patient(patient, accept_production=True), PatientIdentity)


def compare_with_known(identity: PatientIdentity, known: KnownPatientTraits) -> IdentificationFailure | None:
    """``None`` when the document's identity matches the record, else a 904 naming what differs.

    Names compare without case or accents (and with collapsed spaces and
    apostrophes); birth date and sex compare exactly.
    """
    differences = [
        label
        for label, same in (
            ("INS", known.ins is None or known.ins.replace(" ", "").upper() == identity.ins),
            ("birth family name", normalize_name(identity.birth_family_name) == normalize_name(known.birth_family_name)),
            ("first given name", normalize_name(identity.first_given_name) == normalize_name(known.first_given_name)),
            ("birth date", identity.birth_date == known.birth_date),
            ("sex", identity.sex.upper() == known.sex.strip().upper()),
        )
        if not same
    ]
    if not differences:
        return None
    return IdentificationFailure(INS_MISMATCH, f"the document's identity differs from the patient on record: {', '.join(differences)}")


def normalize_name(value: str) -> str:
    """Case-, accent- and spacing-insensitive form of a name (``Zoé  d’Arc`` -> ``ZOE D'ARC``)."""
    decomposed = unicodedata.normalize("NFKD", value.replace("\u2019", "'"))
    stripped = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(stripped.casefold().upper().split())


def _choose_ins(ids: tuple[InstanceIdentifier, ...]) -> InstanceIdentifier | IdentificationFailure:
    candidates = [ii for ii in ids if ii.root in INS_OIDS and ii.extension]
    if not candidates:
        return IdentificationFailure(INS_ABSENT, _absent_reason(ids))
    values = {ii.extension.replace(" ", "").upper() for ii in candidates if ii.extension}
    if len(values) > 1:
        return IdentificationFailure(INS_MISMATCH, f"the recordTarget carries several different INS: {', '.join(sorted(values))}")
    return candidates[0]


def _absent_reason(ids: tuple[InstanceIdentifier, ...]) -> str:
    other_roles = [f"{ii.root} ({NOT_INS_ROOTS[ii.root]})" for ii in ids if ii.root in NOT_INS_ROOTS]
    roots = ", ".join(sorted({ii.root for ii in ids})) or "none"
    reason = f"no recordTarget id has an INS root ({', '.join(INS_OIDS)}); roots found: {roots}"
    return reason + (f"; not an INS: {', '.join(other_roles)}" if other_roles else "")


def _with_traits(patient: CdaPatient, ins: str, oid: str) -> PatientIdentity | IdentificationFailure:
    family, given, birth_date, sex = patient.birth_family_name, patient.first_given_name, patient.birth_date, patient.sex
    if family is None or given is None or birth_date is None or sex is None:
        labels = (("birth family name", family), ("first given name", given), ("birth date", birth_date), ("sex", sex))
        missing = ", ".join(label for label, value in labels if value is None)
        return IdentificationFailure(INS_INCOMPLETE, f"INS {ins} comes without its mandatory traits: {missing} missing")
    return PatientIdentity(
        ins=ins,
        oid=oid,
        birth_family_name=family,
        first_given_name=given,
        birth_date=birth_date,
        sex=sex.upper(),
        given_names=patient.given_names,
        used_family_name=patient.used_family_name,
        birthplace_code=patient.birthplace_code,
    )

"""Who may see what in a patient's record: one pure decision function and the access matrix as data.

The rules (mssante.md §2.3-2.5), applied in this order for a professional:

1. Emergency access ("bris de glace", CSP L.1111-17) must state a reason, is
   open only to the professions the configuration names
   (``fhir.emergency_access_professions``, physicians by default), is refused
   when the patient opposed it, and when the gateway disables it.
2. A professional the patient blocked sees nothing, not even their own
   documents: the block is the patient's refusal of that person's access to
   the record (the author keeps the document in their own software). The
   médecin traitant cannot be blocked, so a block row naming them is ignored.
3. The médecin traitant sees everything, masked and hidden documents included.
4. The professional who deposited a document sees it: the depositor the
   gateway established from the authenticated session that sent it
   (``depositor.py``), never the author the document names, which is a claim
   anyone can write (naming someone as author must not open a masked document
   to them).
5. A document the patient hid, or that carries MASQUE_PS, is visible only to
   its depositor and the médecin traitant (handled above): for everyone else it
   does not exist (``concealed``: absent from searches, 404 on direct read).
6. Emergency access bypasses the matrix, and only the matrix. It does not lift
   a block, a patient's hiding or MASQUE_PS: the law reserves emergency access
   to a person who cannot express their will, and the block and the hiding are
   that will expressed earlier; the CNIL found fault with emergency access
   opening masked documents (§2.4).
7. The matrix: profession code x document type (JDV_J07) or class (J06), data
   loaded from a CSV file, default deny, a deny row beats an allow row.

The patient sees their own record except INVISIBLE_PATIENT documents (which
are concealed from them). Applications and organisational mailboxes read
nothing: the arrêté of 26 October 2023 reserves access to professionals who
take care of the patient, which a piece of software or a shared mailbox is not.
Superseded versions are a search filter, not a policy matter.
"""

from __future__ import annotations

import csv
import enum
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gateway.errors import UserError

DEFAULT_MATRIX = "access_matrix.csv"
ANY = "*"
MEDECIN = "10"  # TRE_G15 profession code of a doctor: the only profession that can be médecin traitant


class RequesterKind(enum.StrEnum):
    PROFESSIONAL = "professional"
    PATIENT = "patient"
    APPLICATION = "application"  # APP and ORG mailboxes: software or a shared mailbox acting for an organisation


class Reason(enum.StrEnum):
    """Why access was granted or refused; the refusal codes go into OperationOutcome and the audit log."""

    PATIENT_SELF = "patient-self"
    TREATING_DOCTOR = "treating-doctor"
    DEPOSITOR = "depositor"
    MATRIX = "matrix"
    EMERGENCY = "emergency-access"
    NOT_IN_MATRIX = "not-in-matrix"
    NOT_DEPOSITOR = "update-reserved-to-depositor"  # the sender who deposited it, or their organisation
    BLOCKED = "blocked-by-patient"
    HIDDEN_BY_PATIENT = "hidden-by-patient"
    MASKED_TO_PROFESSIONALS = "masked-to-professionals"
    INVISIBLE_TO_PATIENT = "invisible-to-patient"
    APPLICATION = "application-not-allowed"
    OTHER_PATIENT = "other-patient"
    EMERGENCY_WITHOUT_REASON = "emergency-reason-required"
    EMERGENCY_OPPOSED = "emergency-access-opposed"
    EMERGENCY_DISABLED = "emergency-access-disabled"
    EMERGENCY_NOT_ALLOWED = "emergency-access-not-allowed"  # the requester's profession may not break the glass
    RECORD_CLOSED = "record-closed"  # the patient closed their space: kept until shredding, shown to nobody else


@dataclass(frozen=True)
class Requester:
    """Who asks: a professional (IDNPS, TRE_G15 profession, savoir-faire), a patient (INS) or an application."""

    kind: RequesterKind
    id: str
    display_name: str
    profession_code: str | None = None
    specialty_code: str | None = None


@dataclass(frozen=True)
class DocumentFacts:
    """What the policy reads of a document (built from a record row)."""

    unique_id: str
    patient_ins: str
    type_code: str | None
    class_code: str | None
    depositor_idnps: str | None      # the professional who deposited it (depositor.py), not the claimed author
    masked_to_professionals: bool = False
    invisible_to_patient: bool = False


def professional_depositor(kind: str | None, depositor_id: str | None) -> str | None:
    """The IDNPS of a record row's depositor when a professional deposited it (an organisation's IDNST never matches a person)."""
    return depositor_id if kind == "professional" else None


@dataclass(frozen=True)
class PatientChoices:
    """The patient's decisions about their record (``patient_choices.PatientChoicesService`` keeps them)."""

    ins: str
    hidden_documents: frozenset[str] = frozenset()
    blocked_professionals: frozenset[str] = frozenset()
    treating_doctor_idnps: str | None = None
    emergency_access_opposed: bool = False
    space_closed: bool = False  # the patient closed their space (directory state CLOSED)


@dataclass(frozen=True)
class Emergency:
    """An emergency access request: the professional's stated reason."""

    reason: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: Reason
    emergency: bool = False
    concealed: bool = False  # refused, and the requester must not learn the document exists

    @classmethod
    def allow(cls, reason: Reason, *, emergency: bool = False) -> Decision:
        return cls(True, reason, emergency=emergency)

    @classmethod
    def deny(cls, reason: Reason, *, concealed: bool = False) -> Decision:
        return cls(False, reason, concealed=concealed)


# ------------------------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class MatrixRule:
    profession: str
    axis: str  # type | class | any
    code: str
    allow: bool


@dataclass(frozen=True)
class AccessMatrix:
    """Profession x document type/class grants; default deny, deny rows beat allow rows."""

    rules: tuple[MatrixRule, ...] = field(default_factory=tuple)

    def permits(self, profession_code: str | None, type_code: str | None, class_code: str | None) -> bool:
        matching = [rule for rule in self.rules
                    if rule.profession == profession_code and _rule_matches(rule, type_code, class_code)]
        return bool(matching) and all(rule.allow for rule in matching)

    @classmethod
    def default(cls) -> AccessMatrix:
        """The matrix shipped in the package (seeded from the arrêté of 26 October 2023)."""
        text = resources.files("gateway.dmp_bridge").joinpath(DEFAULT_MATRIX).read_text(encoding="utf-8")
        return cls.parse(text, source=DEFAULT_MATRIX)

    @classmethod
    def load(cls, path: str | Path | None) -> AccessMatrix:
        """The matrix in ``path``; the default one when ``path`` is empty."""
        if not path:
            return cls.default()
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read the access matrix {path}: {exc.strerror}", field="fhir.access_matrix") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, *, source: str = "matrix") -> AccessMatrix:
        lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        reader = csv.DictReader(io.StringIO("\n".join(lines)))
        if reader.fieldnames is None or not {"profession", "axis", "code", "effect"} <= set(reader.fieldnames):
            raise UserError(f"{source}: the header must name profession,axis,code,effect", field="fhir.access_matrix")
        return cls(tuple(_parse_rule(row, source, number) for number, row in enumerate(reader, start=2)))


def _parse_rule(row: dict[str, str], source: str, number: int) -> MatrixRule:
    profession, axis, code, effect = (row.get(key, "").strip() for key in ("profession", "axis", "code", "effect"))
    if not profession or axis not in ("type", "class", "any") or effect not in ("allow", "deny"):
        raise UserError(f"{source} row {number}: expected profession, axis type|class|any and effect allow|deny",
                        field="fhir.access_matrix")
    if axis != "any" and not code:
        raise UserError(f"{source} row {number}: a {axis} rule needs a code", field="fhir.access_matrix")
    return MatrixRule(profession, axis, code or ANY, effect == "allow")


def _rule_matches(rule: MatrixRule, type_code: str | None, class_code: str | None) -> bool:
    if rule.axis == "any":
        return True
    return rule.code == (type_code if rule.axis == "type" else class_code)


# ------------------------------------------------------------------------------------ decisions


@dataclass(frozen=True)
class AccessPolicy:
    """The decision function, with the matrix and whether emergency access is enabled."""

    matrix: AccessMatrix
    emergency_enabled: bool = True
    emergency_professions: frozenset[str] = frozenset({MEDECIN})  # TRE_G15 codes allowed emergency access

    def check_record(self, requester: Requester, patient_ins: str, choices: PatientChoices,
                     emergency: Emergency | None = None) -> Decision:
        """May ``requester`` open this patient's record at all (search, before any document)?"""
        if requester.kind == RequesterKind.APPLICATION:
            return Decision.deny(Reason.APPLICATION)
        if requester.kind == RequesterKind.PATIENT:
            return _patient_record_decision(requester, patient_ins)
        if choices.space_closed:
            # A closed space is kept only until its keys are shredded; no professional reads it,
            # emergency access included (the patient's closing is their last word on it).
            return Decision.deny(Reason.RECORD_CLOSED)
        if emergency is not None:
            refusal = self._emergency_refusal(requester, emergency, choices)
            if refusal is not None:
                return refusal
        if _is_blocked(requester, choices):
            return Decision.deny(Reason.BLOCKED)
        return Decision.allow(Reason.EMERGENCY if emergency else Reason.MATRIX, emergency=emergency is not None)

    def check_document(self, requester: Requester, document: DocumentFacts, choices: PatientChoices,
                       emergency: Emergency | None = None) -> Decision:
        """May ``requester`` see this document (its DocumentReference and its content)?"""
        record = self.check_record(requester, document.patient_ins, choices, emergency)
        if not record.allowed:
            return record
        if requester.kind == RequesterKind.PATIENT:
            return _patient_document_decision(document)
        return self._professional_document_decision(requester, document, choices, emergency)

    def _professional_document_decision(self, requester: Requester, document: DocumentFacts, choices: PatientChoices,
                                        emergency: Emergency | None) -> Decision:
        if _is_treating_doctor(requester, choices):
            return Decision.allow(Reason.TREATING_DOCTOR)
        if document.depositor_idnps is not None and requester.id == document.depositor_idnps:
            return Decision.allow(Reason.DEPOSITOR)
        if document.unique_id in choices.hidden_documents:
            return Decision.deny(Reason.HIDDEN_BY_PATIENT, concealed=True)
        if document.masked_to_professionals:
            return Decision.deny(Reason.MASKED_TO_PROFESSIONALS, concealed=True)
        if emergency is not None:
            return Decision.allow(Reason.EMERGENCY, emergency=True)
        if self.matrix.permits(requester.profession_code, document.type_code, document.class_code):
            return Decision.allow(Reason.MATRIX)
        return Decision.deny(Reason.NOT_IN_MATRIX)

    def _emergency_refusal(self, requester: Requester, emergency: Emergency,
                           choices: PatientChoices) -> Decision | None:
        if not self.emergency_enabled:
            return Decision.deny(Reason.EMERGENCY_DISABLED)
        if not emergency.reason.strip():
            return Decision.deny(Reason.EMERGENCY_WITHOUT_REASON)
        if requester.profession_code not in self.emergency_professions:
            return Decision.deny(Reason.EMERGENCY_NOT_ALLOWED)
        if choices.emergency_access_opposed:
            return Decision.deny(Reason.EMERGENCY_OPPOSED)
        return None

    def visible(self, requester: Requester, documents: Iterable[DocumentFacts], choices: PatientChoices,
                emergency: Emergency | None = None) -> tuple[list[DocumentFacts], dict[str, int]]:
        """The documents ``requester`` may see, and how many were withheld, by reason."""
        shown: list[DocumentFacts] = []
        withheld: dict[str, int] = {}
        for document in documents:
            decision = self.check_document(requester, document, choices, emergency)
            if decision.allowed:
                shown.append(document)
            else:
                withheld[decision.reason.value] = withheld.get(decision.reason.value, 0) + 1
        return shown, withheld


def _patient_record_decision(requester: Requester, patient_ins: str) -> Decision:
    if requester.id != patient_ins:
        return Decision.deny(Reason.OTHER_PATIENT)
    return Decision.allow(Reason.PATIENT_SELF)


def _patient_document_decision(document: DocumentFacts) -> Decision:
    if document.invisible_to_patient:
        return Decision.deny(Reason.INVISIBLE_TO_PATIENT, concealed=True)
    return Decision.allow(Reason.PATIENT_SELF)


def _is_treating_doctor(requester: Requester, choices: PatientChoices) -> bool:
    return choices.treating_doctor_idnps is not None and requester.id == choices.treating_doctor_idnps


def _is_blocked(requester: Requester, choices: PatientChoices) -> bool:
    return requester.id in choices.blocked_professionals and not _is_treating_doctor(requester, choices)

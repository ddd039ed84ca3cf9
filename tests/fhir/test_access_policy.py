"""The access policy as a pure function, and the matrix as data."""

from __future__ import annotations

import pytest

from gateway.dmp_bridge.access import (
    AccessMatrix,
    AccessPolicy,
    DocumentFacts,
    Emergency,
    PatientChoices,
    Reason,
    Requester,
    RequesterKind,
)
from gateway.errors import UserError

INS = "279035121518989"
DOCTOR = Requester(RequesterKind.PROFESSIONAL, "810000000011", "Dr A", "10")
DENTIST = Requester(RequesterKind.PROFESSIONAL, "810000000029", "Dr D", "40")
PHARMACIST = Requester(RequesterKind.PROFESSIONAL, "810000000037", "Ph P", "21")
APP = Requester(RequesterKind.APPLICATION, "1234567890", "Lab software")
PATIENT = Requester(RequesterKind.PATIENT, INS, "Patient")
POLICY = AccessPolicy(AccessMatrix.default())


def document(type_code: str = "11502-2", *, depositor: str | None = "899999999999", masked: bool = False,
             invisible: bool = False, unique_id: str = "1.2.3") -> DocumentFacts:
    return DocumentFacts(unique_id, INS, type_code, None, depositor, masked, invisible)


@pytest.mark.parametrize(("who", "type_code", "allowed"), [
    (DOCTOR, "68599-0", True), (DOCTOR, "ATTEST-RESID", False), (DENTIST, "68599-0", False),
    (DENTIST, "83901-9", False), (DENTIST, "11502-2", True), (PHARMACIST, "57833-6", True),
    (PHARMACIST, "18748-4", False), (Requester(RequesterKind.PROFESSIONAL, "8x", "?", "99"), "11502-2", False),
])
def test_default_matrix(who: Requester, type_code: str, allowed: bool) -> None:
    decision = POLICY.check_document(who, document(type_code), PatientChoices(INS))
    assert decision.allowed is allowed
    assert decision.reason == (Reason.MATRIX if allowed else Reason.NOT_IN_MATRIX)


def test_deny_beats_allow_and_unknown_professions_get_nothing() -> None:
    matrix = AccessMatrix.parse("profession,axis,code,effect\n50,any,*,allow\n50,class,11,deny\n")
    assert matrix.permits("50", "x", "10") and not matrix.permits("50", "x", "11") and not matrix.permits("60", "x", "10")


def test_a_malformed_matrix_is_refused_with_its_row() -> None:
    with pytest.raises(UserError, match="row 2"):
        AccessMatrix.parse("profession,axis,code,effect\n10,type,,maybe\n")


def test_the_depositor_sees_their_document_outside_the_matrix_and_when_masked() -> None:
    mine = document("68599-0", depositor=DENTIST.id, masked=True)
    assert POLICY.check_document(DENTIST, mine, PatientChoices(INS)).reason == Reason.DEPOSITOR
    # An organisation's deposit (no professional depositor) opens nothing to a person.
    theirs = document("68599-0", depositor=None, masked=True)
    assert POLICY.check_document(DENTIST, theirs, PatientChoices(INS)).reason == Reason.MASKED_TO_PROFESSIONALS


def test_masked_and_hidden_documents_are_concealed_but_not_from_the_treating_doctor() -> None:
    choices = PatientChoices(INS, hidden_documents=frozenset({"1.2.3"}), treating_doctor_idnps=DOCTOR.id)
    other_doctor = Requester(RequesterKind.PROFESSIONAL, "810000000045", "Dr B", "10")
    hidden = POLICY.check_document(other_doctor, document(), choices)
    masked = POLICY.check_document(other_doctor, document(masked=True, unique_id="9"), choices)
    assert (hidden.reason, hidden.concealed) == (Reason.HIDDEN_BY_PATIENT, True)
    assert (masked.reason, masked.concealed) == (Reason.MASKED_TO_PROFESSIONALS, True)
    assert POLICY.check_document(DOCTOR, document(masked=True), choices).reason == Reason.TREATING_DOCTOR


def test_the_treating_doctor_cannot_be_blocked_others_can() -> None:
    choices = PatientChoices(INS, blocked_professionals=frozenset({DOCTOR.id, DENTIST.id}), treating_doctor_idnps=DOCTOR.id)
    assert POLICY.check_document(DOCTOR, document(), choices).allowed
    assert POLICY.check_record(DENTIST, INS, choices).reason == Reason.BLOCKED


def test_emergency_bypasses_the_matrix_only() -> None:
    """For a profession the configuration lets break the glass (here dentists too)."""
    urgent = Emergency("patient inconscient")
    policy = AccessPolicy(AccessMatrix.default(), emergency_professions=frozenset({"10", "40"}))
    assert policy.check_document(DENTIST, document("68599-0"), PatientChoices(INS), urgent).reason == Reason.EMERGENCY
    blocked = PatientChoices(INS, blocked_professionals=frozenset({DENTIST.id}))
    assert policy.check_record(DENTIST, INS, blocked, urgent).reason == Reason.BLOCKED
    masked = policy.check_document(DENTIST, document(masked=True), PatientChoices(INS), urgent)
    assert masked.reason == Reason.MASKED_TO_PROFESSIONALS
    opposed = PatientChoices(INS, emergency_access_opposed=True)
    assert policy.check_record(DENTIST, INS, opposed, urgent).reason == Reason.EMERGENCY_OPPOSED
    assert policy.check_record(DENTIST, INS, PatientChoices(INS), Emergency(" ")).reason == Reason.EMERGENCY_WITHOUT_REASON
    disabled = AccessPolicy(AccessMatrix.default(), emergency_enabled=False)
    assert disabled.check_record(DENTIST, INS, PatientChoices(INS), urgent).reason == Reason.EMERGENCY_DISABLED


def test_emergency_access_is_reserved_to_the_configured_professions() -> None:
    urgent = Emergency("patient inconscient")
    pharmacist = Requester(RequesterKind.PROFESSIONAL, "810000000037", "M P", "21")
    default = AccessPolicy(AccessMatrix.default())
    for refused in (pharmacist, DENTIST, Requester(RequesterKind.PROFESSIONAL, "810000000045", "X", None)):
        decision = default.check_document(refused, document("68599-0"), PatientChoices(INS), urgent)
        assert (decision.allowed, decision.reason) == (False, Reason.EMERGENCY_NOT_ALLOWED)
    assert default.check_record(DOCTOR, INS, PatientChoices(INS), urgent).reason == Reason.EMERGENCY
    opposed = PatientChoices(INS, emergency_access_opposed=True)
    assert default.check_record(DOCTOR, INS, opposed, urgent).reason == Reason.EMERGENCY_OPPOSED
    # without the header nothing changes for them: the matrix decides
    assert default.check_document(pharmacist, document("11502-2"), PatientChoices(INS)).reason == Reason.MATRIX


def test_nobody_but_the_patient_reads_a_closed_space() -> None:
    closed = PatientChoices(INS, space_closed=True)
    for requester, emergency in ((DOCTOR, None), (DOCTOR, Emergency("patient inconscient")), (DENTIST, None)):
        decision = POLICY.check_document(requester, document(), closed, emergency)
        assert (decision.allowed, decision.reason) == (False, Reason.RECORD_CLOSED)
    assert POLICY.check_document(PATIENT, document(), closed).allowed


def test_patients_and_applications() -> None:
    assert POLICY.check_document(PATIENT, document(masked=True), PatientChoices(INS)).allowed
    invisible = POLICY.check_document(PATIENT, document(invisible=True), PatientChoices(INS))
    assert (invisible.reason, invisible.concealed) == (Reason.INVISIBLE_TO_PATIENT, True)
    assert POLICY.check_record(PATIENT, "185077505612323", PatientChoices("185077505612323")).reason == Reason.OTHER_PATIENT
    assert POLICY.check_document(APP, document(), PatientChoices(INS)).reason == Reason.APPLICATION


def test_visible_counts_what_it_withholds() -> None:
    shown, withheld = POLICY.visible(DENTIST, [document("68599-0", unique_id="a"), document(unique_id="b")],
                                     PatientChoices(INS))
    assert [d.unique_id for d in shown] == ["b"] and withheld == {"not-in-matrix": 1}

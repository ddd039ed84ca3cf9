"""Digits that are not ASCII ('²' is a digit to str.isdigit() that int() refuses; '٣' one it reads) never
get past a check meant for ASCII DIGIT: every parser answers with its own refusal, none with a crash."""

from __future__ import annotations

import pytest

from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.fhir.params import search_query
from gateway.dmp_bridge.fhir.service import InvalidRequest
from gateway.errors import UserError
from gateway.security.passwords import policy_violation
from gateway.mail.codes import MailRefusal
from gateway.mail.parameters import parse_mail_parameters

HOSTILE = ["²", "١٢", "12³", "٣"]


@pytest.mark.parametrize("value", HOSTILE)
def test_smtp_size_parameter(value: str) -> None:
    with pytest.raises(MailRefusal):
        parse_mail_parameters(f"SIZE={value}")


@pytest.mark.parametrize("value", HOSTILE)
def test_password_policy(value: str) -> None:
    # The sequence check ("1234", "9876") compares neighbouring digits: these are not ASCII digits, so the
    # password is judged on its characters (a long one passes), never by int() on them.
    assert policy_violation(f"Correct-{value}-horse-battery-staple", 12) is None


@pytest.mark.parametrize("value", HOSTILE)
def test_audit_event_name(value: str) -> None:
    with pytest.raises(UserError):
        AuditEvent.from_name(value)


@pytest.mark.parametrize("value", HOSTILE)
def test_fhir_count_parameter(value: str) -> None:
    with pytest.raises(InvalidRequest):
        search_query({"patient.identifier": "urn:oid:1.2.250.1.213.1.4.10|279035121518989", "_count": value}, {},
                     page_size=20, max_page_size=100)

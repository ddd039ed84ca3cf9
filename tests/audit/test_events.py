"""Event ids are part of every signed entry: they must never change meaning."""

from __future__ import annotations

import pytest

from gateway.audit import AuditEvent
from gateway.audit.events import EVENT_INFO
from gateway.errors import UserError

# The frozen table. Adding an event adds a line; changing or reusing a line is a bug.
PINNED = {
    101: "document_filed", 102: "document_filing_refused", 103: "document_replaced",
    104: "document_metadata_updated", 201: "record_searched", 202: "document_read", 203: "document_content_read",
    204: "emergency_access", 205: "access_refused", 301: "document_hidden", 302: "document_unhidden",
    303: "professional_blocked", 304: "professional_unblocked", 305: "emergency_access_opposed",
    306: "emergency_access_opposition_lifted", 307: "record_exported", 308: "space_closed", 309: "space_reopened",
    310: "notification_preferences_changed",
    401: "admin_mailbox_access", 402: "delegation_granted", 403: "delegation_revoked",
    410: "authentication_failed",
    420: "door_refused",
    421: "command_failed",
    501: "webmail_signed_in", 502: "webmail_sign_in_refused", 503: "webmail_signed_out",
    504: "webmail_signed_out_everywhere", 505: "webmail_second_factor_enrolled", 506: "webmail_recovery_code_used",
    901: "audit_exported", 902: "audit_verified", 903: "audit_consulted",
}


def test_ids_never_change_meaning() -> None:
    current = {int(event): event.event_name for event in AuditEvent}
    for code, name in PINNED.items():
        assert current.get(code) == name, f"event {code} must stay {name}"


def test_every_event_has_a_french_label() -> None:
    assert set(EVENT_INFO) == set(AuditEvent)
    assert all(event.label_fr.strip() for event in AuditEvent)


def test_only_emergency_access_needs_a_justification() -> None:
    assert [event for event in AuditEvent if event.info.needs_justification] == [AuditEvent.EMERGENCY_ACCESS]


@pytest.mark.parametrize("name", ["document_read", "DOCUMENT-READ", "202", " document_read "])
def test_lookup_by_name_or_number(name: str) -> None:
    assert AuditEvent.from_name(name) is AuditEvent.DOCUMENT_READ


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match="document_read") as refused:
        AuditEvent.from_name("document_eaten")
    assert refused.value.field == "event"

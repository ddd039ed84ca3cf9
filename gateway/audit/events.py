"""Audit event types with stable numeric ids.

Like Stalwart's ``trc`` enums, every event has a fixed integer that is written
into the hash-chained log and never changes meaning: entries signed years ago
must still say the same thing. Codes are grouped by hundreds (1xx filing,
2xx reading the record, 3xx the patient's choices, 4xx mailboxes and
administration, 5xx the patient's webmail account, 9xx the audit log itself). A retired event keeps its number;
new events take new numbers. ``tests/audit/test_events.py`` pins the table.

Each event carries its snake_case name (CLI, exports) and a short French label
shown to the patient in the webmail's access history.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.errors import UserError


@dataclass(frozen=True)
class EventInfo:
    """What an event means: the label the patient reads, and what it must carry."""

    label_fr: str
    needs_justification: bool = False  # bris de glace: the professional states why


class AuditEvent(enum.IntEnum):
    """Every kind of entry in the audit log. The integer is the stable id."""

    # 1xx: filing into the patient's record (DMP bridge)
    DOCUMENT_FILED = 101
    DOCUMENT_FILING_REFUSED = 102
    DOCUMENT_REPLACED = 103
    DOCUMENT_METADATA_UPDATED = 104

    # 2xx: reading the record (FHIR API, webmail)
    RECORD_SEARCHED = 201
    DOCUMENT_READ = 202
    DOCUMENT_CONTENT_READ = 203
    EMERGENCY_ACCESS = 204
    ACCESS_REFUSED = 205

    # 3xx: the patient's choices and their space
    DOCUMENT_HIDDEN = 301
    DOCUMENT_UNHIDDEN = 302
    PROFESSIONAL_BLOCKED = 303
    PROFESSIONAL_UNBLOCKED = 304
    EMERGENCY_ACCESS_OPPOSED = 305
    EMERGENCY_ACCESS_OPPOSITION_LIFTED = 306
    RECORD_EXPORTED = 307
    SPACE_CLOSED = 308
    SPACE_REOPENED = 309
    NOTIFICATION_PREFERENCES_CHANGED = 310

    # 4xx: mailboxes and administration
    ADMIN_MAILBOX_ACCESS = 401
    DELEGATION_GRANTED = 402
    DELEGATION_REVOKED = 403

    # 41x: signing in (every door: SMTP, IMAP, FHIR, webmail)
    AUTHENTICATION_FAILED = 410
    # 42x: other refusals and faults at a door (security/door_audit.py)
    DOOR_REFUSED = 420
    COMMAND_FAILED = 421
    # 5xx: the patient's webmail account (sign-in, second factor, sign-out)
    WEBMAIL_SIGNED_IN = 501
    WEBMAIL_SIGN_IN_REFUSED = 502
    WEBMAIL_SIGNED_OUT = 503
    WEBMAIL_SIGNED_OUT_EVERYWHERE = 504
    WEBMAIL_SECOND_FACTOR_ENROLLED = 505
    WEBMAIL_RECOVERY_CODE_USED = 506

    # 9xx: the audit log itself
    AUDIT_EXPORTED = 901
    AUDIT_VERIFIED = 902
    AUDIT_CONSULTED = 903

    @property
    def event_name(self) -> str:
        """The stable snake_case name used on the command line and in exports."""
        return self.name.lower()

    @property
    def info(self) -> EventInfo:
        return EVENT_INFO[self]

    @property
    def label_fr(self) -> str:
        return EVENT_INFO[self].label_fr

    @classmethod
    def from_name(cls, name: str, *, field: str = "event") -> AuditEvent:
        """The event called ``name`` (snake_case, any case) or its number; UserError otherwise."""
        cleaned = name.strip()
        if cleaned.isascii() and cleaned.isdigit():
            return cls.from_code(int(cleaned), field=field)
        try:
            return cls[cleaned.upper().replace("-", "_")]
        except KeyError:
            known = ", ".join(event.event_name for event in cls)
            raise UserError(f"unknown audit event {name!r}; known events: {known}", field=field) from None

    @classmethod
    def from_code(cls, code: int, *, field: str = "event") -> AuditEvent:
        try:
            return cls(code)
        except ValueError:
            raise UserError(f"unknown audit event number {code}", field=field) from None


EVENT_INFO: dict[AuditEvent, EventInfo] = {
    AuditEvent.DOCUMENT_FILED: EventInfo("Document ajouté à votre dossier"),
    AuditEvent.DOCUMENT_FILING_REFUSED: EventInfo("Document non ajouté à votre dossier"),
    AuditEvent.DOCUMENT_REPLACED: EventInfo("Document remplacé par une nouvelle version"),
    AuditEvent.DOCUMENT_METADATA_UPDATED: EventInfo("Informations d'un document modifiées"),
    AuditEvent.RECORD_SEARCHED: EventInfo("Consultation de la liste de vos documents"),
    AuditEvent.DOCUMENT_READ: EventInfo("Consultation de la fiche d'un document"),
    AuditEvent.DOCUMENT_CONTENT_READ: EventInfo("Ouverture d'un document"),
    AuditEvent.EMERGENCY_ACCESS: EventInfo("Accès en urgence (bris de glace)", needs_justification=True),
    AuditEvent.ACCESS_REFUSED: EventInfo("Accès à votre dossier refusé"),
    AuditEvent.DOCUMENT_HIDDEN: EventInfo("Document masqué"),
    AuditEvent.DOCUMENT_UNHIDDEN: EventInfo("Document de nouveau visible"),
    AuditEvent.PROFESSIONAL_BLOCKED: EventInfo("Professionnel bloqué"),
    AuditEvent.PROFESSIONAL_UNBLOCKED: EventInfo("Professionnel débloqué"),
    AuditEvent.EMERGENCY_ACCESS_OPPOSED: EventInfo("Opposition à l'accès en urgence"),
    AuditEvent.EMERGENCY_ACCESS_OPPOSITION_LIFTED: EventInfo("Fin de l'opposition à l'accès en urgence"),
    AuditEvent.RECORD_EXPORTED: EventInfo("Export de votre dossier"),
    AuditEvent.SPACE_CLOSED: EventInfo("Fermeture de votre espace"),
    AuditEvent.SPACE_REOPENED: EventInfo("Réouverture de votre espace"),
    AuditEvent.NOTIFICATION_PREFERENCES_CHANGED: EventInfo("Préférences de notification modifiées"),
    AuditEvent.ADMIN_MAILBOX_ACCESS: EventInfo("Accès d'un administrateur à une messagerie"),
    AuditEvent.DELEGATION_GRANTED: EventInfo("Délégation d'accès à une messagerie accordée"),
    AuditEvent.DELEGATION_REVOKED: EventInfo("Délégation d'accès à une messagerie retirée"),
    AuditEvent.AUTHENTICATION_FAILED: EventInfo("Échec de connexion"),
    AuditEvent.DOOR_REFUSED: EventInfo("Demande refusée par la messagerie"),
    AuditEvent.COMMAND_FAILED: EventInfo("Erreur interne de la messagerie"),
    AuditEvent.WEBMAIL_SIGNED_IN: EventInfo("Connexion à votre espace"),
    AuditEvent.WEBMAIL_SIGN_IN_REFUSED: EventInfo("Tentative de connexion refusée"),
    AuditEvent.WEBMAIL_SIGNED_OUT: EventInfo("Déconnexion de votre espace"),
    AuditEvent.WEBMAIL_SIGNED_OUT_EVERYWHERE: EventInfo("Déconnexion de tous vos appareils"),
    AuditEvent.WEBMAIL_SECOND_FACTOR_ENROLLED: EventInfo("Double authentification activée"),
    AuditEvent.WEBMAIL_RECOVERY_CODE_USED: EventInfo("Connexion avec un code de secours"),
    AuditEvent.AUDIT_EXPORTED: EventInfo("Export du journal des accès"),
    AuditEvent.AUDIT_VERIFIED: EventInfo("Vérification de l'intégrité du journal des accès"),
    AuditEvent.AUDIT_CONSULTED: EventInfo("Consultation de votre journal des accès par un administrateur"),
}

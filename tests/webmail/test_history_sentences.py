"""Access history entries as French sentences from the catalogue (no server needed)."""

from __future__ import annotations

import datetime as dt

from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.access_history import HistoryItem, Person
from gateway.webmail.history import Line, collapse, moment, sentence

DOCTOR = Person("professional", "810000000015", "Dr Claire MEDECIN", "médecin")
PHARMACIST = Person("professional", "810000000023", "Marc PHARMACIEN", "pharmacien")
PATIENT = Person("patient", "279035121518989", "DOMINIQUE PAT-TROIS", None)
WINTER = dt.datetime(2025, 12, 3, 13, 2, tzinfo=dt.timezone.utc)  # 14 h 02 in Paris


def item(event: AuditEvent, actor: Person, *, title: str | None = None, refused: str | None = None,
         justification: str | None = None, operation: str = "", subject: Person | None = None,
         at: dt.datetime = WINTER) -> HistoryItem:
    return HistoryItem(1, at, event, actor, "1.2.3^x" if title else None, title, subject, refused is not None,
                       refused, justification, "fhir", operation)


def test_a_professionals_read() -> None:
    text = sentence(None, item(AuditEvent.DOCUMENT_CONTENT_READ, DOCTOR, title="Compte rendu de biologie"))
    assert text.startswith("Dr Claire MEDECIN, médecin, a consulté votre document « Compte rendu de biologie » "
                           "le 3 décembre")
    assert text.endswith("à 14 h 02")


def test_an_emergency_access_gives_its_reason() -> None:
    text = sentence(None, item(AuditEvent.EMERGENCY_ACCESS, PHARMACIST, justification="Malaise en officine",
                               operation="search"))
    assert "Marc PHARMACIEN, pharmacien, a ouvert votre dossier en urgence (accès « bris de glace »)" in text
    assert text.endswith("– motif donné : « Malaise en officine »")


def test_a_refusal_says_why() -> None:
    text = sentence(None, item(AuditEvent.ACCESS_REFUSED, DOCTOR, refused="blocked-by-patient", operation="search"))
    assert "a tenté de consulter la liste de vos documents" in text
    assert text.endswith("– accès refusé : vous avez bloqué ce professionnel")
    unknown = sentence(None, item(AuditEvent.ACCESS_REFUSED, DOCTOR, refused="something-new", operation="read"))
    assert "a tenté d'ouvrir votre dossier" in unknown and unknown.endswith("– accès refusé")


def test_the_patients_own_actions_read_in_the_second_person() -> None:
    hidden = sentence(None, item(AuditEvent.DOCUMENT_HIDDEN, PATIENT, title="Note"))
    assert hidden.startswith("Vous avez masqué votre document « Note » aux professionnels le ")
    blocked = sentence(None, item(AuditEvent.PROFESSIONAL_BLOCKED, PATIENT, subject=DOCTOR))
    assert blocked.startswith("Vous avez bloqué l'accès de Dr Claire MEDECIN à votre dossier le ")
    assert sentence(None, item(AuditEvent.WEBMAIL_SIGNED_IN, PATIENT)).startswith("Vous vous êtes connecté")


def test_others_and_unknown_titles() -> None:
    admin = Person("admin", "root", "root", "admin")
    assert sentence(None, item(AuditEvent.ADMIN_MAILBOX_ACCESS, admin)).startswith(
        "Un administrateur de la messagerie a accédé à votre messagerie le ")
    untitled = sentence(None, item(AuditEvent.DOCUMENT_READ, DOCTOR))
    assert "a consulté les informations sur un document de votre dossier le " in untitled
    refused_sign_in = sentence(None, item(AuditEvent.WEBMAIL_SIGN_IN_REFUSED, PATIENT, refused="bad-password"))
    assert refused_sign_in.startswith("Une connexion à votre espace a été refusée le ") and "accès refusé" not in refused_sign_in


def test_moments_are_paris_time_with_the_year_when_not_this_one() -> None:
    summer = dt.datetime(2019, 7, 14, 22, 30, tzinfo=dt.timezone.utc)
    assert moment(None, summer) == "15 juillet 2019 à 0 h 30"
    now = dt.datetime.now(dt.timezone.utc)
    assert str(now.year) not in moment(None, now.replace(month=1, day=10, hour=12))


def test_identical_lines_in_a_row_are_shown_once_with_a_count() -> None:
    line = Line("a", WINTER, False, False, None, None)
    other = Line("b", WINTER, False, False, None, None)
    assert [(l.sentence, l.repeat) for l in collapse([line, line, other, line])] == [("a", 2), ("b", 1), ("a", 1)]

"""The access history: who filed, read, searched or tried to read the patient's record, when, and why.

Entries come from ``dmp_bridge.access_history`` (this patient's audit entries
only, actors named from the directory, titles unsealed); this module only
writes them as sentences from the catalogue::

    Dr Claire MEDECIN, médecin, a consulté votre document « Compte rendu de
    biologie » le 3 décembre à 14 h 02

Emergency accesses and refusals are set apart, with the reason given.
The access notices mailed to the patient link here (``notify.HISTORY_PATH``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from aiohttp import web
from babel.dates import format_date, format_time

from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.access_history import PARIS, HistoryItem
from gateway.dmp_bridge.notify import HISTORY_PATH
from gateway.storage.models import utcnow
from gateway.webmail.auth import require_patient
from gateway.webmail.catalogue import DEFAULT_LOCALE
from gateway.webmail.documents import record_pages
from gateway.webmail.web import N_, add_nav, render, translate

PAGE_SIZE = 50

# (what a professional or someone else did, what the patient did): each with %(who)s (not in the second),
# %(document)s or %(professional)s where the event names one, and %(date)s.
PHRASES: dict[AuditEvent, tuple[str, str]] = {
    AuditEvent.DOCUMENT_FILED: (N_("%(who)s filed %(document)s in your record on %(date)s"),
                                N_("You filed %(document)s in your record on %(date)s")),
    AuditEvent.DOCUMENT_FILING_REFUSED: (N_("%(who)s could not file a document in your record on %(date)s"),
                                         N_("A document could not be filed in your record on %(date)s")),
    AuditEvent.DOCUMENT_REPLACED: (N_("%(who)s replaced %(document)s with a new version on %(date)s"),
                                   N_("You replaced %(document)s with a new version on %(date)s")),
    AuditEvent.DOCUMENT_METADATA_UPDATED: (N_("%(who)s changed the details of %(document)s on %(date)s"),
                                           N_("You changed the details of %(document)s on %(date)s")),
    AuditEvent.RECORD_SEARCHED: (N_("%(who)s looked at the list of your documents on %(date)s"),
                                 N_("You looked at the list of your documents on %(date)s")),
    AuditEvent.DOCUMENT_READ: (N_("%(who)s looked at the description of %(document)s on %(date)s"),
                               N_("You looked at the description of %(document)s on %(date)s")),
    AuditEvent.DOCUMENT_CONTENT_READ: (N_("%(who)s read %(document)s on %(date)s"),
                                       N_("You read %(document)s on %(date)s")),
    AuditEvent.DOCUMENT_HIDDEN: (N_("%(who)s hid %(document)s from professionals on %(date)s"),
                                 N_("You hid %(document)s from professionals on %(date)s")),
    AuditEvent.DOCUMENT_UNHIDDEN: (N_("%(who)s made %(document)s visible to professionals again on %(date)s"),
                                   N_("You made %(document)s visible to professionals again on %(date)s")),
    AuditEvent.PROFESSIONAL_BLOCKED: (N_("%(who)s blocked %(professional)s from your record on %(date)s"),
                                      N_("You blocked %(professional)s from your record on %(date)s")),
    AuditEvent.PROFESSIONAL_UNBLOCKED: (N_("%(who)s gave %(professional)s access to your record again on %(date)s"),
                                        N_("You gave %(professional)s access to your record again on %(date)s")),
    AuditEvent.EMERGENCY_ACCESS_OPPOSED: (N_("%(who)s refused emergency access to your record on %(date)s"),
                                          N_("You refused emergency access to your record on %(date)s")),
    AuditEvent.EMERGENCY_ACCESS_OPPOSITION_LIFTED: (
        N_("%(who)s allowed emergency access to your record again on %(date)s"),
        N_("You allowed emergency access to your record again on %(date)s")),
    AuditEvent.RECORD_EXPORTED: (N_("%(who)s exported your record and messages on %(date)s"),
                                 N_("You exported your record and messages on %(date)s")),
    AuditEvent.SPACE_CLOSED: (N_("%(who)s closed your space on %(date)s"), N_("You closed your space on %(date)s")),
    AuditEvent.SPACE_REOPENED: (N_("%(who)s reopened your space on %(date)s"), N_("You reopened your space on %(date)s")),
    AuditEvent.NOTIFICATION_PREFERENCES_CHANGED: (
        N_("%(who)s changed your notification preferences on %(date)s"),
        N_("You changed your notification preferences on %(date)s")),
    AuditEvent.ADMIN_MAILBOX_ACCESS: (N_("%(who)s accessed your mailbox on %(date)s"),
                                      N_("You accessed your mailbox on %(date)s")),
    AuditEvent.AUDIT_EXPORTED: (N_("%(who)s exported your access history on %(date)s"),
                                N_("You exported your access history on %(date)s")),
    AuditEvent.AUDIT_CONSULTED: (N_("%(who)s looked at your access history on %(date)s"),
                                 N_("You looked at your access history on %(date)s")),
    AuditEvent.WEBMAIL_SIGNED_IN: (N_("Someone signed in to your space on %(date)s"),
                                   N_("You signed in to your space on %(date)s")),
    AuditEvent.WEBMAIL_SIGN_IN_REFUSED: (N_("A sign-in to your space was refused on %(date)s"),
                                         N_("A sign-in to your space was refused on %(date)s")),
    AuditEvent.WEBMAIL_SIGNED_OUT: (N_("Someone signed out of your space on %(date)s"),
                                    N_("You signed out on %(date)s")),
    AuditEvent.WEBMAIL_SIGNED_OUT_EVERYWHERE: (N_("Every session of your space was ended on %(date)s"),
                                               N_("You signed out on every device on %(date)s")),
    AuditEvent.WEBMAIL_SECOND_FACTOR_ENROLLED: (N_("Two-step sign-in was turned on for your space on %(date)s"),
                                                N_("You turned on two-step sign-in on %(date)s")),
    AuditEvent.WEBMAIL_RECOVERY_CODE_USED: (N_("A recovery code was used to sign in to your space on %(date)s"),
                                            N_("You signed in with a recovery code on %(date)s")),
}
ACCOUNT_EVENTS = frozenset({AuditEvent.WEBMAIL_SIGNED_IN, AuditEvent.WEBMAIL_SIGN_IN_REFUSED,
                            AuditEvent.WEBMAIL_SIGNED_OUT, AuditEvent.WEBMAIL_SIGNED_OUT_EVERYWHERE,
                            AuditEvent.WEBMAIL_SECOND_FACTOR_ENROLLED, AuditEvent.WEBMAIL_RECOVERY_CODE_USED})
EMERGENCY_RECORD = N_("%(who)s opened your record in an emergency (“break the glass” access) on %(date)s")
EMERGENCY_DOCUMENT = N_("%(who)s read %(document)s in an emergency (“break the glass” access) on %(date)s")
TRIED_DOCUMENT = N_("%(who)s tried to read %(document)s on %(date)s")
TRIED_LIST = N_("%(who)s tried to look at the list of your documents on %(date)s")
TRIED_RECORD = N_("%(who)s tried to open your record on %(date)s")
YOU_TRIED_DOCUMENT = N_("You tried to read %(document)s on %(date)s")
YOU_TRIED_RECORD = N_("You tried to open your record on %(date)s")
OTHER = N_("%(who)s acted on your record on %(date)s")
YOU_OTHER = N_("You acted on your record on %(date)s")

REFUSALS: dict[str, str] = {
    "blocked-by-patient": N_("access refused: you blocked this professional"),
    "hidden-by-patient": N_("access refused: you hid this document"),
    "masked-to-professionals": N_("access refused: this document is hidden from professionals"),
    "not-in-matrix": N_("access refused: their profession does not give access to this kind of document"),
    "emergency-access-opposed": N_("access refused: you refused emergency access"),
    "emergency-access-disabled": N_("access refused: emergency access is not open on this service"),
    "emergency-reason-required": N_("access refused: no reason was given for the emergency"),
    "emergency-access-not-allowed": N_("access refused: their profession cannot use emergency access"),
    "application-not-allowed": N_("access refused: software cannot read your record"),
    "other-patient": N_("access refused: this record is not theirs"),
    "update-reserved-to-author": N_("refused: only the author of a document can change it"),
    "invisible-to-patient": N_("access refused: this document is not visible yet"),
}
REFUSED = N_("access refused")


@dataclass(frozen=True)
class Line:
    """One entry as the page shows it."""

    sentence: str
    at: dt.datetime
    emergency: bool
    refused: bool
    reason: str | None   # the refusal, in words
    justification: str | None  # the professional's stated emergency reason
    repeat: int = 1            # identical entries in a row, shown once


def install(app: web.Application) -> None:
    app.router.add_get(HISTORY_PATH, history_page)
    add_nav(app, HISTORY_PATH, N_("Access history"))


async def history_page(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    before_text = request.query.get("avant", "")
    before = int(before_text) if before_text.isascii() and before_text.isdigit() and len(before_text) < 19 else None
    page = await record_pages(request).history.page(patient.ins, limit=PAGE_SIZE, before=before)
    lines = collapse([line_of(request, item) for item in page.items])
    return render(request, "history.html", {"lines": lines, "older": page.next_before, "first_page": before is None})


def collapse(lines: list[Line]) -> list[Line]:
    """Entries that read the same, one after the other (the same person, the same thing, the same minute), once."""
    shown: list[Line] = []
    for line in lines:
        if shown and shown[-1].sentence == line.sentence:
            shown[-1] = replace(shown[-1], repeat=shown[-1].repeat + 1)
        else:
            shown.append(line)
    return shown


def line_of(request: web.Request | None, item: HistoryItem) -> Line:
    reason = translate(request, REFUSALS.get(item.refusal_reason or "", REFUSED)) if item.refused else None
    return Line(sentence(request, item), item.at, item.emergency, item.refused, reason, item.emergency_reason)


def sentence(request: web.Request | None, item: HistoryItem) -> str:
    """The entry as one sentence (the catalogue's language), its refusal or emergency reason appended."""
    def _(message: str, **params: str) -> str:
        return translate(request, message, **params)
    you = item.actor.is_patient
    params = {"date": moment(request, item.at), "document": _document(request, item), "who": _who(request, item),
              "professional": item.professional_subject.name if item.professional_subject else _("a professional")}
    text = _(_template(item, you), **params)
    if item.refused and item.event not in ACCOUNT_EVENTS:
        text += " – " + _(REFUSALS.get(item.refusal_reason or "", REFUSED))
    if item.emergency_reason:
        text += " – " + _("reason given: “%(reason)s”", reason=item.emergency_reason)
    return text


def _template(item: HistoryItem, you: bool) -> str:
    if item.event == AuditEvent.EMERGENCY_ACCESS:
        return EMERGENCY_DOCUMENT if item.document_id else EMERGENCY_RECORD
    if item.event == AuditEvent.ACCESS_REFUSED:
        if you:
            return YOU_TRIED_DOCUMENT if item.document_id else YOU_TRIED_RECORD
        if item.document_id:
            return TRIED_DOCUMENT
        return TRIED_LIST if item.operation == "search" else TRIED_RECORD
    pair = PHRASES.get(item.event)
    if pair is None:
        return YOU_OTHER if you else OTHER
    return pair[1] if you else pair[0]


def _who(request: web.Request | None, item: HistoryItem) -> str:
    actor = item.actor
    if actor.kind == "professional":
        if actor.profession:
            return translate(request, "%(name)s, %(profession)s,", name=actor.name, profession=actor.profession)
        return actor.name
    if actor.kind == "patient":
        return translate(request, "You")
    if actor.kind == "admin":
        return translate(request, "An administrator of the messaging service")
    if actor.kind == "application":
        return translate(request, "The software %(name)s", name=actor.name)
    return translate(request, "The messaging service")


def _document(request: web.Request | None, item: HistoryItem) -> str:
    if item.document_title:
        return translate(request, "your document “%(title)s”", title=item.document_title)
    return translate(request, "a document of your record")


def moment(request: web.Request | None, at: dt.datetime) -> str:
    """« 3 décembre à 14 h 02 » (the catalogue gives the patterns), in Paris time; the year when not this one."""
    local = at.astimezone(PARIS)
    this_year = utcnow().astimezone(PARIS).year
    day_pattern = translate(request, "MMMM d") if local.year == this_year else translate(request, "MMMM d, y")
    day = format_date(local.date(), day_pattern, locale=DEFAULT_LOCALE)
    time = format_time(local.time(), translate(request, "h:mm a"), locale=DEFAULT_LOCALE)
    return translate(request, "%(day)s at %(time)s", day=day, time=time)

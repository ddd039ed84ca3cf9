"""The patient's access history: their audit entries told in plain French.

Reads only the entries filed under this patient's INS (``AuditLog.entries_for_patient``,
an SQL filter on ``patient_ins``): filings, reads, searches, refused attempts,
emergency accesses with the professional's stated reason, hides, blocks and
every change of the patient's controls. Each entry becomes a ``HistoryItem``:
who (the professional's name and profession from the directory, the name
recorded in the entry when they left it), what (the document's title, unsealed
with the patient's key, looked up among *this patient's* documents only), when
(Europe/Paris). The webmail (``gateway.webmail.history``) turns each into a sentence
from its catalogue::

    Dr Claire MEDECIN, médecin, a consulté votre document « Compte rendu de
    biologie » le 3 décembre à 14 h 02
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sqlalchemy import select

from gateway.audit.chain import ActorKind, AuditEntry, OutcomeStatus
from gateway.audit.events import AuditEvent
from gateway.audit.log import AuditLog
from gateway.directory.identifiers import validate_nir
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import RecordDocument
from gateway.storage.db import Database
from gateway.storage.models import Professional, utcnow

PARIS = ZoneInfo("Europe/Paris")
MONTHS = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
          "novembre", "décembre")
DOCUMENT_SUBJECTS = ("document", "binary")
DOCTOR_PROFESSIONS = ("10",)  # addressed as « Dr » when the directory gives no civility
def french_moment(moment: dt.datetime, *, today: dt.date | None = None) -> str:
    """``3 décembre à 14 h 02`` in Paris time (with the year when it is not this year's): for French mail
    and files; pages format dates through the webmail's catalogue."""
    local = moment.astimezone(PARIS)
    this_year = (today or utcnow().astimezone(PARIS).date()).year
    day = "1er" if local.day == 1 else str(local.day)
    year = f" {local.year}" if local.year != this_year else ""
    return f"{day} {MONTHS[local.month - 1]}{year} à {local.hour} h {local.minute:02d}"


@dataclass(frozen=True)
class Person:
    """Who acted, as the patient reads it."""

    kind: str                 # professional | patient | admin | system | application
    id: str
    name: str                 # « Dr Claire MEDECIN », « vous », « un administrateur »...
    profession: str | None    # « médecin »

    @property
    def is_patient(self) -> bool:
        return self.kind == ActorKind.PATIENT.value


@dataclass(frozen=True)
class HistoryItem:
    seq: int
    at: dt.datetime
    event: AuditEvent
    actor: Person
    document_id: str | None       # the XDS unique id, when the entry is about a document of this record
    document_title: str | None
    professional_subject: Person | None  # the professional a block/unblock names
    refused: bool
    refusal_reason: str | None    # the policy's code (blocked-by-patient...)
    emergency_reason: str | None  # the professional's justification of an emergency access
    door: str
    operation: str                # search | read | binary | update... (what a FHIR call did)

    @property
    def emergency(self) -> bool:
        return self.event == AuditEvent.EMERGENCY_ACCESS or self.emergency_reason is not None


@dataclass(frozen=True)
class HistoryPage:
    items: list[HistoryItem]
    next_before: int | None  # pass as ``before`` for the following (older) page; None at the end


class AccessHistory:
    """The access history of one patient at a time (the webmail passes the signed-in patient's INS)."""

    def __init__(self, db: Database, audit: AuditLog, store: RecordStore) -> None:
        self.db = db
        self.audit = audit
        self.store = store

    async def page(self, ins: str, *, limit: int = 50, before: int | None = None) -> HistoryPage:
        patient = validate_nir(ins, field="ins")
        entries = await self.audit.entries_for_patient(patient, limit=limit, before_seq=before)
        entries = [entry for entry in entries if entry.patient == patient]  # belt and braces: never another's
        shown = [entry for entry in entries if not _own_listing(entry)]
        titles = await self._titles(patient, _document_ids(shown))
        people = await self._professionals(_professional_ids(shown))
        items = [_item(entry, titles, people) for entry in shown]
        next_before = entries[-1].seq if len(entries) == limit else None
        return HistoryPage(items, next_before)

    async def _titles(self, ins: str, unique_ids: set[str]) -> dict[str, str | None]:
        if not unique_ids:
            return {}
        async with self.db.session() as session:
            rows = list((await session.scalars(select(RecordDocument).where(
                RecordDocument.patient_ins == ins, RecordDocument.unique_id.in_(sorted(unique_ids))))).all())
        await self.store.sealer.open_documents(rows)
        return {row.unique_id: row.title or row.type_display for row in rows}

    async def _professionals(self, idnps: set[str]) -> dict[str, Professional]:
        if not idnps:
            return {}
        async with self.db.session() as session:
            rows = await session.scalars(select(Professional).where(Professional.idnps.in_(sorted(idnps))))
            return {row.idnps: row for row in rows.all()}


def _own_listing(entry: AuditEntry) -> bool:
    """The patient's own views of their documents list: not worth a line each."""
    return entry.event_code == AuditEvent.RECORD_SEARCHED and entry.actor.kind == ActorKind.PATIENT.value


def _document_ids(entries: Iterable[AuditEntry]) -> set[str]:
    return {entry.subject.id for entry in entries if entry.subject and entry.subject.kind in DOCUMENT_SUBJECTS}


def _professional_ids(entries: Iterable[AuditEntry]) -> set[str]:
    ids = {entry.actor.id for entry in entries if entry.actor.kind == ActorKind.PROFESSIONAL.value}
    return ids | {entry.subject.id for entry in entries if entry.subject and entry.subject.kind == "professional"}


def professional_name(row: Professional | None, fallback: str) -> str:
    """« Dr Claire MEDECIN »: civility, given name, family name as the directory has them."""
    if row is None:
        return fallback
    civility = _civility(row.civility, row.profession_code)
    parts = [civility, row.given_name, row.family_name.upper()]
    return " ".join(part for part in parts if part)


def _civility(civility: str | None, profession_code: str | None) -> str | None:
    code = (civility or "").strip().upper().rstrip(".")
    if code in ("DR", "PR"):
        return code.capitalize()
    if code in ("MME", "M", "MLLE"):
        return None  # the name alone: a civility adds nothing to « who read my record »
    return "Dr" if not code and profession_code in DOCTOR_PROFESSIONS else None


def profession_label(row: Professional | None) -> str | None:
    if row is None or not row.profession_label:
        return None
    label = row.profession_label
    return label[:1].lower() + label[1:]


def _person(kind: str, actor_id: str, display_name: str, people: dict[str, Professional]) -> Person:
    """Professionals as the directory names them; anyone else by the name recorded in the entry."""
    if kind == ActorKind.PROFESSIONAL.value:
        row = people.get(actor_id)
        return Person(kind, actor_id, professional_name(row, display_name), profession_label(row))
    return Person(kind, actor_id, display_name, None)


def _item(entry: AuditEntry, titles: dict[str, str | None], people: dict[str, Professional]) -> HistoryItem:
    actor = _person(entry.actor.kind, entry.actor.id, entry.actor.display_name, people)
    document_id = entry.subject.id if entry.subject and entry.subject.kind in DOCUMENT_SUBJECTS else None
    named = None
    if entry.subject is not None and entry.subject.kind == "professional":
        named = _person(ActorKind.PROFESSIONAL.value, entry.subject.id, entry.subject.id, people)
    refused = entry.outcome.status == OutcomeStatus.REFUSED.value
    justification = entry.details.get("justification")
    return HistoryItem(entry.seq, entry.occurred_at, AuditEvent(entry.event_code), actor, document_id,
                       titles.get(document_id) if document_id else None, named, refused,
                       entry.outcome.reason if refused else None,
                       justification if isinstance(justification, str) else None, entry.source.door,
                       str(entry.details.get("operation", "")))

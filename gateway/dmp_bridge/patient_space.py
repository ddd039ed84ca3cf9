"""What the signed-in patient does with their record from the webmail: read it, decide who sees it, leave.

``PatientDocuments``: the record listed (filtered by type and date, superseded
versions marked) and one document opened, both through ``RecordAccessService``
with the patient as requester: the same access policy as the FHIR API (an
INVISIBLE_PATIENT document does not exist for them; another patient's
document is refused and answered as missing), the same audit entries (the
patient reading their own record), and no notice to themselves.

``PatientControls``: hide / unhide a document, block / unblock a professional,
refuse / allow emergency access (``PatientChoicesService``, each audited with
the change), the notification address and frequency (audited), and closing the
space: the patient's state becomes ``closed`` in the same transaction as its
audit entry, which starts the retention clock of ``gateway.retention``
(``retention.closed_patient_days``, then crypto-shredding of the mailbox's and
the record's data keys).

The webmail passes the session's patient (``PatientCaller``); nothing here
trusts an INS or an owner named by a form.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit.chain import Actor, ActorKind, Door, Source
from gateway.audit.events import AuditEvent
from gateway.audit.tables import AuditEntryRow
from gateway.directory.addresses import normalise_address
from gateway.directory.service import DirectoryService, LocalRoute, RemoteRoute
from gateway.dmp_bridge.access import DocumentFacts, Requester, RequesterKind, professional_depositor
from gateway.dmp_bridge.access_history import Person, profession_label, professional_name
from gateway.dmp_bridge.fhir.service import (
    MAX_LISTED_IDS,
    AccessRefused,
    CallContext,
    DocumentMissing,
    RecordAccessService,
)
from gateway.dmp_bridge.narrative import Readable, human_readable
from gateway.dmp_bridge.notice_tables import NoticeFrequency, PatientNotificationPreferences
from gateway.dmp_bridge.patient_choices import PatientChoicesService
from gateway.dmp_bridge.tables import DocumentStatus, RecordDocument
from gateway.errors import Conflict, NotFound, UserError
from gateway.storage.db import Database
from gateway.storage.models import Patient, PatientState, Professional, utcnow

PARIS = ZoneInfo("Europe/Paris")
MAX_DOCUMENTS = 100_000
MAX_PEOPLE = 500  # professionals offered for blocking


@dataclass(frozen=True)
class PatientCaller:
    """The signed-in patient (from the webmail session) and where they connect from."""

    ins: str
    display_name: str
    ip: str | None = None

    @property
    def actor(self) -> Actor:
        return Actor.patient(self.ins, self.display_name)

    @property
    def source(self) -> Source:
        return Source(Door.WEBMAIL, self.ip)

    @property
    def call(self) -> CallContext:
        return CallContext(Requester(RequesterKind.PATIENT, self.ins, self.display_name), self.source)


# ------------------------------------------------------------------------------------ documents


@dataclass(frozen=True)
class DocumentFilter:
    type_code: str | None = None
    since: dt.date | None = None   # the document's date (creation time, else filing), Paris calendar day
    until: dt.date | None = None
    include_superseded: bool = True

    def admits(self, document: RecordDocument | Listed) -> bool:
        if self.type_code and document.type_code != self.type_code:
            return False
        if not self.include_superseded and document.status != DocumentStatus.CURRENT.value:
            return False
        day = document_day(document)
        return (self.since is None or day >= self.since) and (self.until is None or day <= self.until)


@dataclass(frozen=True)
class DocumentType:
    code: str
    label: str


@dataclass(frozen=True)
class DocumentListing:
    documents: list[RecordDocument]   # the asked page of the matching ones, newest first, sealed columns opened
    types: list[DocumentType]         # every type in the record (for the filter), whatever the filter
    hidden: frozenset[str]            # unique ids the patient hid from professionals
    total: int                        # documents in the record the patient may see
    matching: int                     # of which the filter admits


@dataclass(frozen=True)
class OpenedDocument:
    document: RecordDocument
    content: bytes
    readable: Readable


@dataclass(frozen=True)
class Listed:
    """What the listing reads of every row before opening any (the policy's facts, the filter's fields)."""

    id: int
    unique_id: str
    patient_ins: str
    type_code: str | None
    class_code: str | None
    depositor_kind: str | None
    depositor_id: str | None
    masked_to_professionals: bool
    invisible_to_patient: bool
    status: str
    creation_time: dt.datetime | None
    filed_at: dt.datetime

    @property
    def facts(self) -> DocumentFacts:
        return DocumentFacts(self.unique_id, self.patient_ins, self.type_code, self.class_code,
                             professional_depositor(self.depositor_kind, self.depositor_id),
                             self.masked_to_professionals, self.invisible_to_patient)


LISTED_COLUMNS = tuple(getattr(RecordDocument, name) for name in Listed.__dataclass_fields__)


def document_day(document: RecordDocument | Listed) -> dt.date:
    moment = document.creation_time or document.filed_at
    return moment.astimezone(PARIS).date()


class PatientDocuments:
    def __init__(self, access: RecordAccessService) -> None:
        self.access = access

    async def listing(self, caller: PatientCaller, wanted: DocumentFilter = DocumentFilter(), *,
                      offset: int = 0, limit: int = MAX_DOCUMENTS) -> DocumentListing:
        """The documents the access policy shows this patient, filtered, one page of them opened.

        The rows are read without their sealed columns opened; only the page's rows, and one row per
        document type (for the type filter's labels), are unsealed: a record of hundreds of documents
        lists in the time of one page. The listing is audited as the FHIR search is (RECORD_SEARCHED)."""
        choices = await self.access.choices.choices(caller.ins)
        record = self.access.policy.check_record(caller.call.requester, caller.ins, choices)
        if not record.allowed:
            try:
                await self.access.refuse(caller.call, record, patient=caller.ins, operation="search")
            except AccessRefused:
                raise NotFound("this record cannot be read", field="patient") from None
        visible = [row for row in await self._listed(caller.ins)
                   if self.access.policy.check_document(caller.call.requester, row.facts, choices).allowed]
        matching = [row for row in visible if wanted.admits(row)]
        type_rows = {row.type_code: row.id for row in reversed(visible) if row.type_code}
        opened = await self._opened_rows({row.id for row in matching[offset:offset + limit]} | set(type_rows.values()))
        page = [opened[row.id] for row in matching[offset:offset + limit]]
        by_type = {code: opened[row_id] for code, row_id in type_rows.items()}
        await self.access.audit.append(AuditEvent.RECORD_SEARCHED, actor=caller.actor, patient=caller.ins,
                                       source=caller.source, details={
                                           "operation": "search", "total": len(matching),
                                           "returned": [d.unique_id for d in page][:MAX_LISTED_IDS], "withheld": {}})
        types = sorted((DocumentType(code, row.type_display or code) for code, row in by_type.items()),
                       key=lambda t: t.label.lower())
        return DocumentListing(page, types, choices.hidden_documents, len(visible), len(matching))

    async def _listed(self, ins: str) -> list[Listed]:
        async with self.access.db.session() as session:
            rows = (await session.execute(
                select(*LISTED_COLUMNS).where(RecordDocument.patient_ins == ins)
                .order_by(RecordDocument.creation_time.desc(), RecordDocument.id.desc()))).all()
        return [Listed(*row) for row in rows]

    async def _opened_rows(self, ids: set[int]) -> dict[int, RecordDocument]:
        """Full rows, their sealed columns opened: only those a page shows."""
        if not ids:
            return {}
        async with self.access.db.session() as session:
            rows = list((await session.scalars(select(RecordDocument).where(RecordDocument.id.in_(sorted(ids))))).all())
        await self.access.store.sealer.open_documents(rows)
        return {row.id: row for row in rows}

    async def row(self, caller: PatientCaller, *, document_id: str | None = None,
                  unique_id: str | None = None) -> RecordDocument:
        """This patient's document named by its row id or unique id, without reading it (for a control acting on
        it, audited by that control); NotFound when it is not theirs or not visible to them."""
        query = select(RecordDocument).where(RecordDocument.patient_ins == caller.ins,
                                             RecordDocument.invisible_to_patient.is_(False))
        if document_id is not None:
            if not (document_id.isascii() and document_id.isdigit()) or len(document_id) > 18:
                raise NotFound("no such document in your record", field="document")
            query = query.where(RecordDocument.id == int(document_id))
        elif unique_id is not None:
            query = query.where(RecordDocument.unique_id == unique_id)
        else:
            raise NotFound("no document named", field="document")
        async with self.access.db.session() as session:
            document = await session.scalar(query)
        if document is None:
            raise NotFound("no such document in your record", field="document")
        return document

    async def open(self, caller: PatientCaller, document_id: str) -> OpenedDocument:
        """The document (by its record row id) if it is this patient's and visible to them: NotFound otherwise,
        whatever the reason (another patient's, invisible, missing), so an id says nothing about others."""
        try:
            document, content = await self.access.read_content(caller.call, document_id)
        except (AccessRefused, DocumentMissing):
            raise NotFound(f"no document {document_id[:40]!r} in your record", field="document") from None
        return OpenedDocument(document, content, human_readable(content))


# ------------------------------------------------------------------------------------ controls


@dataclass(frozen=True)
class NotificationPreferences:
    address: str | None
    frequency: NoticeFrequency


@dataclass(frozen=True)
class ControlsState:
    emergency_access_opposed: bool
    treating_doctor_idnps: str | None
    blocked: list[Person]
    blockable: list[Person]           # professionals met in the record or its history, not blocked
    notifications: NotificationPreferences
    retention_days: int


class PatientControls:
    def __init__(self, db: Database, choices: PatientChoicesService, directory: DirectoryService, *,
                 retention_days: int) -> None:
        self.db = db
        self.choices = choices
        self.directory = directory
        self.audit = choices.audit
        self.retention_days = retention_days

    async def state(self, caller: PatientCaller) -> ControlsState:
        choices = await self.choices.choices(caller.ins)
        met = await self._professionals_met(caller.ins)
        blocked_ids = set(choices.blocked_professionals)
        people = await self._people(set(met) | blocked_ids)
        blockable = [people[idnps] for idnps in met
                     if idnps in people and idnps not in blocked_ids and idnps != choices.treating_doctor_idnps]
        return ControlsState(choices.emergency_access_opposed, choices.treating_doctor_idnps,
                             sorted((people[i] for i in blocked_ids if i in people), key=lambda p: p.name),
                             sorted(blockable, key=lambda p: p.name), await self.notifications(caller),
                             self.retention_days)

    async def hide(self, caller: PatientCaller, unique_id: str) -> None:
        await self.choices.hide_document(caller.ins, unique_id, actor=caller.actor, source=caller.source)

    async def unhide(self, caller: PatientCaller, unique_id: str) -> None:
        await self.choices.unhide_document(caller.ins, unique_id, actor=caller.actor, source=caller.source)

    async def block(self, caller: PatientCaller, idnps: str) -> None:
        await self.choices.block_professional(caller.ins, idnps, actor=caller.actor, source=caller.source)

    async def unblock(self, caller: PatientCaller, idnps: str) -> None:
        await self.choices.unblock_professional(caller.ins, idnps, actor=caller.actor, source=caller.source)

    async def set_emergency_access(self, caller: PatientCaller, *, allowed: bool) -> None:
        if allowed:
            await self.choices.allow_emergency_access(caller.ins, actor=caller.actor, source=caller.source)
        else:
            await self.choices.oppose_emergency_access(caller.ins, actor=caller.actor, source=caller.source)

    async def notifications(self, caller: PatientCaller) -> NotificationPreferences:
        async with self.db.session() as session:
            patient = await _patient(session, caller.ins)
            row = await session.get(PatientNotificationPreferences, patient.id)
        if row is None:
            return NotificationPreferences(None, NoticeFrequency.DEFAULT)
        return NotificationPreferences(row.address, NoticeFrequency(row.frequency))

    async def set_notifications(self, caller: PatientCaller, *, address: str | None, frequency: str) -> None:
        """Where and how often access notices go; the address must be one this gateway can deliver to."""
        chosen = await self._deliverable(address.strip()) if address and address.strip() else None
        try:
            how_often = NoticeFrequency(frequency)
        except ValueError:
            allowed = ", ".join(f.value for f in NoticeFrequency)
            raise UserError(f"{frequency!r} is not a frequency ({allowed})", field="frequency") from None
        async with self.db.session() as session:
            patient = await _patient(session, caller.ins)
            row = await session.get(PatientNotificationPreferences, patient.id)
            if row is None:
                row = PatientNotificationPreferences(patient_id=patient.id)
                session.add(row)
            row.address, row.frequency = chosen, how_often.value
            await session.flush()
            await self.audit.append(AuditEvent.NOTIFICATION_PREFERENCES_CHANGED, actor=caller.actor,
                                    patient=patient.ins, source=caller.source,
                                    details={"own_mailbox": chosen is None, "frequency": how_often.value},
                                    session=session)

    async def _deliverable(self, address: str) -> str:
        canonical = normalise_address(address, field="address")
        route = await self.directory.route_recipient(canonical)
        if not isinstance(route, (LocalRoute, RemoteRoute)):
            raise UserError(f"{canonical} cannot receive mail from this service: {getattr(route, 'text', '')}",
                            field="address")
        return route.address

    async def close_space(self, caller: PatientCaller) -> dt.datetime:
        """Close the space now: sign-in and mail to it stop, and its data keys are destroyed after the retention
        period. Returns the earliest moment of that destruction."""
        now = utcnow()
        async with self.db.session() as session:
            patient = await _patient(session, caller.ins)
            if patient.state != PatientState.ACTIVE.value:
                raise Conflict("this space is not open", field="state")
            for row in (await session.scalars(select(Patient).where(Patient.ins == patient.ins))).all():
                row.state, row.state_changed_at = PatientState.CLOSED.value, now  # every INS OID of this person
            await session.flush()
            await self.audit.append(AuditEvent.SPACE_CLOSED, actor=caller.actor, patient=patient.ins,
                                    source=caller.source, details={"retention_days": self.retention_days},
                                    session=session)
        return now + dt.timedelta(days=self.retention_days)

    async def _professionals_met(self, ins: str) -> list[str]:
        """Authors of this record's documents and professionals in its history, most recent first."""
        async with self.db.session() as session:
            actors = (await session.scalars(
                select(AuditEntryRow.actor_id).where(AuditEntryRow.patient_ins == ins,
                                                     AuditEntryRow.actor_kind == ActorKind.PROFESSIONAL.value)
                .group_by(AuditEntryRow.actor_id).order_by(func.max(AuditEntryRow.seq).desc())
                .limit(MAX_PEOPLE))).all()
            authors = (await session.scalars(
                select(RecordDocument.author_idnps).where(RecordDocument.patient_ins == ins,
                                                          RecordDocument.author_idnps.is_not(None)).distinct())).all()
        return list(dict.fromkeys([*actors, *(a for a in authors if a)]))

    async def _people(self, idnps: set[str]) -> dict[str, Person]:
        if not idnps:
            return {}
        async with self.db.session() as session:
            rows: Sequence[Professional] = (await session.scalars(
                select(Professional).where(Professional.idnps.in_(sorted(idnps))))).all()
        return {row.idnps: Person(ActorKind.PROFESSIONAL.value, row.idnps, professional_name(row, row.idnps),
                                  profession_label(row)) for row in rows}


async def _patient(session: AsyncSession, ins: str) -> Patient:
    patient = await session.scalar(select(Patient).where(Patient.ins == ins).order_by(Patient.id).limit(1))
    if patient is None:
        raise NotFound(f"no patient with INS {ins!r}", field="ins")
    return patient

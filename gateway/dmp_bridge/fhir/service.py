"""Reading the patient record under the access policy: search, read, content, metadata update.

Every call ends in the audit log, whatever its outcome: a search
(RECORD_SEARCHED), a DocumentReference read (DOCUMENT_READ), a content read
(DOCUMENT_CONTENT_READ), an emergency access (EMERGENCY_ACCESS, its own event,
with the professional's justification, instead of the usual event), a metadata
update (DOCUMENT_METADATA_UPDATED), and every refusal (ACCESS_REFUSED, with the
policy's reason code). A professional's successful access notifies the patient
with a content-free message.

The HTTP front end (``routes.py``) turns ``AccessRefused`` into 403 (or 404
when the document must stay concealed) and ``DocumentMissing`` into 404.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select

from gateway.audit.chain import Actor, Outcome, Source, Subject
from gateway.audit.events import AuditEvent
from gateway.audit.log import AuditLog
from gateway.directory.identifiers import INS_OIDS, well_formed_nir
from gateway.dmp_bridge.access import (
    AccessPolicy,
    professional_depositor,
    Decision,
    DocumentFacts,
    Emergency,
    PatientChoices,
    Reason,
    Requester,
    RequesterKind,
)
from gateway.dmp_bridge.choices_tables import ArchivedDocument
from gateway.dmp_bridge.depositor import requester_depositor
from gateway.dmp_bridge.patient_choices import PatientChoicesService, PatientNotifier
from gateway.dmp_bridge.record import (
    CONFIDENTIALITY_LEVELS,
    INVISIBLE_TO_LEGAL_REPRESENTATIVES,
    INVISIBLE_TO_PATIENT,
    MASKED_TO_PROFESSIONALS,
    RecordStore,
)
from gateway.dmp_bridge.tables import DocumentStatus, RecordDocument
from gateway.errors import NotFound, UserError
from gateway.security.at_rest import FieldSealer
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database

READ_NOTICE = ("Votre dossier médical a été consulté par un professionnel de santé. "
               "Le détail figure dans l'historique des accès de votre espace.")
EMERGENCY_NOTICE = ("Votre dossier médical a été consulté en urgence (accès « bris de glace ») par un professionnel "
                    "de santé. Le motif et le détail figurent dans l'historique des accès de votre espace.")
SECURITY_FLAGS = (MASKED_TO_PROFESSIONALS, INVISIBLE_TO_PATIENT, *INVISIBLE_TO_LEGAL_REPRESENTATIVES)
MAX_LISTED_IDS = 100


class AccessRefused(Exception):
    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason.value)
        self.decision = decision


class DocumentMissing(Exception):
    """No such document (or one the caller must not learn exists)."""


class InvalidRequest(UserError):
    """The request is malformed (a bad parameter or an unsupported change): 400."""


@dataclass(frozen=True)
class CallContext:
    """Who calls, from where, and whether they claim an emergency."""

    requester: Requester
    source: Source
    emergency: Emergency | None = None

    @property
    def actor(self) -> Actor:
        requester = self.requester
        if requester.kind == RequesterKind.PROFESSIONAL:
            return Actor.professional(requester.id, requester.display_name, requester.profession_code)
        if requester.kind == RequesterKind.PATIENT:
            return Actor.patient(requester.id, requester.display_name)
        return Actor.application(requester.id, requester.display_name)


@dataclass(frozen=True)
class DateBound:
    prefix: str  # eq | ge | le | gt | lt (FHIR search prefixes)
    value: dt.datetime

    def admits(self, moment: dt.datetime | None) -> bool:
        if moment is None:
            return False
        aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
        checks = {"eq": aware == self.value, "ge": aware >= self.value, "le": aware <= self.value,
                  "gt": aware > self.value, "lt": aware < self.value}
        return checks[self.prefix]


@dataclass(frozen=True)
class Token:
    system: str | None
    code: str

    def matches(self, code: str | None, system: str | None) -> bool:
        if code != self.code:
            return False
        return self.system is None or _same_system(self.system, system)


@dataclass(frozen=True)
class SearchQuery:
    """ITI-67 parameters; ``patient_oid`` None means any INS OID."""

    patient_ins: str
    patient_oid: str | None = None
    types: tuple[Token, ...] = ()
    categories: tuple[Token, ...] = ()
    dates: tuple[DateBound, ...] = ()
    statuses: frozenset[str] = frozenset({DocumentStatus.CURRENT.value})
    count: int = 20
    offset: int = 0

    def admits(self, document: RecordDocument) -> bool:
        return (document.status in self.statuses
                and (self.patient_oid is None or document.patient_ins_oid == self.patient_oid)
                and (not self.types or any(t.matches(document.type_code, document.type_code_system) for t in self.types))
                and (not self.categories or any(t.matches(document.class_code, document.class_code_system)
                                                for t in self.categories))
                and all(bound.admits(document.filed_at) for bound in self.dates))


@dataclass(frozen=True)
class SearchResult:
    documents: list[RecordDocument]
    total: int
    archived: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class MetadataChange:
    """What PUT/PATCH may change (PDSm st_maj: status, securityLabel, isArchived); None = unchanged."""

    status: str | None = None
    security_labels: tuple[str, ...] | None = None
    archived: bool | None = None


def facts(document: RecordDocument) -> DocumentFacts:
    return DocumentFacts(unique_id=document.unique_id, patient_ins=document.patient_ins, type_code=document.type_code,
                         class_code=document.class_code,
                         depositor_idnps=professional_depositor(document.depositor_kind, document.depositor_id),
                         masked_to_professionals=document.masked_to_professionals,
                         invisible_to_patient=document.invisible_to_patient)


class RecordAccessService:
    def __init__(self, db: Database, blobs: BlobStore, audit: AuditLog, choices: PatientChoicesService,
                 policy: AccessPolicy, notifier: PatientNotifier, *, fields: FieldSealer | None = None) -> None:
        self.db = db
        self.store = RecordStore(db, blobs, fields)  # opens the sealed metadata of the rows it reads
        self.audit = audit
        self.choices = choices
        self.policy = policy
        self.notifier = notifier

    # ------------------------------------------------------------------ ITI-67

    async def search(self, call: CallContext, query: SearchQuery) -> SearchResult:
        patient = well_formed_nir(query.patient_ins)
        choices = await self.choices.choices(query.patient_ins)
        decision = self.policy.check_record(call.requester, query.patient_ins, choices, call.emergency)
        if not decision.allowed:
            await self.refuse(call, decision, patient=patient, operation="search")
        rows = await self._patient_documents(query.patient_ins)
        shown, withheld = self._visible(call, [row for row in rows if query.admits(row)], choices)
        page = shown[query.offset:query.offset + query.count]
        await self._record_access(call, AuditEvent.RECORD_SEARCHED, patient, None, {
            "operation": "search", "total": len(shown), "returned": [d.unique_id for d in page][:MAX_LISTED_IDS],
            "withheld": withheld})
        return SearchResult(page, len(shown), await self._archived([d.unique_id for d in page]))

    async def _patient_documents(self, ins: str) -> list[RecordDocument]:
        try:
            return await self.store.list_for_patient(ins)
        except NotFound:
            return []

    def _visible(self, call: CallContext, rows: Sequence[RecordDocument],
                 choices: PatientChoices) -> tuple[list[RecordDocument], dict[str, int]]:
        by_id = {row.unique_id: row for row in rows}
        shown, withheld = self.policy.visible(call.requester, [facts(row) for row in rows], choices, call.emergency)
        return [by_id[document.unique_id] for document in shown], withheld

    # ------------------------------------------------------------------ reads

    async def read(self, call: CallContext, document_id: str) -> tuple[RecordDocument, bool]:
        """The DocumentReference's row and its isArchived flag."""
        document = await self._permitted(call, document_id, "read")
        await self._record_access(call, AuditEvent.DOCUMENT_READ, document.patient_ins,
                                  Subject.document(document.unique_id), {"operation": "read"})
        return document, bool(await self._archived([document.unique_id]))

    async def read_content(self, call: CallContext, document_id: str) -> tuple[RecordDocument, bytes]:
        """ITI-68: the document's bytes, decrypted with the patient's key."""
        document = await self._permitted(call, document_id, "binary")
        content = await self.store.read_content(document)
        await self._record_access(call, AuditEvent.DOCUMENT_CONTENT_READ, document.patient_ins,
                                  Subject.binary(document.unique_id), {"operation": "binary"})
        return document, content

    async def _permitted(self, call: CallContext, document_id: str, operation: str) -> RecordDocument:
        document = await self._document(call, document_id, operation)
        choices = await self.choices.choices(document.patient_ins)
        decision = self.policy.check_document(call.requester, facts(document), choices, call.emergency)
        if not decision.allowed:
            await self.refuse(call, decision, patient=document.patient_ins, operation=operation,
                              subject=Subject.document(document.unique_id))
        return document

    async def _document(self, call: CallContext, document_id: str, operation: str) -> RecordDocument:
        row = await self._row(document_id)
        if row is None:
            await self.audit.append(AuditEvent.ACCESS_REFUSED, actor=call.actor, patient=None, source=call.source,
                                    subject=Subject.document(document_id[:512] or "-"),
                                    outcome=Outcome.refused("not-found"), details={"operation": operation})
            raise DocumentMissing(document_id)
        return row

    async def _row(self, document_id: str) -> RecordDocument | None:
        if not (document_id.isascii() and document_id.isdigit()) or len(document_id) > 18:
            return None
        async with self.db.session() as session:
            document = await session.get(RecordDocument, int(document_id))
        return await self.store.opened(document) if document is not None else None

    # ------------------------------------------------------------------ update (PDSm: status, securityLabel, isArchived)

    async def current_for_update(self, call: CallContext, document_id: str) -> tuple[RecordDocument, bool]:
        """The document as stored, for an update to be compared with (checked, not audited as a read)."""
        document = await self._permitted(call, document_id, "update")
        return document, bool(await self._archived([document.unique_id]))

    async def update(self, call: CallContext, document_id: str, change: MetadataChange) -> tuple[RecordDocument, bool]:
        """Apply ``change``; only the document's depositor or their organisation may (the software that filed it
        corrects it): decided on who is authenticated, never on the author the document names."""
        document = await self._permitted(call, document_id, "update")
        if not await self._may_amend(call.requester, document):
            await self.refuse(call, Decision.deny(Reason.NOT_DEPOSITOR), patient=document.patient_ins,
                              operation="update", subject=Subject.document(document.unique_id))
        updated = await self._apply(document.id, change)
        if change.archived is not None:
            await self._set_archived(document.unique_id, change.archived, call.requester.id)
        await self.audit.append(AuditEvent.DOCUMENT_METADATA_UPDATED, actor=call.actor, patient=document.patient_ins,
                                source=call.source, subject=Subject.document(document.unique_id),
                                details=_change_details(change))
        return updated, bool(await self._archived([document.unique_id]))

    async def _may_amend(self, requester: Requester, document: RecordDocument) -> bool:
        async with self.db.session() as session:
            depositor = await requester_depositor(session, requester)
        return depositor is not None and depositor.may_amend(document.depositor_kind, document.depositor_id,
                                                             document.depositor_organisations)

    async def _apply(self, row_id: int, change: MetadataChange) -> RecordDocument:
        async with self.db.session() as session:
            document = await session.get(RecordDocument, row_id)
            if document is None:
                raise DocumentMissing(str(row_id))
            if change.status is not None:
                document.status = _checked_status(change.status)
            if change.security_labels is not None:
                _apply_labels(document, change.security_labels)
        return await self.store.opened(document)  # detached once committed: opening writes nothing back

    async def _set_archived(self, unique_id: str, archived: bool, idnps: str) -> None:
        async with self.db.session() as session:
            await session.execute(delete(ArchivedDocument).where(ArchivedDocument.document_unique_id == unique_id))
            if archived:
                session.add(ArchivedDocument(document_unique_id=unique_id, archived_by_idnps=idnps))

    async def _archived(self, unique_ids: list[str]) -> frozenset[str]:
        if not unique_ids:
            return frozenset()
        async with self.db.session() as session:
            rows = await session.scalars(select(ArchivedDocument.document_unique_id)
                                         .where(ArchivedDocument.document_unique_id.in_(unique_ids)))
            return frozenset(rows.all())

    # ------------------------------------------------------------------ audit and notices

    async def refuse(self, call: CallContext, decision: Decision, *, patient: str | None, operation: str,
                     subject: Subject | None = None) -> None:
        """Audit the refusal, then raise ``AccessRefused``."""
        await self.audit.append(AuditEvent.ACCESS_REFUSED, actor=call.actor, patient=well_formed_nir(patient),
                                source=call.source, subject=subject, outcome=Outcome.refused(decision.reason.value),
                                details=_emergency_details(call, {"operation": operation}))
        raise AccessRefused(decision)

    async def _record_access(self, call: CallContext, event: AuditEvent, patient: str | None, subject: Subject | None,
                             details: dict[str, Any]) -> None:
        if call.emergency is not None:
            event = AuditEvent.EMERGENCY_ACCESS  # its own event, carrying the justification
        await self.audit.append(event, actor=call.actor, patient=patient, source=call.source, subject=subject,
                                details=_emergency_details(call, details))
        if patient is not None and call.requester.kind == RequesterKind.PROFESSIONAL:
            await self.notifier.notify_patient(patient, EMERGENCY_NOTICE if call.emergency else READ_NOTICE,
                                               emergency=call.emergency is not None)


def _emergency_details(call: CallContext, details: dict[str, Any]) -> dict[str, Any]:
    if call.emergency is None:
        return details
    return {**details, "emergency": True, "justification": call.emergency.reason.strip() or "(none given)"}


def _same_system(asked: str, stored: str | None) -> bool:
    """Token systems compare as OIDs whatever their spelling (urn:oid:..., bare OID, http://loinc.org)."""
    def oid(value: str) -> str:
        return {"http://loinc.org": "2.16.840.1.113883.6.1"}.get(value, value.removeprefix("urn:oid:"))
    return stored is not None and oid(asked) == oid(stored)


def _checked_status(status: str) -> str:
    allowed = {s.value for s in DocumentStatus}
    if status not in allowed:
        raise InvalidRequest(f"status must be one of {', '.join(sorted(allowed))}", field="status")
    return status


def _apply_labels(document: RecordDocument, labels: tuple[str, ...]) -> None:
    unknown = [label for label in labels if label not in CONFIDENTIALITY_LEVELS and label not in SECURITY_FLAGS]
    if unknown:
        raise InvalidRequest(f"unknown securityLabel code(s) {', '.join(unknown)} (JDV_J08)", field="securityLabel")
    levels = [level for level in ("V", "R", "N") if level in labels]
    document.confidentiality_code = levels[0] if levels else "N"
    document.confidentiality = [{"code": label, "system": None, "display": None} for label in labels]
    document.masked_to_professionals = MASKED_TO_PROFESSIONALS in labels
    document.invisible_to_patient = INVISIBLE_TO_PATIENT in labels
    document.invisible_to_legal_representatives = any(flag in labels for flag in INVISIBLE_TO_LEGAL_REPRESENTATIVES)


def _change_details(change: MetadataChange) -> dict[str, Any]:
    details: dict[str, Any] = {"operation": "update"}
    if change.status is not None:
        details["status"] = change.status
    if change.security_labels is not None:
        details["securityLabel"] = list(change.security_labels)
    if change.archived is not None:
        details["isArchived"] = change.archived
    return details


def known_ins_oid(system: str) -> str | None:
    """The INS OID named by a patient.identifier system (``urn:oid:1.2.250.1.213.1.4.10`` or the bare OID)."""
    oid = system.removeprefix("urn:oid:")
    return oid if oid in INS_OIDS else None

"""File the documents of a delivered message into the patient's record (mssante.md §3.1, §3.4, §7).

``file_into_record`` takes what ``extract_documents`` found and decides, per
document, one outcome: filed, duplicate, skipped (not a report of its own) or
refused with a CI-SIS integration code (§1.7: 900-906). A refusal is an
outcome, not an error: it never undoes another document's filing.

Two phases, so that filing costs one commit: ``prepare_filing`` (no database
write) identifies the patient, writes each new document's encrypted blob
(fsync; a document up to ``blobs.INLINE_MAX`` is sealed in memory instead, and
inserted by the transaction with the row that references it, durable with that
commit: no file, no fsync) and seals its free-text metadata (``record.RecordSealer``);
``apply_filing`` then runs inside one transaction (the worker's, with the
job's outcomes and the acknowledgements), a synchronous function over a
``Connection`` (``Database.run_in_transaction``: one hop to a database thread),
and only writes rows, by SQL Core: the documents, the versions they replace and
their audit entries (``forecast_filing`` decides the same without writing). Blobs that no committed row
references are deleted afterwards (``PreparedFiling.release``); a crash in
between leaves an unreferenced blob file, never a row without its blob (an inline
blob commits or rolls back with its row: never a stray one).

Only a copy delivered to a patient's own mailbox feeds the record: a copy
delivered to a professional's mailbox is examined for nothing (outcome
``skipped``), whatever patient its documents name.

Who deposits: the owner of the mailbox the message was accepted from, as the
accepting session established it (``depositor.py``; never a header or the
document). Without one (a null sender, mail the gateway wrote, a sender
missing from the directory) nothing is filed (906).

Who the patient is:
- a CDA: its ``recordTarget`` INS with the identity traits (``patient.py``);
  inside an XDM, a METADATA ``patientId`` naming another INS is a 904;
- an XDM entry without a CDA: the METADATA ``patientId`` (an INS root) with
  the four ``sourcePatientInfo`` traits, exactly as a CDA (903 without an INS,
  905 when a trait is missing, 904 when one differs);
- a plain PDF: the patient whose mailbox received it.
The INS must be in the directory (else 902), with matching traits (else 904),
and the patient's space must be active: an opposed or closed patient gets
nothing filed. A document must be about the patient whose mailbox received it
(else 904: a misaddressed message is never filed into anyone's record).

What is not filed as a report of its own (outcome ``skipped``): IHE DSG
signature entries of an XDM (they sign the submission set; they stay in the
delivered message, and ``signature_result`` records a verification once one
is made), and a PDF attached beside a CDA or XDM in the same message (CI-SIS
ECO.2.1.1: it is the rendering of the structured document, which is what is
filed), and a bare PDF sent to a professional (nobody to file it for).

Idempotence: the same unique id (CDA id, XDS uniqueId) or the same (setId,
versionNumber) is filed once; both are unique in the table, so concurrent
filers of one document (a message sent to the patient and to the doctor)
collide in the database, and the loser runs its transaction again
(``committed``) and sees a duplicate.

Version replacement (IHE XDS RPLC): the document named by the
``relatedDocument/parentDocument`` id is superseded. When that id is in no
record (the CI-SIS BIO V2 sample names a parent that is not V1's id), the
latest current version of the same setId with a lower version number is
superseded instead. Only the depositor of the replaced document, or someone
of the depositor's organisation, may replace it or add to its series (901
otherwise, decided before anything else is said about the series); the author
the new document names is kept as metadata and decides nothing. A replacement
whose setId already has a newer current version is refused (900). A lower
version arriving after a newer one is filed as already superseded (history
complete).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Select, Table, and_, bindparam, case, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gateway.audit.chain import Actor, Door, Outcome, Source, Subject
from gateway.audit.events import AuditEvent
from gateway.audit.log import AuditLog
from gateway.directory.identifiers import INS_OIDS, PRODUCTION_INS_OIDS, IdentifierError, validate_nir
from gateway.dmp_bridge.cda import CdaAuthor, CdaDocument, Code, PersonName
from gateway.dmp_bridge.codes import derive_xds_codes
from gateway.dmp_bridge.content_types import decided_type
from gateway.dmp_bridge.depositor import Depositor
from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.extract import ExtractedDocument, ExtractionResult
from gateway.dmp_bridge.formats import looks_like_dicom
from gateway.dmp_bridge.patient import (
    IdentificationFailure,
    KnownPatientTraits,
    PatientIdentity,
    compare_with_known,
    identify_document,
)
from gateway.dmp_bridge.record import (
    INVISIBLE_TO_LEGAL_REPRESENTATIVES,
    INVISIBLE_TO_PATIENT,
    MASKED_TO_PROFESSIONALS,
    RecordSealer,
    patient_owner,
)
from gateway.dmp_bridge.tables import DocumentStatus, OutcomeKind, RecordDocument
from gateway.dmp_bridge.xdm import DocumentEntry, XdsAuthor, XdsCode
from gateway.security.at_rest import FieldSealer
from gateway.storage.blobs import INLINE_MAX, BlobStore, StoredBlob, insert_inline
from gateway.storage.db import Database
from gateway.storage.models import Patient, PatientState, utcnow
from gateway.storage.prepared import Prepared

log = logging.getLogger("gateway.dmp.filing")

NOT_A_PATIENT_MAILBOX = ("delivered to a professional's mailbox: only what is delivered to a patient's own mailbox "
                         "feeds that patient's record")
NO_DEPOSITOR = ("the sender is not a mailbox of the directory that can deposit documents (a professional or an "
                "organisation, authenticated on submission or the peer's sender on relay): not filed")
UUID_OID_ARC = "2.25"
RECORDS = cast(Table, RecordDocument.__table__)
FORECAST_IDS = 1 << 62  # the ids a forecast gives the rows it would write (after every real one, as they would be)
PATIENTS = cast(Table, Patient.__table__)
T = TypeVar("T")  # ITU-T X.667: an OID made of a UUID, for documents that bring no id of their own


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class FilingContext:
    """The delivery a message is filed from."""

    delivery_key: str | None = None
    message_id: str | None = None
    sender: str | None = None  # the envelope sender the door accepted
    mailbox_patient_id: int | None = None  # set when delivered to a patient's mailbox: only these are filed
    depositor: Depositor | None = None  # who deposited it, from the accepting session (depositor.py)
    accept_production: bool = False  # production INS roots (…4.8/.9): the directory policy
    signature_result: str | None = None  # the S/MIME verdict of the message (signer and summary), when signed


@dataclass(frozen=True)
class DocumentOutcome:
    attachment: str | None
    unique_id: str | None
    outcome: OutcomeKind
    code: IntegrationCode | None = None
    reason: str | None = None
    record_document_id: int | None = None
    patient_id: int | None = None
    patient_ins: str | None = None
    blob_id: str | None = None  # the content blob a new record row references


@dataclass(frozen=True)
class FilingReport:
    outcomes: tuple[DocumentOutcome, ...]

    @property
    def filed(self) -> tuple[DocumentOutcome, ...]:
        return tuple(o for o in self.outcomes if o.outcome == OutcomeKind.FILED)

    @property
    def refused(self) -> tuple[DocumentOutcome, ...]:
        return tuple(o for o in self.outcomes if o.outcome == OutcomeKind.REFUSED)

    @property
    def in_record(self) -> tuple[DocumentOutcome, ...]:
        """Filed now or earlier: the message's documents that the record holds."""
        return tuple(o for o in self.outcomes if o.outcome in (OutcomeKind.FILED, OutcomeKind.DUPLICATE))

    @property
    def first_refusal(self) -> DocumentOutcome | None:
        return self.refused[0] if self.refused else None

    @property
    def blob_ids(self) -> frozenset[str]:
        return frozenset(o.blob_id for o in self.outcomes if o.blob_id is not None)

    @property
    def patient_ids(self) -> frozenset[int]:
        return frozenset(o.patient_id for o in self.in_record if o.patient_id is not None)


class FilingJournal(Protocol):
    """Where filing events go (the audit log), written in the filing's own transaction.

    ``for_transaction`` gives the journal of one transaction (attempt): its events are collected as the
    documents are decided and written by ``write``, in that transaction, before it commits."""

    def for_transaction(self) -> FilingJournal: ...

    def document_filed(self, document: RecordDocument, replaced: RecordDocument | None) -> None: ...

    def filing_refused(self, outcome: DocumentOutcome) -> None: ...

    def write(self, connection: Connection) -> None: ...


class LoggingJournal:
    """The journal when no audit log is wired: one log line per event."""

    def for_transaction(self) -> FilingJournal:
        return self

    def document_filed(self, document: RecordDocument, replaced: RecordDocument | None) -> None:
        log.info("document filed: %s for patient %s%s", document.unique_id, document.patient_ins,
                 f", replacing {replaced.unique_id}" if replaced else "")

    def filing_refused(self, outcome: DocumentOutcome) -> None:
        log.info("filing refused: %s (%s) %s: %s", outcome.unique_id or outcome.attachment,
                 outcome.patient_ins or "no patient", outcome.code, outcome.reason)

    def write(self, connection: Connection) -> None:
        del connection


class AuditJournal:
    """Filing events in the hash-chained audit log, committed with the document (events 101-103): the
    entries of a transaction are collected (``AuditBatch``) and appended by one claim of the chain head."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.batch = audit.batch()

    def for_transaction(self) -> FilingJournal:
        return AuditJournal(self.audit)

    def document_filed(self, document: RecordDocument, replaced: RecordDocument | None) -> None:
        actor = _depositor_actor(document)
        details = {"type": document.type_code, "version": document.version_number, "sender": document.source_sender,
                   "author": document.author_idnps, "submitted_by": document.submitted_by}
        self.batch.add(AuditEvent.DOCUMENT_FILED, actor=actor, patient=document.patient_ins,
                       subject=Subject.document(document.unique_id), source=Source(Door.SMTP), details=details)
        if replaced is not None:
            self.batch.add(AuditEvent.DOCUMENT_REPLACED, actor=actor, patient=document.patient_ins,
                           subject=Subject.document(replaced.unique_id), source=Source(Door.SMTP),
                           details={"replaced_by": document.unique_id})

    def filing_refused(self, outcome: DocumentOutcome) -> None:
        subject = Subject.document(outcome.unique_id) if outcome.unique_id else None
        reason = f"{int(outcome.code)}^{outcome.code.label}: {outcome.reason}" if outcome.code else outcome.reason or ""
        self.batch.add(AuditEvent.DOCUMENT_FILING_REFUSED, actor=Actor.system("dmp-bridge"),
                       patient=outcome.patient_ins, subject=subject, source=Source(Door.SMTP),
                       outcome=Outcome.refused(reason[:1000]),
                       details={"attachment_sha256": _name_digest(outcome.attachment)})

    def write(self, connection: Connection) -> None:
        self.batch.write_in(connection)


class _Unjournaled:
    """The journal of a forecast (nothing is committed, so nothing is recorded)."""

    def for_transaction(self) -> FilingJournal:
        return self

    def document_filed(self, document: RecordDocument, replaced: RecordDocument | None) -> None:
        del document, replaced

    def filing_refused(self, outcome: DocumentOutcome) -> None:
        del outcome

    def write(self, connection: Connection) -> None:
        del connection


def _name_digest(name: str | None) -> str | None:
    """An attachment's name as a digest: the audit log is kept in clear for auditors and outlives
    crypto-shredding, and a file name ("CR_DUPONT_IRM.pdf") can say who and what; the digest still
    matches the name in the (sealed) filing outcome."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:32] if name else None


def _depositor_actor(document: RecordDocument) -> Actor:
    """Who filed it: the depositor the gateway established (the claimed author goes in the details)."""
    if document.depositor_kind == "professional" and document.depositor_id:
        return Actor.professional(document.depositor_id, document.source_sender or document.depositor_id, None)
    if document.depositor_kind == "organisation" and document.depositor_id:
        return Actor.application(document.depositor_id, document.source_sender or document.depositor_id)
    return Actor.system("dmp-bridge")


# ------------------------------------------------------------------------------------ entry point


async def file_into_record(db: Database, blobs: BlobStore, extraction: ExtractionResult, context: FilingContext,
                           *, journal: FilingJournal | None = None, sealer: RecordSealer | None = None) -> FilingReport:
    """File every document of ``extraction`` in one transaction; the outcome of each, and of each
    attachment that failed. (The worker runs the same two phases inside its own job transaction.)"""
    prepared = await prepare_filing(db, blobs, extraction, context, sealer or RecordSealer(FieldSealer(blobs.keys)))
    journal = journal or LoggingJournal()

    def work(connection: Connection) -> FilingReport:
        journaled = journal.for_transaction()
        report = apply_filing(connection, prepared, journaled, patients=TransactionPatients(connection),
                              records=RecordIndex.read(connection, [prepared]))
        journaled.write(connection)
        return report

    try:
        for _attempt in range(3):
            try:
                report = await committed(db, work)
                break
            except NotWrittenAhead as missing:  # in the record at phase 1, gone since: stored now, then again
                await missing.write_ahead(blobs, prepared.sealer)
        else:
            raise RuntimeError("the record kept changing while the document was filed: try again")
    except BaseException:
        await prepared.release(blobs, kept=())
        raise
    await prepared.release(blobs, kept=report.blob_ids)
    return report


async def committed(db: Database, work: Callable[[Connection], T], *, attempts: int = 3) -> T:
    """Run ``work`` as one write transaction (``Database.run_in_transaction``: on SQLite one hop to a
    database thread); again (from scratch) when a concurrent filer of the same document or notice committed
    first (a unique constraint fails): the next run finds it filed."""
    for attempt in range(1, attempts + 1):
        try:
            return await db.run_in_transaction(work, write=True)
        except IntegrityError:
            if attempt == attempts:
                raise
            log.info("concurrent filing of the same document: filing again (attempt %d)", attempt + 1)
    raise AssertionError("unreachable")


class NotWrittenAhead(Exception):
    """A document to file whose blob phase 1 did not write (the record held it then, or its patient was not
    found then): nothing is committed; the caller writes it ahead (``write_ahead``) and runs again."""

    def __init__(self, missing: list[ToStore]) -> None:
        super().__init__(f"{len(missing)} document(s) to write ahead first")
        self.missing = missing

    async def write_ahead(self, blobs: BlobStore, sealer: RecordSealer) -> None:
        for document in self.missing:
            await store_ahead(blobs, sealer, document)


ToStore = tuple["_Pending", "DocumentFields", str]  # a document to file, its record fields, its patient's INS


async def store_ahead(blobs: BlobStore, sealer: RecordSealer, document: ToStore) -> None:
    """A document a transaction (or its forecast) files, written ahead: its blob (fsync), its sealed metadata."""
    item, fields, ins = document
    item.fields, item.patient_ins = fields, ins
    if item.stored is None or item.sealed_columns is None:
        await _write_ahead(blobs, sealer, item, ins)


async def store_ahead_many(blobs: BlobStore, sealer: RecordSealer, documents: Sequence[ToStore]) -> None:
    """``store_ahead`` of several documents: each one's sealed metadata, then their blobs in one worker-thread
    hop (``BlobStore.put_many``: each fsynced). A blob that failed raises its error once the others are kept
    on their items (released as any blob written ahead is)."""
    missing: list[_Pending] = []
    for item, fields, ins in documents:
        item.fields, item.patient_ins = fields, ins
        if item.sealed_columns is None:
            item.sealed_columns = await sealer.seal_document_columns(ins, fields.columns)
        if item.stored is None:
            missing.append(item)
    # A document up to ``INLINE_MAX`` is sealed here, in memory (``inline``): the filing transaction inserts it
    # with the row that references it (``WrittenRows.insert``), durable with that commit: no file, no fsync.
    for item in [item for item in missing if _inline(item.document.content)]:
        item.stored = await blobs.put(patient_owner(item.patient_ins or ""), item.document.content, inline=True)
    missing = [item for item in missing if item.stored is None]
    results = await blobs.put_many([(patient_owner(item.patient_ins or ""), item.document.content)
                                    for item in missing])
    errors = [result for result in results if isinstance(result, Exception)]
    for item, result in zip(missing, results):
        if not isinstance(result, Exception):
            item.stored = result
    if errors:
        raise errors[0]


def _inline(content: bytes) -> bool:
    """A document small enough to seal in memory and insert with its record row (``blobs.INLINE_MAX``)."""
    return len(content) <= INLINE_MAX


@dataclass
class _Pending:
    """One document between the two phases: decided already (skipped, refused) or to store."""

    document: ExtractedDocument
    outcome: DocumentOutcome | None = None
    claim: _PatientClaim | None = None
    fields: DocumentFields | None = None
    sealed_columns: dict[str, Any] | None = None
    stored: StoredBlob | None = None
    patient_ins: str | None = None  # the patient phase 1 found (the transaction finds them again)


@dataclass
class PreparedFiling:
    """What ``prepare_filing`` wrote and decided before the transaction that files it."""

    context: FilingContext
    sealer: RecordSealer
    failures: list[DocumentOutcome]
    pending: list[_Pending]

    def settle(self, kept: frozenset[str] | tuple[str, ...]) -> None:
        """The blobs written ahead that committed rows reference are the record's from now on: no later
        ``release`` deletes them."""
        for item in self.pending:
            if item.stored is not None and item.stored.blob_id in kept:
                item.stored = None

    async def release(self, blobs: BlobStore, *, kept: frozenset[str] | tuple[str, ...]) -> None:
        """Delete the blobs written ahead that no committed row references (an inline one was only ever
        written by a transaction that committed its row, or rolled back with it: nothing to delete)."""
        for item in self.pending:
            if item.stored is not None and item.stored.blob_id not in kept:
                await blobs.discard(item.stored)
                item.stored = None


class PatientLookup:
    """Patient rows by id and by (INS, OID), each read once per batch in phase 1 (where the answer only
    decides what to write ahead: the filing transaction decides again, with ``TransactionPatients``)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._found: dict[tuple[Any, ...], Patient | None] = {}
        self._reading = asyncio.Lock()  # jobs prepared side by side wait for the first reader of a patient

    async def by_id(self, patient_id: int) -> Patient | None:
        return await self._get(("id", patient_id), lambda: _patient_by_id(patient_id))

    async def by_ins(self, ins: str, oid: str | None) -> Patient | None:
        return await self._get(("ins", ins, oid), lambda: _patient_by_ins(ins, oid))

    async def _get(self, key: tuple[Any, ...], query: Callable[[], Select[Any]]) -> Patient | None:
        async with self._reading:
            if key not in self._found:
                async with self.db.session() as session:
                    row = (await session.execute(query())).mappings().first()
                self._found[key] = Patient(**row) if row is not None else None
            return self._found[key]


class TransactionPatients:
    """``PatientLookup`` inside the filing transaction (synchronous), each patient read once."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._found: dict[tuple[Any, ...], Patient | None] = {}

    def by_id(self, patient_id: int) -> Patient | None:
        return self._get(("id", patient_id), lambda: _patient_by_id(patient_id))

    def by_ins(self, ins: str, oid: str | None) -> Patient | None:
        return self._get(("ins", ins, oid), lambda: _patient_by_ins(ins, oid))

    def _get(self, key: tuple[Any, ...], query: Callable[[], Select[Any]]) -> Patient | None:
        if key not in self._found:
            row = self.connection.execute(query()).mappings().first()
            self._found[key] = Patient(**row) if row is not None else None
        return self._found[key]


def _patient_by_id(patient_id: int) -> Select[Any]:
    return select(PATIENTS).where(PATIENTS.c.id == patient_id)


def _patient_by_ins(ins: str, oid: str | None) -> Select[Any]:
    return select(PATIENTS).where(PATIENTS.c.ins == ins, PATIENTS.c.ins_oid == oid).order_by(PATIENTS.c.id).limit(1)


async def prepare_filing(db: Database, blobs: BlobStore, extraction: ExtractionResult, context: FilingContext,
                         sealer: RecordSealer, *, patients: PatientLookup | None = None) -> PreparedFiling:
    """Phase 1, no database write: decide what needs no transaction, write each new document's encrypted
    blob (fsync) and seal its metadata, so that the transaction that files them only writes rows."""
    prepared = await plan_filing(db, extraction, context, sealer, patients=patients)
    records = await db.run_in_transaction(lambda connection: RecordIndex.read(connection, [prepared]))
    await write_ahead(blobs, prepared, records)
    return prepared


async def plan_filing(db: Database, extraction: ExtractionResult, context: FilingContext, sealer: RecordSealer, *,
                      patients: PatientLookup | None = None) -> PreparedFiling:
    """Phase 1 without its writes: what is decided already (skipped, refused) and each document's record
    fields; ``write_ahead`` then stores the documents the record does not hold (for a batch: after one
    ``RecordIndex`` read for all its filings)."""
    if context.mailbox_patient_id is None:
        return PreparedFiling(context, sealer, _not_for_the_record(extraction), [])
    failures = [DocumentOutcome(f.attachment, None, OutcomeKind.REFUSED, f.code, f.reason) for f in extraction.failures]
    patients = patients or PatientLookup(db)
    pending = [await _plan_document(document, context, patients) for document in extraction.documents]
    return PreparedFiling(context, sealer, failures, pending)


async def write_ahead(blobs: BlobStore, prepared: PreparedFiling, records: RecordIndex) -> None:
    """Each planned document that ``records`` (read before) does not hold: its blob (fsync), its sealed
    metadata. The filing transaction decides again: a blob written for nothing is released after it."""
    for item in prepared.pending:
        if item.fields is not None and item.claim is not None and item.outcome is None and item.patient_ins:
            if records.existing(item.fields) is None:
                await _write_ahead(blobs, prepared.sealer, item, item.patient_ins)


def _not_for_the_record(extraction: ExtractionResult) -> list[DocumentOutcome]:
    """A copy delivered to a professional's mailbox: whatever it carries, it is not the patient's to file."""
    return ([DocumentOutcome(f.attachment, None, OutcomeKind.SKIPPED, reason=NOT_A_PATIENT_MAILBOX)
             for f in extraction.failures]
            + [DocumentOutcome(d.attachment, _declared_id(d), OutcomeKind.SKIPPED, reason=NOT_A_PATIENT_MAILBOX)
               for d in extraction.documents])


async def _plan_document(document: ExtractedDocument, context: FilingContext, patients: PatientLookup) -> _Pending:
    skipped = _skip_reason(document, context)
    if skipped is not None:
        return _Pending(document, DocumentOutcome(document.attachment, _declared_id(document), OutcomeKind.SKIPPED,
                                                  reason=skipped))
    if context.depositor is None:
        return _Pending(document, DocumentOutcome(document.attachment, _declared_id(document), OutcomeKind.REFUSED,
                                                  IntegrationCode.OTHER, NO_DEPOSITOR))
    claim = _patient_claim(document, context)
    if isinstance(claim, IdentificationFailure):
        return _Pending(document, DocumentOutcome(document.attachment, _declared_id(document), OutcomeKind.REFUSED,
                                                  claim.code, claim.reason))
    patient = _claimed_patient(claim, context, await (patients.by_ins(claim.ins, claim.oid) if claim.ins is not None
                                                      else patients.by_id(context.mailbox_patient_id or 0)))
    if isinstance(patient, IdentificationFailure):
        return _Pending(document, claim=claim)  # decided (and journaled) in the transaction
    return _Pending(document, claim=claim, fields=document_fields(document, patient.ins, context),
                    patient_ins=patient.ins)


async def _write_ahead(blobs: BlobStore, sealer: RecordSealer, pending: _Pending, ins: str) -> None:
    assert pending.fields is not None
    pending.stored = await blobs.put(patient_owner(ins), pending.document.content,
                                     inline=_inline(pending.document.content))
    pending.sealed_columns = await sealer.seal_document_columns(ins, pending.fields.columns)


class RecordIndex:
    """The record rows a batch of filings can meet, read by one query inside the filing transaction (or
    its forecast): the documents named by a unique id, by a replaced id, or of a series (setId) of the
    batch. The transaction's own new rows are added as they are written, and a replaced row is changed in
    place as it is written, so every later decision of the batch sees them; a question about a document
    outside what was read goes to the database (``covers``)."""

    def __init__(self, rows: Sequence[RecordDocument], unique_ids: set[str], set_ids: set[str]) -> None:
        self._unique_ids, self._set_ids = unique_ids, set_ids
        self._by_unique_id: dict[str, RecordDocument] = {}
        self._by_series: dict[str, list[RecordDocument]] = {}
        for row in sorted(rows, key=lambda row: row.id):
            self.add(row)

    @classmethod
    def read(cls, connection: Connection, filings: Sequence[PreparedFiling]) -> RecordIndex:
        fields = [item.fields for prepared in filings for item in prepared.pending if item.fields is not None]
        unique_ids = {f.unique_id for f in fields} | {parent for f in fields for parent in f.replaces}
        set_ids = {f.set_id for f in fields if f.set_id is not None}
        if not unique_ids and not set_ids:
            return cls([], unique_ids, set_ids)
        return cls(_documents(connection, select(RECORDS).where(
            or_(RECORDS.c.unique_id.in_(unique_ids), RECORDS.c.set_id.in_(set_ids)))), unique_ids, set_ids)

    def add(self, row: RecordDocument) -> None:
        """A row read, or written by this transaction."""
        self._by_unique_id.setdefault(row.unique_id, row)
        self._unique_ids.add(row.unique_id)
        if row.set_id is not None:
            self._by_series.setdefault(row.set_id, []).append(row)

    def covers(self, fields: DocumentFields) -> bool:
        return (fields.unique_id in self._unique_ids and all(parent in self._unique_ids for parent in fields.replaces)
                and (fields.set_id is None or fields.set_id in self._set_ids))

    def existing(self, fields: DocumentFields) -> RecordDocument | None:
        """As ``_existing``: the document with this unique id, else the one with the same (setId, version)."""
        found = self._by_unique_id.get(fields.unique_id)
        if found is None and fields.set_id is not None and fields.version is not None:
            found = next((row for row in self._by_series.get(fields.set_id, ())
                          if row.version_number == fields.version), None)
        return found

    def replaced(self, patient: Patient, replaces: Sequence[str]) -> RecordDocument | None:
        return next((row for row in sorted((self._by_unique_id[parent] for parent in replaces
                                            if parent in self._by_unique_id), key=lambda row: row.id)
                     if row.patient_id == patient.id), None)

    def current_around(self, patient: Patient, set_id: str,
                       version: int) -> tuple[RecordDocument | None, RecordDocument | None]:
        """As ``_current_around``: the newest current version above ``version``, and the newest below."""
        current = sorted((row for row in self._by_series.get(set_id, ())
                          if row.patient_id == patient.id and row.status == DocumentStatus.CURRENT.value
                          and row.version_number is not None and row.version_number != version),
                         key=lambda row: row.version_number or 0, reverse=True)
        newer = next((row for row in current if (row.version_number or 0) > version), None)
        older = next((row for row in current if (row.version_number or 0) < version), None)
        return newer, older


class RecordRows(Protocol):
    """Where the filing transaction's new and replaced record rows go."""

    def insert(self, item: _Pending, fields: DocumentFields, values: dict[str, Any]) -> int: ...

    def supersede(self, row: RecordDocument) -> None: ...


_INSERT_DOCUMENT = Prepared(insert(RECORDS).returning(RECORDS.c.id))
_SUPERSEDE = Prepared(update(RECORDS).where(RECORDS.c.id == bindparam("document")).values(
    status=bindparam("status"), superseded_by_unique_id=bindparam("superseded_by"),
    superseded_at=bindparam("superseded_at")))


class WrittenRows:
    """The rows written in the transaction (SQL Core, on SQLite's driver directly)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def insert(self, item: _Pending, fields: DocumentFields, values: dict[str, Any]) -> int:
        del fields
        if item.stored is None or item.sealed_columns is None:
            raise AssertionError("apply_filing checks the blob was written ahead")
        if item.stored.sealed is not None:
            insert_inline(self.connection, item.stored)   # durable with this row; rolled back with it
        return int(_INSERT_DOCUMENT.run(self.connection, values).fetchone()[0])

    def supersede(self, row: RecordDocument) -> None:
        _SUPERSEDE.run(self.connection, {"document": row.id, "status": row.status,
                                         "superseded_by": row.superseded_by_unique_id,
                                         "superseded_at": row.superseded_at})


class ForecastRows:
    """A forecast of the transaction (``forecast_filing``): nothing written; the documents that would be
    filed are listed (``to_store``: their blobs are written ahead next), numbered above every real row."""

    def __init__(self) -> None:
        self.to_store: list[ToStore] = []

    def insert(self, item: _Pending, fields: DocumentFields, values: dict[str, Any]) -> int:
        if item.stored is None or item.sealed_columns is None:
            self.to_store.append((item, fields, str(values["patient_ins"])))
        return FORECAST_IDS + len(self.to_store) + 1

    def supersede(self, row: RecordDocument) -> None:
        del row


def apply_filing(connection: Connection, prepared: PreparedFiling, journal: FilingJournal, *,
                 patients: TransactionPatients, records: RecordIndex, rows: RecordRows | None = None) -> FilingReport:
    """Phase 2, synchronous, in the caller's transaction (``Database.run_in_transaction``): the record rows,
    the replaced versions and the journal's events (which the caller writes before the commit). ``patients``
    and ``records``: the transaction's own lookups, shared by the filings of a batch (``records`` read in
    this transaction for all of them). ``rows``: where rows go (``WrittenRows`` by default; ``ForecastRows``
    decides without writing). A document to file whose blob was not written ahead raises ``NotWrittenAhead``
    before anything is committed."""
    outcomes = list(prepared.failures)
    rows = rows or WrittenRows(connection)
    forecast = isinstance(rows, ForecastRows)
    missing: list[ToStore] = []
    for item in prepared.pending:
        outcome = item.outcome or _store_in(connection, item, prepared, journal, patients, records, rows,
                                            forecast, missing)
        if outcome.outcome == OutcomeKind.REFUSED:
            journal.filing_refused(outcome)
        outcomes.append(outcome)
    if missing:
        raise NotWrittenAhead(missing)
    return FilingReport(tuple(outcomes))


def forecast_filing(connection: Connection, prepared: PreparedFiling, *, patients: TransactionPatients,
                    records: RecordIndex) -> tuple[FilingReport, list[ToStore]]:
    """What ``apply_filing`` would decide now, written nowhere, and the documents it would file (to write
    ahead). ``records`` then holds the rows it would have written, as the transaction's would."""
    rows = ForecastRows()
    report = apply_filing(connection, prepared, _Unjournaled(), patients=patients, records=records, rows=rows)
    return report, rows.to_store


# ------------------------------------------------------------------------------------ what to file, for whom


@dataclass(frozen=True)
class _PatientClaim:
    """Who a document says it is about; ``ins`` None means "the owner of the patient mailbox"."""

    ins: str | None
    oid: str | None
    identity: PatientIdentity | None
    source: str


def _skip_reason(document: ExtractedDocument, context: FilingContext) -> str | None:
    if document.is_signature:
        return "IHE DSG signature of the submission set: kept in the delivered message, not a report of its own"
    if document.accompanies_structured:
        return "PDF beside a structured document in the same message (CI-SIS ECO.2.1.1): the CDA is what is filed"
    if context.mailbox_patient_id is None:
        return NOT_A_PATIENT_MAILBOX
    return None


def _patient_claim(document: ExtractedDocument, context: FilingContext) -> _PatientClaim | IdentificationFailure:
    if document.cda is not None:
        identity = identify_document(document.cda, accept_production=context.accept_production)
        if isinstance(identity, IdentificationFailure):
            return identity
        contradiction = _metadata_contradiction(document.xdm_entry, identity)
        return contradiction or _PatientClaim(identity.ins, identity.oid, identity, "CDA recordTarget")
    if document.xdm_entry is not None:
        return _claim_from_metadata(document.xdm_entry, context)
    return _PatientClaim(None, None, None, "patient mailbox")


def _metadata_contradiction(entry: DocumentEntry | None, identity: PatientIdentity) -> IdentificationFailure | None:
    """A CDA in an XDM whose METADATA names another patient contradicts itself (904): neither is trusted."""
    if entry is None or entry.patient is None:
        return None
    try:
        same = (validate_nir(entry.patient.id), entry.patient.oid) == (identity.ins, identity.oid)
    except IdentifierError:
        same = False
    if same:
        return None
    return IdentificationFailure(IntegrationCode.INS_MISMATCH, f"the METADATA patientId {entry.patient.raw!r} is not "
                                 f"the CDA's INS {identity.xds_patient_id!r}: the package contradicts itself")


def _claim_from_metadata(entry: DocumentEntry, context: FilingContext) -> _PatientClaim | IdentificationFailure:
    """An XDM entry that is not a CDA: the METADATA patientId must be an INS (ECO.2.1.2), with the four
    identity traits in sourcePatientInfo, exactly as a CDA's recordTarget (903 / 905 / 904)."""
    reference = entry.patient
    if reference is None:
        return IdentificationFailure(IntegrationCode.INS_ABSENT, "the XDM entry has no patientId: no INS")
    if reference.oid not in INS_OIDS:
        return IdentificationFailure(IntegrationCode.INS_ABSENT, f"the XDM patientId {reference.raw!r} has no INS root")
    if reference.oid in PRODUCTION_INS_OIDS and not context.accept_production:
        return IdentificationFailure(IntegrationCode.INS_ABSENT, f"the XDM patientId uses the production OID {reference.oid}, "
                                     "refused by the accept_production policy")
    try:
        ins = validate_nir(reference.id)
    except IdentifierError as error:
        return IdentificationFailure(IntegrationCode.INS_ABSENT, f"the XDM patientId is not a valid INS: {error}")
    identity = _identity_from_metadata(entry, ins, reference.oid)
    if isinstance(identity, IdentificationFailure):
        return identity
    return _PatientClaim(ins, reference.oid, identity, "XDM patientId")


def _identity_from_metadata(entry: DocumentEntry, ins: str, oid: str) -> PatientIdentity | IdentificationFailure:
    """The sourcePatientInfo traits (PID-5 birth name and first given name, PID-7 birth date, PID-8 sex):
    all four are mandatory with an INS, as in a CDA (905 when one is missing or unreadable)."""
    info = entry.source_patient_info
    traits = (("birth family name", info.family), ("first given name", info.given), ("birth date", info.birth_date),
              ("sex", info.sex))
    missing = [label for label, value in traits if not (value or "").strip()]
    if missing:
        return IdentificationFailure(IntegrationCode.INS_INCOMPLETE, f"INS {ins} comes without its mandatory traits "
                                     f"in the METADATA sourcePatientInfo: {', '.join(missing)} missing")
    assert info.family and info.given and info.birth_date and info.sex
    try:
        born = dt.datetime.strptime(info.birth_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return IdentificationFailure(IntegrationCode.INS_INCOMPLETE, f"INS {ins}: the sourcePatientInfo birth date "
                                     f"{info.birth_date[:32]!r} is not a date (PID-7, YYYYMMDD)")
    return PatientIdentity(ins, oid, info.family, info.given, born, info.sex.strip().upper())


# ------------------------------------------------------------------------------------ storing


@dataclass
class _Plan:
    status: DocumentStatus
    replaced: RecordDocument | None = None
    replaces_unique_id: str | None = None
    superseded_by: str | None = None


def _store_in(connection: Connection, item: _Pending, prepared: PreparedFiling, journal: FilingJournal,
              patients: TransactionPatients, records: RecordIndex, rows: RecordRows, forecast: bool,
              missing: list[ToStore]) -> DocumentOutcome:
    document, context = item.document, prepared.context
    assert item.claim is not None
    claim = item.claim
    patient = _claimed_patient(claim, context, patients.by_ins(claim.ins, claim.oid) if claim.ins is not None
                               else patients.by_id(context.mailbox_patient_id or 0))
    if isinstance(patient, IdentificationFailure):
        return DocumentOutcome(document.attachment, _declared_id(document), OutcomeKind.REFUSED, patient.code,
                               patient.reason, patient_ins=item.claim.ins)
    fields = item.fields or document_fields(document, patient.ins, context)
    known = records if records.covers(fields) else None
    existing = known.existing(fields) if known is not None else (records.existing(fields)
                                                                 or _existing(connection, fields))
    if existing is not None:
        return _duplicate(document, existing, patient, context)
    assert context.depositor is not None
    plan = _replacement_plan(connection, patient, fields, context.depositor, known)
    if isinstance(plan, IdentificationFailure):
        return DocumentOutcome(document.attachment, fields.unique_id, OutcomeKind.REFUSED, plan.code, plan.reason,
                               patient_id=patient.id, patient_ins=patient.ins)
    stored = item.stored
    if not forecast and (stored is None or item.sealed_columns is None or item.fields is None):
        missing.append((item, fields, patient.ins))  # not in phase 1's plan: raised once all are decided
        stored = StoredBlob("", 0)
    values = _record_values(fields, item.sealed_columns if item.sealed_columns is not None else fields.columns,
                            patient, plan, stored or StoredBlob("", 0))
    row = RecordDocument(**values)
    row.id = rows.insert(item, fields, values) if stored is item.stored else -1
    if plan.replaced is not None:
        plan.replaced.status = DocumentStatus.SUPERSEDED.value
        plan.replaced.superseded_by_unique_id = fields.unique_id
        plan.replaced.superseded_at = utcnow()
        rows.supersede(plan.replaced)
    records.add(row)
    journal.document_filed(row, plan.replaced)
    return DocumentOutcome(document.attachment, fields.unique_id, OutcomeKind.FILED,
                           record_document_id=None if forecast or row.id < 0 else row.id, patient_id=patient.id,
                           patient_ins=patient.ins, blob_id=item.stored.blob_id if item.stored else None,
                           reason="; ".join(filter(None, (f"replaces {plan.replaced.unique_id}" if plan.replaced else None,
                                                          *fields.gaps))) or None)


def _claimed_patient(claim: _PatientClaim, context: FilingContext,
                     found: Patient | None) -> Patient | IdentificationFailure:
    """The patient a claim names, ``found`` by INS (or, without one, the mailbox's patient), checked."""
    if claim.ins is None:
        if found is None or not context.mailbox_patient_id:
            return IdentificationFailure(IntegrationCode.UNKNOWN_PATIENT, "the patient of this mailbox is not in the directory")
        return _check_state(found)
    patient = found
    if patient is None:
        return IdentificationFailure(IntegrationCode.UNKNOWN_PATIENT, f"INS {claim.ins} ({claim.oid}, from the {claim.source}) "
                                     "is not a patient of this gateway")
    if context.mailbox_patient_id is not None and patient.id != context.mailbox_patient_id:
        return IdentificationFailure(IntegrationCode.INS_MISMATCH, f"the document is about INS {claim.ins}, "
                                     "not about the patient whose mailbox received it: not filed in either record")
    if claim.identity is not None:
        mismatch = compare_with_known(claim.identity, _known_traits(patient))
        if mismatch is not None:
            return mismatch
    return _check_state(patient)


def _known_traits(patient: Patient) -> KnownPatientTraits:
    return KnownPatientTraits(patient.birth_family_name, patient.first_given_name, patient.birth_date, patient.sex, patient.ins)


def _check_state(patient: Patient) -> Patient | IdentificationFailure:
    if patient.state == PatientState.OPPOSED.value:
        return IdentificationFailure(IntegrationCode.OTHER, f"patient {patient.ins} has opposed their Mon espace santé "
                                     "space: nothing is filed into their record")
    if patient.state == PatientState.CLOSED.value:
        return IdentificationFailure(IntegrationCode.OTHER, f"patient {patient.ins} has closed their Mon espace santé "
                                     "space: nothing is filed into their record")
    return patient


def _existing(connection: Connection, fields: DocumentFields) -> RecordDocument | None:
    """The record's document with this unique id, else the one with the same (setId, version): one query."""
    query = select(RECORDS).where(RECORDS.c.unique_id == fields.unique_id)
    if fields.set_id is not None and fields.version is not None:
        same_version = and_(RECORDS.c.set_id == fields.set_id, RECORDS.c.version_number == fields.version)
        query = (select(RECORDS).where(or_(RECORDS.c.unique_id == fields.unique_id, same_version))
                 .order_by(case((RECORDS.c.unique_id == fields.unique_id, 0), else_=1)).limit(1))
    found = _documents(connection, query)
    return found[0] if found else None


def _documents(connection: Connection, query: Select[Any]) -> list[RecordDocument]:
    """Record rows read by a Core query, as (unattached) ``RecordDocument`` objects."""
    return [RecordDocument(**row) for row in connection.execute(query).mappings()]


def _duplicate(document: ExtractedDocument, existing: RecordDocument, patient: Patient, context: FilingContext) -> DocumentOutcome:
    if existing.patient_id != patient.id:
        return DocumentOutcome(document.attachment, existing.unique_id, OutcomeKind.REFUSED, IntegrationCode.OTHER,
                               "a document with this id (or setId and version) is in another patient's record",
                               patient_id=patient.id, patient_ins=patient.ins)
    if context.delivery_key is not None and existing.source_delivery_key == context.delivery_key:
        # Filed by this very delivery in an interrupted earlier run: it counts as filed now.
        return DocumentOutcome(document.attachment, existing.unique_id, OutcomeKind.FILED,
                               record_document_id=existing.id, patient_id=patient.id, patient_ins=patient.ins)
    return DocumentOutcome(document.attachment, existing.unique_id, OutcomeKind.DUPLICATE,
                           reason=f"already in the record since {existing.filed_at:%Y-%m-%d %H:%M:%S} UTC",
                           record_document_id=existing.id, patient_id=patient.id, patient_ins=patient.ins)


def _replacement_plan(connection: Connection, patient: Patient, fields: DocumentFields,
                            depositor: Depositor, known: RecordIndex | None) -> _Plan | IdentificationFailure:
    """Where a new document goes in its version series; only the depositor of the series (or their
    organisation) may add to it, whether as the new current version or as a late older one. ``known``:
    the rows read for the batch, when they cover these fields (else the database is asked)."""
    target = None
    if fields.replaces:
        target = known.replaced(patient, fields.replaces) if known is not None else next(iter(_documents(
            connection, select(RECORDS).where(RECORDS.c.unique_id.in_(fields.replaces),
                                              RECORDS.c.patient_id == patient.id).order_by(RECORDS.c.id).limit(1))), None)
    if target is None and fields.set_id is not None and fields.version is not None:
        newer, older = (known.current_around(patient, fields.set_id, fields.version) if known is not None
                        else _current_around(connection, patient, fields.set_id, fields.version))
        if newer is not None:
            if not _may_amend(depositor, newer):
                return _not_allowed(newer)
            if fields.replaces:
                return IdentificationFailure(IntegrationCode.WRONG_VERSION, f"version {fields.version} replaces a document, "
                                             f"but version {newer.version_number} ({newer.unique_id}) is already the current one")
            return _Plan(DocumentStatus.SUPERSEDED, superseded_by=newer.unique_id)
        target = older
    if target is None:
        return _Plan(DocumentStatus.CURRENT, replaces_unique_id=fields.replaces[0] if fields.replaces else None)
    return _check_replaceable(target, depositor)


def _current_around(connection: Connection, patient: Patient, set_id: str,
                    version: int) -> tuple[RecordDocument | None, RecordDocument | None]:
    """The newest current version of the series above ``version``, and the newest below it (one query)."""
    current = _documents(connection, select(RECORDS).where(
        RECORDS.c.patient_id == patient.id, RECORDS.c.set_id == set_id,
        RECORDS.c.status == DocumentStatus.CURRENT.value, RECORDS.c.version_number.is_not(None),
        RECORDS.c.version_number != version).order_by(RECORDS.c.version_number.desc()))
    versions = [(document.version_number or 0, document) for document in current]
    newer = next((document for number, document in versions if number > version), None)
    older = next((document for number, document in versions if number < version), None)
    return newer, older


def _check_replaceable(target: RecordDocument, depositor: Depositor) -> _Plan | IdentificationFailure:
    if not _may_amend(depositor, target):  # first: a stranger learns nothing of the series
        return _not_allowed(target)
    if target.status != DocumentStatus.CURRENT.value:
        return IdentificationFailure(IntegrationCode.WRONG_VERSION, f"document {target.unique_id} was already replaced by "
                                     f"{target.superseded_by_unique_id}")
    return _Plan(DocumentStatus.CURRENT, replaced=target, replaces_unique_id=target.unique_id)


def _may_amend(depositor: Depositor, target: RecordDocument) -> bool:
    """DMP rule (CI-SIS 901), bound to who deposited: the original's depositor or their organisation."""
    return depositor.may_amend(target.depositor_kind, target.depositor_id, target.depositor_organisations)


def _not_allowed(target: RecordDocument) -> IdentificationFailure:
    return IdentificationFailure(IntegrationCode.AUTHOR_NOT_ALLOWED, f"document {target.unique_id} was deposited by "
                                 "another sender: only the sender who deposited it, or their organisation, may replace "
                                 "it (the author a document names proves nothing)")


def _record_values(fields: DocumentFields, sealed_columns: dict[str, Any], patient: Patient, plan: _Plan,
                   stored: StoredBlob) -> dict[str, Any]:
    now = utcnow()
    return {
        **sealed_columns, "unique_id": fields.unique_id, "set_id": fields.set_id, "version_number": fields.version,
        "patient_id": patient.id, "patient_ins": patient.ins, "patient_ins_oid": patient.ins_oid,
        "status": plan.status.value, "replaces_unique_id": plan.replaces_unique_id,
        "superseded_by_unique_id": plan.superseded_by,
        "superseded_at": now if plan.status == DocumentStatus.SUPERSEDED else None,
        "blob_id": stored.blob_id, "size": stored.size, "filed_at": now,
    }


# ------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class DocumentFields:
    """The record row's metadata, from the CDA header first, the XDM METADATA second."""

    unique_id: str
    set_id: str | None
    version: int | None
    replaces: tuple[str, ...]
    columns: dict[str, Any] = field(default_factory=dict)
    gaps: tuple[str, ...] = ()  # metadata the DMP needs that could not be derived (filed anyway, reported)


def document_fields(document: ExtractedDocument, patient_ins: str, context: FilingContext) -> DocumentFields:
    columns = _source_columns(document, context) | _content_columns(document)
    entry = document.xdm_entry
    if entry is not None:
        columns |= _entry_columns(entry)
    if document.cda is not None:
        return _cda_fields(document.cda, entry, columns)
    unique_id = (entry.unique_id if entry is not None and entry.unique_id else None) or _content_oid(patient_ins, document.content)
    if entry is None:
        columns |= _pdf_columns(document)
    return DocumentFields(unique_id, None, None, (), columns)


def _cda_fields(cda: CdaDocument, entry: DocumentEntry | None, columns: dict[str, Any]) -> DocumentFields:
    columns = columns | {key: value for key, value in _cda_columns(cda).items() if value is not None or key not in columns}
    derived = derive_xds_codes(cda, columns)  # classCode and formatCode from the ANS tables (dmp_bridge/codes.py)
    columns |= derived.columns | _confidentiality_columns(_cda_confidentiality(cda, entry))
    return DocumentFields(cda.id.xds_unique_id, cda.set_id.xds_unique_id if cda.set_id else None, cda.version_number,
                          tuple(parent.xds_unique_id for parent in cda.replaces), columns, derived.gaps)


def _source_columns(document: ExtractedDocument, context: FilingContext) -> dict[str, Any]:
    submission_set = document.xdm_submission_set
    depositor = context.depositor
    return {
        "source_kind": document.source, "source_attachment": _cut(document.attachment, 512),
        "source_message_id": _cut(context.message_id, 998), "source_delivery_key": context.delivery_key,
        "source_sender": _cut(context.sender, 320), "source_door": depositor.door if depositor else None,
        "depositor_kind": depositor.kind.value if depositor else None, "depositor_id": depositor.id if depositor else None,
        "depositor_organisations": list(depositor.organisations) if depositor else None,
        "submitted_by": _cut(depositor.submitted_by, 320) if depositor else None,
        "submission_set_unique_id": submission_set.unique_id if submission_set else None,
        "signature_result": context.signature_result,
    }


def _content_columns(document: ExtractedDocument) -> dict[str, Any]:
    content = document.content
    return {"mime_type": decided_type(document), "body_kind": _body_kind(document),  # never the declared type
            "sha1": hashlib.sha1(content).hexdigest(), "sha256": hashlib.sha256(content).hexdigest(),
            "confidentiality_code": "N", "confidentiality": [], "event_codes": [], "authors": []}


def _body_kind(document: ExtractedDocument) -> str:
    if document.cda is not None:
        return document.cda.body.kind.value if document.cda.body else "other"
    if document.pdf is not None:
        return "pdf"
    return "dicom" if looks_like_dicom(document.content) else "other"


def _cda_columns(cda: CdaDocument) -> dict[str, Any]:
    author = cda.authors[0] if cda.authors else None
    event = cda.service_events[0] if cda.service_events else None
    legal = cda.legal_authenticator
    return {
        **_code_columns("type_code", "type_code_system", "type_display", cda.code),
        **_code_columns("facility_type_code", "facility_type_system", "facility_type_display", cda.healthcare_facility_type),
        **_code_columns("practice_setting_code", "practice_setting_system", "practice_setting_display", cda.practice_setting),
        "title": cda.title, "language_code": _cut(cda.language_code, 16), "creation_time": cda.effective_time,
        "service_start": event.start if event else None, "service_stop": event.stop if event else None,
        "event_codes": [_code_json(e.code) for e in cda.service_events if e.code is not None],
        **_cda_author_columns(author),
        "authors": [_cda_author_json(a) for a in cda.authors],
        "custodian_idnst": cda.custodian.idnst if cda.custodian else None,
        "custodian_name": _cut(cda.custodian.name, 256) if cda.custodian else None,
        "legal_authenticator_idnps": legal.idnps if legal else None,
        "legal_authenticator_name": _person_name(legal.name) if legal else None,
        "legal_authenticated_at": legal.time if legal else None,
    }


def _cda_author_columns(author: CdaAuthor | None) -> dict[str, Any]:
    if author is None:
        return {}
    organisation = author.organization
    return {
        "author_idnps": author.idnps, "author_name": _person_name(author.name) or _cut(author.device_name, 256),
        **_code_columns("author_profession_code", "author_profession_system", "author_profession_display", author.profession),
        "author_organisation_idnst": organisation.idnst if organisation else None,
        "author_organisation_name": _cut(organisation.name, 256) if organisation else None,
    }


def _cda_author_json(author: CdaAuthor) -> dict[str, Any]:
    organisation = author.organization
    return {
        "idnps": author.idnps, "name": _person_name(author.name) or author.device_name,
        "profession": _code_json(author.profession) if author.profession else None,
        "organisation": {"idnst": organisation.idnst, "name": organisation.name} if organisation else None,
        "time": author.time.isoformat() if author.time else None,
    }


def _entry_columns(entry: DocumentEntry) -> dict[str, Any]:
    """XDS DocumentEntry metadata (mssante.md §3.2); the CDA header overrides what both carry."""
    author = entry.authors[0] if entry.authors else None
    return {
        **_xds_code_columns("type_code", "type_code_system", "type_display", entry.type_code),
        **_xds_code_columns("class_code", "class_code_system", "class_display", entry.class_code),
        **_xds_code_columns("format_code", "format_code_system", None, entry.format_code),
        **_xds_code_columns("facility_type_code", "facility_type_system", "facility_type_display",
                            entry.healthcare_facility_type_code),
        **_xds_code_columns("practice_setting_code", "practice_setting_system", "practice_setting_display",
                            entry.practice_setting_code),
        "title": entry.title, "language_code": _cut(entry.language_code, 16), "creation_time": entry.creation_time,
        "service_start": entry.service_start_time, "service_stop": entry.service_stop_time,
        "event_codes": [_xds_code_json(code) for code in entry.event_codes],
        **_xds_author_columns(author),
        "authors": [_xds_author_json(a) for a in entry.authors],
        "legal_authenticator_idnps": entry.legal_authenticator.id if entry.legal_authenticator else None,
        "legal_authenticator_name": _xcn_name(entry.legal_authenticator),
        **_confidentiality_columns([_xds_code_json(code) for code in entry.confidentiality_codes]),
    }


def _xds_author_columns(author: XdsAuthor | None) -> dict[str, Any]:
    if author is None:
        return {}
    institution = author.institutions[0] if author.institutions else None
    specialty = _hl7_coded(author.specialties[0]) if author.specialties else None
    return {
        "author_idnps": author.person.id if author.person else None, "author_name": _xcn_name(author.person),
        **_code_columns("author_profession_code", "author_profession_system", "author_profession_display", specialty),
        "author_organisation_idnst": institution.id if institution else None,
        "author_organisation_name": _cut(institution.name, 256) if institution else None,
    }


def _xds_author_json(author: XdsAuthor) -> dict[str, Any]:
    institution = author.institutions[0] if author.institutions else None
    specialty = _hl7_coded(author.specialties[0]) if author.specialties else None
    return {
        "idnps": author.person.id if author.person else None, "name": _xcn_name(author.person),
        "profession": _code_json(specialty) if specialty else None,
        "organisation": {"idnst": institution.id, "name": institution.name} if institution else None,
        "roles": list(author.roles),
    }


def _pdf_columns(document: ExtractedDocument) -> dict[str, Any]:
    """A bare PDF brings almost nothing: its own title and date, else the file name."""
    info = document.pdf
    return {"title": (info.title if info else None) or document.filename or document.attachment,
            "creation_time": info.creation_date if info else None, "format_code": None}


def _cda_confidentiality(cda: CdaDocument, entry: DocumentEntry | None) -> list[dict[str, Any]]:
    codes = [_code_json(cda.confidentiality)] if cda.confidentiality else []
    if entry is not None:
        codes += [_xds_code_json(code) for code in entry.confidentiality_codes
                  if code.code not in {c["code"] for c in codes}]
    return codes


def _confidentiality_columns(codes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    values = {str(code["code"]).upper() for code in codes}
    levels = [level for level in ("V", "R", "N") if level in values]  # the most restrictive wins
    return {
        "confidentiality": list(codes),
        "confidentiality_code": levels[0] if levels else "N",
        "masked_to_professionals": MASKED_TO_PROFESSIONALS in values,
        "invisible_to_patient": INVISIBLE_TO_PATIENT in values,
        "invisible_to_legal_representatives": any(flag in values for flag in INVISIBLE_TO_LEGAL_REPRESENTATIVES),
    }


# ------------------------------------------------------------------------------------ small helpers


def _declared_id(document: ExtractedDocument) -> str | None:
    if document.cda is not None:
        return document.cda.id.xds_unique_id
    return document.xdm_entry.unique_id if document.xdm_entry is not None else None


def _content_oid(patient_ins: str, content: bytes) -> str:
    """A stable id for a document that has none: the same PDF to the same patient is the same document."""
    name = f"{patient_ins}:{hashlib.sha256(content).hexdigest()}"
    return f"{UUID_OID_ARC}.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _code_columns(code_key: str, system_key: str, display_key: str | None, code: Code | None) -> dict[str, Any]:
    if code is None:
        return {}
    columns = {code_key: _cut(code.code, 128), system_key: _cut(code.code_system, 64)}
    if display_key is not None:
        columns[display_key] = _cut(code.display_name, 256)
    return columns


def _xds_code_columns(code_key: str, system_key: str, display_key: str | None, code: XdsCode | None) -> dict[str, Any]:
    return _code_columns(code_key, system_key, display_key, Code(code.code, code.scheme, code.display_name) if code else None)


def _code_json(code: Code) -> dict[str, Any]:
    return {"code": code.code, "system": code.code_system, "display": code.display_name}


def _xds_code_json(code: XdsCode) -> dict[str, Any]:
    return {"code": code.code, "system": code.scheme, "display": code.display_name}


def _hl7_coded(value: str) -> Code | None:
    """An HL7v2 CE/CWE ``code^display^system`` (authorSpecialty in CI-SIS METADATA)."""
    parts = [part.strip() or None for part in value.split("^")]
    if not parts or parts[0] is None:
        return None
    return Code(parts[0], parts[2] if len(parts) > 2 else None, parts[1] if len(parts) > 1 else None)


def _person_name(name: PersonName | None) -> str | None:
    if name is None:
        return None
    return _cut(" ".join(part for part in (*name.given, name.family or "") if part).strip() or None, 256)


def _xcn_name(person: Any) -> str | None:
    if person is None:
        return None
    return _cut(" ".join(part for part in (person.given, person.family) if part) or None, 256)


def _cut(value: str | None, limit: int) -> str | None:
    return value[:limit] if value else value

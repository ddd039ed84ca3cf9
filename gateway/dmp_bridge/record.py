"""The patient record store: filed documents, their content, and the filing jobs' outcomes.

Reads only; writing is ``filing`` (the worker commits a delivery's documents,
outcomes and notices together). ``describe_document`` is the metadata a CLI,
the webmail or a FHIR DocumentReference (PDSm, mssante.md §3.4) is built from,
without opening the document. Contents are blobs encrypted under the patient's
own data key (owner ``patient:<INS>``), so crypto-shredding that key erases the
record.

Sealed at rest (``RecordSealer``, gateway.security.at_rest field format), so
that a copy of the database reveals no medical content:

- ``record_documents``: the title and the sender's attachment name (free text),
  the display names of the type, class, facility and practice setting codes and
  the event codes with their display names (sender-supplied text, often
  the very subject: "Sérologie VIH"), under the patient record's key
  (``patient:<INS>``): shredding the record shreds them.
- ``filing_jobs.subject`` and ``filing_outcomes.attachment`` (the message's
  subject and attachment names) under the recipient mailbox's key, so that
  shredding that mailbox makes them unreadable.

Kept in clear, on purpose: codes and identifiers (type, class, format, facility,
practice setting, profession, confidentiality: SQL filters, the access matrix and
FHIR searches need them, and they are values of national code lists), the INS
(the record's key), dates, sizes and hashes, professionals' and organisations'
names and identifiers (public entries of the national directory), the
Message-ID and envelope addresses (routing data), and the S/MIME verdict.
Values written before sealing existed are read as they are.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

import json
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.tables import FilingJob, FilingOutcome, JobState, OutcomeKind, RecordDocument
from gateway.errors import NotFound
from gateway.security.at_rest import FieldSealer
from gateway.security.keys import mailbox_owner
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from gateway.storage.models import Patient

# JDV_J08 codes that are visibility flags, not confidentiality levels (code system 1.2.250.1.213.1.1.4.13).
MASKED_TO_PROFESSIONALS = "MASQUE_PS"
INVISIBLE_TO_PATIENT = "INVISIBLE_PATIENT"
INVISIBLE_TO_LEGAL_REPRESENTATIVES = ("INVISIBLE_REPRESENTANTS_LEGAUX", "INVISIBLE_REP_LEGAUX")
CONFIDENTIALITY_LEVELS = ("N", "R", "V")  # HL7 Confidentiality, 2.16.840.1.113883.5.25


SEALED_TEXT_COLUMNS = ("title", "source_attachment", "type_display", "class_display", "facility_type_display",
                       "practice_setting_display")
SEALED_JSON_COLUMNS = ("event_codes",)
JOB_SUBJECT_COLUMN = "filing-subject"
OUTCOME_ATTACHMENT_COLUMN = "filing-attachment"


def patient_owner(ins: str) -> str:
    """The key owner of a patient's record documents."""
    return f"patient:{ins}"


class RecordSealer:
    """Seals the free-text metadata of record rows and of filing jobs (see the module's docstring)."""

    def __init__(self, fields: FieldSealer) -> None:
        self.fields = fields

    async def seal_document_columns(self, ins: str, columns: dict[str, Any]) -> dict[str, Any]:
        """``columns`` with the sealed ones sealed under ``patient:<INS>``."""
        owner = patient_owner(ins)
        sealed = dict(columns)
        for column in SEALED_TEXT_COLUMNS:
            sealed[column] = await self.fields.seal(owner, column, columns.get(column))
        for column in SEALED_JSON_COLUMNS:
            value = json.dumps(columns.get(column) or [], ensure_ascii=False)
            sealed[column] = {"sealed": await self.fields.seal(owner, column, value)}
        return sealed

    async def open_documents(self, documents: Iterable[RecordDocument]) -> None:
        """Unseal detached rows in place (never add them to a session afterwards)."""
        for document in documents:
            owner = patient_owner(document.patient_ins)
            for column in SEALED_TEXT_COLUMNS:
                setattr(document, column, await self.fields.open(owner, column, getattr(document, column)))
            for column in SEALED_JSON_COLUMNS:
                value = getattr(document, column)
                if isinstance(value, dict) and set(value) == {"sealed"}:
                    setattr(document, column, json.loads(await self.fields.open(owner, column, value["sealed"]) or "[]"))

    async def seal_for_mailbox(self, mailbox_id: int, column: str, value: str | None) -> str | None:
        return await self.fields.seal(mailbox_owner(mailbox_id), column, value)

    async def open_for_mailbox(self, mailbox_id: int, column: str, value: str | None) -> str | None:
        return await self.fields.open(mailbox_owner(mailbox_id), column, value)


@dataclass(frozen=True)
class QuarantineEntry:
    """A delivered message (or one of its documents) that did not reach the record, and why."""

    delivery_id: int
    job_state: str
    recipient: str | None
    sender: str | None
    message_id: str | None
    subject: str | None
    attachment: str | None
    document_unique_id: str | None
    code: int | None
    reason: str | None
    at: dt.datetime
    mailbox_id: int = 0  # whose key seals the subject and the attachment name

    @property
    def label(self) -> str | None:
        return IntegrationCode(self.code).label if self.code in set(IntegrationCode) else None

    def describe(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id, "state": self.job_state, "recipient": self.recipient,
            "sender": self.sender, "message_id": self.message_id, "subject": self.subject,
            "attachment": self.attachment, "document_id": self.document_unique_id, "code": self.code,
            "label": self.label, "reason": self.reason, "at": self.at,
        }


class RecordStore:
    """``fields``: the gateway's FieldSealer (whose cache ``gateway serve`` clears after shredding); a
    short-lived one over the blob store's keys otherwise."""

    def __init__(self, db: Database, blobs: BlobStore, fields: FieldSealer | None = None) -> None:
        self.db = db
        self.blobs = blobs
        self.sealer = RecordSealer(fields or FieldSealer(blobs.keys))

    async def get(self, unique_id: str) -> RecordDocument:
        async with self.db.session() as session:
            row = await session.scalar(select(RecordDocument).where(RecordDocument.unique_id == unique_id))
        if row is None:
            raise NotFound(f"no document {unique_id!r} in any record", field="document_id")
        return await self.opened(row)

    async def opened(self, document: RecordDocument) -> RecordDocument:
        """A detached row with its sealed columns opened."""
        await self.sealer.open_documents([document])
        return document

    async def list_for_patient(self, ins: str, *, include_superseded: bool = True) -> list[RecordDocument]:
        """The patient's documents, newest first (all INS OIDs of this matricule)."""
        query = (select(RecordDocument).where(RecordDocument.patient_ins == ins.strip().upper())
                 .order_by(RecordDocument.creation_time.desc(), RecordDocument.id.desc()))
        if not include_superseded:
            query = query.where(RecordDocument.status == "current")
        async with self.db.session() as session:
            if await session.scalar(select(Patient.id).where(Patient.ins == ins.strip().upper()).limit(1)) is None:
                raise NotFound(f"no patient with INS {ins!r}", field="patient")
            documents = list((await session.scalars(query)).all())
        await self.sealer.open_documents(documents)
        return documents

    async def read_content(self, document: RecordDocument) -> bytes:
        """The filed bytes (a CDA or a PDF), decrypted with the patient's key."""
        return await self.blobs.read(patient_owner(document.patient_ins), document.blob_id)

    async def quarantine(self, *, limit: int = 1000) -> list[QuarantineEntry]:
        """Documents refused, and jobs that filed nothing or failed, newest first."""
        async with self.db.session() as session:
            refused = await self._refused_documents(session, limit)
            failed = await self._jobs_without_outcome(session, limit)
        entries = sorted(refused + failed, key=lambda e: e.at, reverse=True)
        return [await self._opened_entry(entry) for entry in entries[:limit]]

    async def _opened_entry(self, entry: QuarantineEntry) -> QuarantineEntry:
        mailbox_id = entry.mailbox_id
        return dataclasses.replace(
            entry, subject=await self.sealer.open_for_mailbox(mailbox_id, JOB_SUBJECT_COLUMN, entry.subject),
            attachment=await self.sealer.open_for_mailbox(mailbox_id, OUTCOME_ATTACHMENT_COLUMN, entry.attachment))

    async def _refused_documents(self, session: AsyncSession, limit: int) -> list[QuarantineEntry]:
        rows = (await session.execute(
            select(FilingJob, FilingOutcome).join(FilingOutcome, FilingOutcome.job_id == FilingJob.id)
            .where(FilingOutcome.outcome == OutcomeKind.REFUSED.value)
            .order_by(FilingOutcome.id.desc()).limit(limit))).all()
        return [_entry(job, outcome.attachment, outcome.document_unique_id, outcome.code, outcome.reason,
                       outcome.created_at) for job, outcome in rows]

    async def _jobs_without_outcome(self, session: AsyncSession, limit: int) -> list[QuarantineEntry]:
        """Failed jobs (retries exhausted): nothing was decided about their documents yet."""
        jobs = (await session.scalars(select(FilingJob).where(FilingJob.state == JobState.FAILED.value)
                                      .order_by(FilingJob.id.desc()).limit(limit))).all()
        return [_entry(job, None, None, job.result_code, job.last_error, job.updated_at) for job in jobs]

    async def job_for_delivery(self, delivery_id: int) -> FilingJob:
        async with self.db.session() as session:
            job = await session.scalar(select(FilingJob).where(FilingJob.delivery_id == delivery_id))
        if job is None:
            raise NotFound(f"no filing job for delivery {delivery_id}", field="delivery_id")
        return job

    async def outcomes_of(self, job_id: int) -> list[FilingOutcome]:
        async with self.db.session() as session:
            mailbox_id = await session.scalar(select(FilingJob.mailbox_id).where(FilingJob.id == job_id))
            outcomes = list((await session.scalars(select(FilingOutcome).where(FilingOutcome.job_id == job_id)
                                                   .order_by(FilingOutcome.id))).all())
        for outcome in outcomes:  # detached: nothing is written back
            if mailbox_id is not None:
                outcome.attachment = await self.sealer.open_for_mailbox(mailbox_id, OUTCOME_ATTACHMENT_COLUMN,
                                                                        outcome.attachment)
        return outcomes


def _entry(job: FilingJob, attachment: str | None, unique_id: str | None, code: int | None, reason: str | None,
           at: dt.datetime) -> QuarantineEntry:
    return QuarantineEntry(job.delivery_id, job.state, job.recipient, job.sender, job.message_id, job.subject,
                           attachment, unique_id, code, reason, at, job.mailbox_id)


def security_labels(document: RecordDocument) -> list[str]:
    """DocumentReference.securityLabel codes (JDV_J08): the level, then the visibility flags."""
    labels = [document.confidentiality_code]
    if document.masked_to_professionals:
        labels.append(MASKED_TO_PROFESSIONALS)
    if document.invisible_to_patient:
        labels.append(INVISIBLE_TO_PATIENT)
    if document.invisible_to_legal_representatives:
        labels.append(INVISIBLE_TO_LEGAL_REPRESENTATIVES[0])
    return labels


def describe_document(document: RecordDocument) -> dict[str, Any]:
    """Every metadata field of a filed document (never its content)."""
    return {
        "id": document.unique_id, "status": document.status,
        "patient": {"ins": document.patient_ins, "oid": document.patient_ins_oid},
        "set_id": document.set_id, "version": document.version_number,
        "replaces": document.replaces_unique_id, "superseded_by": document.superseded_by_unique_id,
        "type": _coding(document.type_code, document.type_code_system, document.type_display),
        "class": _coding(document.class_code, document.class_code_system, document.class_display),
        "format": _coding(document.format_code, document.format_code_system, None),
        "facility_type": _coding(document.facility_type_code, document.facility_type_system, document.facility_type_display),
        "practice_setting": _coding(document.practice_setting_code, document.practice_setting_system,
                                    document.practice_setting_display),
        "event_codes": document.event_codes, "title": document.title, "language": document.language_code,
        "created": document.creation_time, "service_start": document.service_start, "service_stop": document.service_stop,
        "author": {
            "idnps": document.author_idnps, "name": document.author_name,
            "profession": _coding(document.author_profession_code, document.author_profession_system,
                                  document.author_profession_display),
            "organisation": {"idnst": document.author_organisation_idnst, "name": document.author_organisation_name},
        },
        "authors": document.authors,
        "custodian": {"idnst": document.custodian_idnst, "name": document.custodian_name},
        "legal_authenticator": {"idnps": document.legal_authenticator_idnps, "name": document.legal_authenticator_name,
                                "time": document.legal_authenticated_at},
        "confidentiality": document.confidentiality_code, "security_labels": security_labels(document),
        "content": {"mime_type": document.mime_type, "size": document.size, "sha1": document.sha1,
                    "sha256": document.sha256, "body": document.body_kind},
        "source": {"kind": document.source_kind, "attachment": document.source_attachment,
                   "message_id": document.source_message_id, "delivery_key": document.source_delivery_key,
                   "sender": document.source_sender, "submission_set": document.submission_set_unique_id,
                   "door": document.source_door},
        "depositor": {"kind": document.depositor_kind, "id": document.depositor_id,
                      "organisations": document.depositor_organisations or [], "submitted_by": document.submitted_by},
        "signature": document.signature_result, "filed_at": document.filed_at,
    }


def _coding(code: str | None, system: str | None, display: str | None) -> dict[str, str | None] | None:
    return {"code": code, "system": system, "display": display} if code else None

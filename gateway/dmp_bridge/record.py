"""The patient record store: filed documents, their content, and the filing jobs' outcomes.

Reads only; writing is ``filing.file_into_record`` (one transaction per
document). ``describe_document`` is the metadata a CLI, the webmail or a FHIR
DocumentReference (PDSm, mssante.md §3.4) is built from, without opening the
document. Contents are blobs encrypted under the patient's own data key
(owner ``patient:<INS>``), so crypto-shredding that key erases the record.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.tables import FilingJob, FilingOutcome, JobState, OutcomeKind, RecordDocument
from gateway.errors import NotFound
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from gateway.storage.models import Patient

# JDV_J08 codes that are visibility flags, not confidentiality levels (code system 1.2.250.1.213.1.1.4.13).
MASKED_TO_PROFESSIONALS = "MASQUE_PS"
INVISIBLE_TO_PATIENT = "INVISIBLE_PATIENT"
INVISIBLE_TO_LEGAL_REPRESENTATIVES = ("INVISIBLE_REPRESENTANTS_LEGAUX", "INVISIBLE_REP_LEGAUX")
CONFIDENTIALITY_LEVELS = ("N", "R", "V")  # HL7 Confidentiality, 2.16.840.1.113883.5.25


def patient_owner(ins: str) -> str:
    """The key owner of a patient's record documents."""
    return f"patient:{ins}"


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
    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    async def get(self, unique_id: str) -> RecordDocument:
        async with self.db.session() as session:
            row = await session.scalar(select(RecordDocument).where(RecordDocument.unique_id == unique_id))
        if row is None:
            raise NotFound(f"no document {unique_id!r} in any record", field="document_id")
        return row

    async def list_for_patient(self, ins: str, *, include_superseded: bool = True) -> list[RecordDocument]:
        """The patient's documents, newest first (all INS OIDs of this matricule)."""
        query = (select(RecordDocument).where(RecordDocument.patient_ins == ins.strip().upper())
                 .order_by(RecordDocument.creation_time.desc(), RecordDocument.id.desc()))
        if not include_superseded:
            query = query.where(RecordDocument.status == "current")
        async with self.db.session() as session:
            if await session.scalar(select(Patient.id).where(Patient.ins == ins.strip().upper()).limit(1)) is None:
                raise NotFound(f"no patient with INS {ins!r}", field="patient")
            return list((await session.scalars(query)).all())

    async def read_content(self, document: RecordDocument) -> bytes:
        """The filed bytes (a CDA or a PDF), decrypted with the patient's key."""
        return await self.blobs.read(patient_owner(document.patient_ins), document.blob_id)

    async def quarantine(self, *, limit: int = 1000) -> list[QuarantineEntry]:
        """Documents refused, and jobs that filed nothing or failed, newest first."""
        async with self.db.session() as session:
            refused = await self._refused_documents(session, limit)
            failed = await self._jobs_without_outcome(session, limit)
        entries = sorted(refused + failed, key=lambda e: e.at, reverse=True)
        return entries[:limit]

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
            return list((await session.scalars(select(FilingOutcome).where(FilingOutcome.job_id == job_id)
                                               .order_by(FilingOutcome.id))).all())


def _entry(job: FilingJob, attachment: str | None, unique_id: str | None, code: int | None, reason: str | None,
           at: dt.datetime) -> QuarantineEntry:
    return QuarantineEntry(job.delivery_id, job.state, job.recipient, job.sender, job.message_id, job.subject,
                           attachment, unique_id, code, reason, at)


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
                   "sender": document.source_sender, "submission_set": document.submission_set_unique_id},
        "signature": document.signature_result, "filed_at": document.filed_at,
    }


def _coding(code: str | None, system: str | None, display: str | None) -> dict[str, str | None] | None:
    return {"code": code, "system": system, "display": display} if code else None

"""``gateway record``: the patients' records as the DMP bridge filed them.

``quarantine`` lists what did not reach a record (refused documents with their
CI-SIS code 900-906 and reason, and filing jobs that failed); ``list`` and
``show`` give a patient's documents and one document's metadata (never the
content); ``refile`` runs the filing of one delivery again, for instance once
the missing patient has been added to the directory. Acknowledgements that a
refile queues are delivered by the running gateway (its local delivery pass
picks up queued mail). Exit codes: 0 done, 1 no such patient, document or
delivery, 2 usage.

An administrator reading health data is audited like anyone else: ``list``
(RECORD_SEARCHED), ``show`` (DOCUMENT_READ), ``refile`` (ADMIN_MAILBOX_ACCESS:
the delivered message is read again) and ``quarantine`` (RECORD_SEARCHED, no
patient) each write an entry naming the operating-system user (the effective
uid's passwd entry) and what was read; a refusal (no such patient, document
or delivery) is written too, as ACCESS_REFUSED.
"""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy import select

from gateway.audit.chain import Door, Outcome, Source, Subject
from gateway.audit.events import AuditEvent
from gateway.cli.audit import operator_actor
from gateway.cli.common import emit_json, emit_record, emit_rows, json_option, with_services
from gateway.directory.identifiers import well_formed_nir
from gateway.dmp_bridge.record import QuarantineEntry, RecordStore, describe_document, security_labels
from gateway.dmp_bridge.tables import FilingJob, RecordDocument
from gateway.dmp_bridge.worker import build_filing_worker
from gateway.errors import UserError
from gateway.storage.models import Patient

CLI = Source(Door.CLI)
MAX_LISTED_IDS = 100


@click.group()
def record() -> None:
    """Patients' records: quarantine, list, show, refile."""


@record.command()
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@json_option
def quarantine(limit: int, as_json: bool) -> None:
    """Messages and documents that were delivered but not filed, with the code and the reason."""
    entries = with_services(lambda s: _quarantine(s, limit))
    emit_rows([entry.describe() for entry in entries],
              ["delivery_id", "state", "recipient", "sender", "attachment", "code", "reason"], as_json=as_json)


@record.command("list")
@click.option("--patient", "ins", required=True, help="the patient's INS (15 characters)")
@click.option("--current-only", is_flag=True, help="leave out superseded versions")
@json_option
def list_(ins: str, current_only: bool, as_json: bool) -> None:
    """A patient's documents, newest first."""
    documents = with_services(lambda s: _list(s, ins, current_only))
    rows = [describe_document(d) for d in documents] if as_json else [_row(d) for d in documents]
    emit_rows(rows, ["id", "status", "version", "type", "title", "created", "author", "labels"], as_json=as_json)


@record.command()
@click.argument("document_id")
@json_option
def show(document_id: str, as_json: bool) -> None:
    """One document's metadata (a DocumentReference's fields; the content stays encrypted)."""
    document = with_services(lambda s: _show(s, document_id))
    emit_record(describe_document(document), as_json=as_json)


@record.command()
@click.argument("delivery_id", type=int)
@json_option
def refile(delivery_id: int, as_json: bool) -> None:
    """File one delivery again (a failed or not-filed job); prints the job's new state."""
    result = with_services(lambda s: _refile(s, delivery_id))
    if as_json:
        emit_json(result)
        return
    emit_record(result, as_json=False)


async def _quarantine(services: Any, limit: int) -> list[QuarantineEntry]:
    entries = await RecordStore(services.db, services.blobs).quarantine(limit=limit)
    await services.audit.append(AuditEvent.RECORD_SEARCHED, actor=operator_actor(), patient=None, source=CLI,
                                details={"operation": "record quarantine", "shown": len(entries)})
    return entries


async def _list(services: Any, ins: str, current_only: bool) -> list[RecordDocument]:
    try:
        documents = await RecordStore(services.db, services.blobs).list_for_patient(
            ins, include_superseded=not current_only)
    except UserError as error:
        await _refused(services, "record list", error, patient=ins)
        raise
    await services.audit.append(AuditEvent.RECORD_SEARCHED, actor=operator_actor(), patient=well_formed_nir(ins),
                                source=CLI, details={
                                    "operation": "record list", "current_only": current_only, "total": len(documents),
                                    "listed": [d.unique_id for d in documents][:MAX_LISTED_IDS]})
    return documents


async def _show(services: Any, document_id: str) -> RecordDocument:
    try:
        document = await RecordStore(services.db, services.blobs).get(document_id)
    except UserError as error:
        await _refused(services, "record show", error, subject=Subject.document(_printable(document_id, 512) or "-"))
        raise
    await services.audit.append(AuditEvent.DOCUMENT_READ, actor=operator_actor(), patient=document.patient_ins,
                                source=CLI, subject=Subject.document(document.unique_id),
                                details={"operation": "record show", "content": False})
    return document


async def _refile(services: Any, delivery_id: int) -> dict[str, Any]:
    worker = build_filing_worker(services)      # acknowledgements through the one sealed spool and queue
    try:
        job = await worker.refile(delivery_id)
    except UserError as error:
        await _refused(services, "record refile", error, subject=Subject("delivery", str(delivery_id)))
        raise
    outcomes = await RecordStore(services.db, services.blobs).outcomes_of(job.id)
    await services.audit.append(
        AuditEvent.ADMIN_MAILBOX_ACCESS, actor=operator_actor(), patient=await _patient_of(services, job),
        source=CLI, subject=Subject.mailbox(job.recipient) if job.recipient else Subject("delivery", str(delivery_id)),
        details={"action": "refile", "delivery_id": delivery_id, "state": job.state,
                 "documents_filed": job.documents_filed})
    return {
        "delivery_id": job.delivery_id, "state": job.state, "documents_filed": job.documents_filed,
        "code": job.result_code, "error": job.last_error,
        "outcomes": [{"document_id": o.document_unique_id, "attachment": o.attachment, "outcome": o.outcome,
                      "code": o.code, "reason": o.reason} for o in outcomes],
    }


async def _refused(services: Any, operation: str, error: UserError, *, patient: str | None = None,
                   subject: Subject | None = None) -> None:
    await services.audit.append(AuditEvent.ACCESS_REFUSED, actor=operator_actor(), patient=well_formed_nir(patient),
                                source=CLI, subject=subject, outcome=Outcome.refused(_printable(str(error), 500)),
                                details={"operation": operation})


async def _patient_of(services: Any, job: FilingJob) -> str | None:
    if job.patient_id is None:
        return None
    async with services.db.session() as session:
        ins = await session.scalar(select(Patient.ins).where(Patient.id == job.patient_id))
    return well_formed_nir(ins)


def _printable(text: str, limit: int) -> str:
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)[:limit]


def _row(document: RecordDocument) -> dict[str, Any]:
    return {"id": document.unique_id, "status": document.status, "version": document.version_number,
            "type": document.type_code, "title": document.title, "created": document.creation_time,
            "author": document.author_name, "labels": security_labels(document)}

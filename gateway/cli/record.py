"""``gateway record``: the patients' records as the DMP bridge filed them.

``quarantine`` lists what did not reach a record (refused documents with their
CI-SIS code 900-906 and reason, and filing jobs that failed); ``list`` and
``show`` give a patient's documents and one document's metadata (never the
content); ``refile`` runs the filing of one delivery again, for instance once
the missing patient has been added to the directory. Acknowledgements that a
refile queues are delivered by the running gateway (its local delivery pass
picks up queued mail). Exit codes: 0 done, 1 no such patient, document or
delivery, 2 usage.
"""

from __future__ import annotations

from typing import Any

import click

from gateway.cli.common import emit_json, emit_record, emit_rows, json_option, with_services
from gateway.dmp_bridge.record import RecordStore, describe_document, security_labels
from gateway.dmp_bridge.tables import RecordDocument
from gateway.dmp_bridge.worker import build_filing_worker
from gateway.smtp.listeners import spool_root
from gateway.pipeline.spool import Spool


@click.group()
def record() -> None:
    """Patients' records: quarantine, list, show, refile."""


@record.command()
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@json_option
def quarantine(limit: int, as_json: bool) -> None:
    """Messages and documents that were delivered but not filed, with the code and the reason."""
    entries = with_services(lambda s: RecordStore(s.db, s.blobs).quarantine(limit=limit))
    emit_rows([entry.describe() for entry in entries],
              ["delivery_id", "state", "recipient", "sender", "attachment", "code", "reason"], as_json=as_json)


@record.command("list")
@click.option("--patient", "ins", required=True, help="the patient's INS (15 characters)")
@click.option("--current-only", is_flag=True, help="leave out superseded versions")
@json_option
def list_(ins: str, current_only: bool, as_json: bool) -> None:
    """A patient's documents, newest first."""
    documents = with_services(lambda s: RecordStore(s.db, s.blobs).list_for_patient(ins, include_superseded=not current_only))
    rows = [describe_document(d) for d in documents] if as_json else [_row(d) for d in documents]
    emit_rows(rows, ["id", "status", "version", "type", "title", "created", "author", "labels"], as_json=as_json)


@record.command()
@click.argument("document_id")
@json_option
def show(document_id: str, as_json: bool) -> None:
    """One document's metadata (a DocumentReference's fields; the content stays encrypted)."""
    document = with_services(lambda s: RecordStore(s.db, s.blobs).get(document_id))
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


async def _refile(services: Any, delivery_id: int) -> dict[str, Any]:
    spool = Spool(spool_root(services.settings))
    worker = build_filing_worker(services, spool, schedule_local=lambda _queue_id: None)
    job = await worker.refile(delivery_id)
    outcomes = await RecordStore(services.db, services.blobs).outcomes_of(job.id)
    return {
        "delivery_id": job.delivery_id, "state": job.state, "documents_filed": job.documents_filed,
        "code": job.result_code, "error": job.last_error,
        "outcomes": [{"document_id": o.document_unique_id, "attachment": o.attachment, "outcome": o.outcome,
                      "code": o.code, "reason": o.reason} for o in outcomes],
    }


def _row(document: RecordDocument) -> dict[str, Any]:
    return {"id": document.unique_id, "status": document.status, "version": document.version_number,
            "type": document.type_code, "title": document.title, "created": document.creation_time,
            "author": document.author_name, "labels": security_labels(document)}

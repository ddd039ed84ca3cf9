"""The hash-chained access log: every filing, read, hide, block and emergency access.

Public interface (what the DMP bridge, the FHIR API and the webmail call)::

    log = AuditLog.for_data_dir(services.db, settings.data_path)
    await log.append(AuditEvent.DOCUMENT_READ,
                     actor=Actor.professional(idnps, "Dr Marie Curie", "10"),
                     patient=ins, subject=Subject.document(doc_id),
                     source=Source(Door.FHIR, client_ip), details={"type": "11488-4"})
    await log.entries_for_patient(ins, limit=50)   # the patient's history (webmail)
    await log.verify()                             # VerifyReport
    await log.export(Path("audit.jsonl"))          # verify_export(path) re-checks it offline
"""

from gateway.audit.chain import (
    Actor,
    ActorKind,
    AuditEntry,
    AuditKey,
    BreakKind,
    ChainBreak,
    ChainHead,
    Door,
    Outcome,
    OutcomeStatus,
    Source,
    Subject,
    VerifyReport,
    audit_key_path,
)
from gateway.audit.events import AuditEvent
from gateway.audit.export import ExportSummary, verify_export
from gateway.audit.log import AuditChainConflict, AuditLog

__all__ = [
    "Actor", "ActorKind", "AuditChainConflict", "AuditEntry", "AuditEvent", "AuditKey", "AuditLog", "BreakKind", "ChainBreak",
    "ChainHead", "Door", "ExportSummary", "Outcome", "OutcomeStatus", "Source", "Subject", "VerifyReport",
    "audit_key_path", "verify_export",
]

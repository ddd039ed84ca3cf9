"""Tables of the patient record that the DMP bridge files into (revisions 0006, 0009, 0010).

``record_documents`` holds one row per filed document with every field a FHIR
R4 DocumentReference needs in the PDSm / IHE MHD shape (mssante.md §3.4):
masterIdentifier (``unique_id``), status (current | superseded), type (JDV_J07),
category (J06 class code), subject (the patient's INS), custodian, date,
author (IDNPS, name, profession code, organisation IDNST), authenticator,
relatesTo (``replaces_unique_id``), securityLabel (J08: N/R/V and the visibility
flags MASQUE_PS, INVISIBLE_PATIENT, INVISIBLE_REPRESENTANTS_LEGAUX),
content.attachment (MIME type, size, SHA-1 as XDS requires, title, creation),
content.format (J10), context.period, facilityType (J02), practiceSetting
(J04) and event codes. A read API builds a resource from a row without
opening the document. The content is an encrypted blob of owner
``patient:<INS>``, and the free-text metadata is sealed under the same key
(revision 0009; ``record.RecordSealer`` says which columns and why): shredding
that key makes the whole record unreadable.

Filing is tracked as a transaction per delivery (peers.md C5 item 10):
``filing_jobs`` has one row per mail store delivery (message x recipient
mailbox) moving ``received -> examined -> filed | not-filed | failed``;
``filing_outcomes`` says, per document or attachment, what happened and why
(CI-SIS integration code 900-906); ``filing_notices`` makes every
acknowledgement (MDN, failure report) and patient notification idempotent:
one row per notice key, committed with the notice's queue rows.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime, utcnow


class DocumentStatus(str, enum.Enum):
    """DocumentReference.status (FHIR R4 DocumentReferenceStatus, PDSm)."""

    CURRENT = "current"
    SUPERSEDED = "superseded"


class JobState(str, enum.Enum):
    RECEIVED = "received"      # the delivery exists; nobody has looked at the message yet
    EXAMINED = "examined"      # documents extracted, filing in progress (or interrupted: resumed)
    FILED = "filed"            # at least one document is in the record (others may be refused)
    NOT_FILED = "not-filed"    # nothing filed: no document, or every one refused (reasons in outcomes)
    FAILED = "failed"          # transient failures beyond the retry bound: ``gateway record refile``

    @property
    def finished(self) -> bool:
        return self in (JobState.FILED, JobState.NOT_FILED, JobState.FAILED)


OPEN_JOB_STATES = (JobState.RECEIVED.value, JobState.EXAMINED.value)


class OutcomeKind(str, enum.Enum):
    FILED = "filed"            # a new row in record_documents
    DUPLICATE = "duplicate"    # already in the record (same unique id, or same setId + version)
    SKIPPED = "skipped"        # not a report of its own: signature, PDF rendering, PDF without a patient
    REFUSED = "refused"        # not filed, with a CI-SIS code the sender is told about


class NoticeKind(str, enum.Enum):
    MDN_PROCESSED = "mdn-processed"
    MDN_ERROR = "mdn-error"
    FAILURE_REPORT = "failure-report"
    PATIENT_NOTIFICATION = "patient-notification"


class RecordDocument(Base):
    """One document in a patient's record (a DocumentReference and its Binary)."""

    __tablename__ = "record_documents"
    __table_args__ = (
        UniqueConstraint("set_id", "version_number", name="uq_record_documents_set_version"),
        Index("ix_record_documents_patient_status", "patient_id", "status"),
        Index("ix_record_documents_patient_type", "patient_id", "type_code"),
        Index("ix_record_documents_set_id", "set_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    unique_id: Mapped[str] = mapped_column(String(255), unique=True)  # CDA id root^extension = XDS uniqueId
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"))
    patient_ins: Mapped[str] = mapped_column(String(15))
    patient_ins_oid: Mapped[str] = mapped_column(String(32))
    set_id: Mapped[str | None] = mapped_column(String(255))
    version_number: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=DocumentStatus.CURRENT.value)
    replaces_unique_id: Mapped[str | None] = mapped_column(String(255))  # relatesTo.code = replaces
    superseded_by_unique_id: Mapped[str | None] = mapped_column(String(255))
    superseded_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Classification (JDV_J07 type, J06 class, J10 format, J02 facility, J04 practice setting).
    type_code: Mapped[str | None] = mapped_column(String(64))
    type_code_system: Mapped[str | None] = mapped_column(String(64))
    type_display: Mapped[str | None] = mapped_column(Text)  # sealed (patient:<INS>)
    class_code: Mapped[str | None] = mapped_column(String(64))
    class_code_system: Mapped[str | None] = mapped_column(String(64))
    class_display: Mapped[str | None] = mapped_column(Text)  # sealed (patient:<INS>)
    format_code: Mapped[str | None] = mapped_column(String(128))
    format_code_system: Mapped[str | None] = mapped_column(String(64))
    facility_type_code: Mapped[str | None] = mapped_column(String(64))
    facility_type_system: Mapped[str | None] = mapped_column(String(64))
    facility_type_display: Mapped[str | None] = mapped_column(Text)  # sealed (patient:<INS>)
    practice_setting_code: Mapped[str | None] = mapped_column(String(64))
    practice_setting_system: Mapped[str | None] = mapped_column(String(64))
    practice_setting_display: Mapped[str | None] = mapped_column(Text)  # sealed (patient:<INS>)
    event_codes: Mapped[Any] = mapped_column(JSON, default=list)  # {"sealed": ...} at rest, a list once opened
    title: Mapped[str | None] = mapped_column(Text)  # sealed (patient:<INS>)
    language_code: Mapped[str | None] = mapped_column(String(16))
    creation_time: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    service_start: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    service_stop: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The first author (the access matrix reads the profession code); every author is in ``authors``.
    author_idnps: Mapped[str | None] = mapped_column(String(32), index=True)
    author_name: Mapped[str | None] = mapped_column(String(256))
    author_profession_code: Mapped[str | None] = mapped_column(String(64))
    author_profession_system: Mapped[str | None] = mapped_column(String(64))
    author_profession_display: Mapped[str | None] = mapped_column(String(256))
    author_organisation_idnst: Mapped[str | None] = mapped_column(String(32))
    author_organisation_name: Mapped[str | None] = mapped_column(String(256))
    authors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    custodian_idnst: Mapped[str | None] = mapped_column(String(32))
    custodian_name: Mapped[str | None] = mapped_column(String(256))
    legal_authenticator_idnps: Mapped[str | None] = mapped_column(String(32))
    legal_authenticator_name: Mapped[str | None] = mapped_column(String(256))
    legal_authenticated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # securityLabel (JDV_J08): every code as sent, and the confidentiality proper (N, R or V).
    confidentiality_code: Mapped[str] = mapped_column(String(8), default="N")
    confidentiality: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    masked_to_professionals: Mapped[bool] = mapped_column(default=False)          # MASQUE_PS
    invisible_to_patient: Mapped[bool] = mapped_column(default=False)             # INVISIBLE_PATIENT
    invisible_to_legal_representatives: Mapped[bool] = mapped_column(default=False)  # INVISIBLE_REPRESENTANTS_LEGAUX
    # content.attachment: the filed bytes (the CDA, or the PDF), encrypted under ``patient:<INS>``.
    body_kind: Mapped[str] = mapped_column(String(16))  # structuredBody | nonXMLBody | pdf | other
    mime_type: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    sha1: Mapped[str] = mapped_column(String(40))
    sha256: Mapped[str] = mapped_column(String(64))
    blob_id: Mapped[str] = mapped_column(String(32))
    # Where it came from.
    source_kind: Mapped[str] = mapped_column(String(8))  # xdm | cda | pdf
    source_attachment: Mapped[str | None] = mapped_column(Text)  # sealed (patient:<INS>)
    source_message_id: Mapped[str | None] = mapped_column(String(998))
    source_delivery_key: Mapped[str | None] = mapped_column(String(255))
    source_sender: Mapped[str | None] = mapped_column(String(320))  # the envelope sender (MAIL FROM) at acceptance
    source_door: Mapped[str | None] = mapped_column(String(16))     # submission | submissions | relay | webmail
    # Who deposited it (the XDS source, not the claimed author): the owner of the mailbox it came from, as
    # the session that accepted the message established it (dmp_bridge/depositor.py, revision 0010).
    # Replacement and metadata updates are decided against these, never against the author columns.
    depositor_kind: Mapped[str | None] = mapped_column(String(16))  # professional | organisation
    depositor_id: Mapped[str | None] = mapped_column(String(32), index=True)  # IDNPS or IDNST
    depositor_organisations: Mapped[list[str] | None] = mapped_column(JSON)  # IDNST the depositor belonged to
    submitted_by: Mapped[str | None] = mapped_column(String(320))  # the login, when a delegate sent as the owner
    submission_set_unique_id: Mapped[str | None] = mapped_column(String(255))
    signature_result: Mapped[str | None] = mapped_column(Text)  # S/MIME or IHE DSG verification, when done
    filed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class FilingJob(Base):
    """The filing of one delivered message copy (delivery = message x recipient mailbox)."""

    __tablename__ = "filing_jobs"
    __table_args__ = (Index("ix_filing_jobs_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("mail_deliveries.id", ondelete="CASCADE"), unique=True)
    delivery_key: Mapped[str] = mapped_column(String(255))
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.RECEIVED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())  # a worker owns the job until then
    last_error: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(998))
    sender: Mapped[str | None] = mapped_column(String(320))      # Return-Path (the envelope sender)
    recipient: Mapped[str | None] = mapped_column(String(320))   # the mailbox address delivered to
    subject: Mapped[str | None] = mapped_column(Text)  # sealed under the recipient mailbox's key
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id", ondelete="SET NULL"), index=True)
    result_code: Mapped[int | None] = mapped_column(Integer)     # the CI-SIS code told to the sender, if any
    documents_filed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class FilingOutcome(Base):
    """What became of one document or attachment of a job (the quarantine listing reads these)."""

    __tablename__ = "filing_outcomes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("filing_jobs.id", ondelete="CASCADE"), index=True)
    document_unique_id: Mapped[str | None] = mapped_column(String(255))
    attachment: Mapped[str | None] = mapped_column(Text)  # sealed under the recipient mailbox's key
    outcome: Mapped[str] = mapped_column(String(16))
    code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    record_document_id: Mapped[int | None] = mapped_column(ForeignKey("record_documents.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class FilingNotice(Base):
    """A notice sent about a filing: at most one per key (idempotent acknowledgements, peers.md C5 10)."""

    __tablename__ = "filing_notices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    notice_key: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of (kind, message, recipient)
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("filing_jobs.id", ondelete="SET NULL"), index=True)
    recipient: Mapped[str] = mapped_column(String(320))
    queue_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())

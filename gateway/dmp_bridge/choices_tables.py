"""Tables of the patient's choices about their record (revision 0007).

The patient owns the record (mssante.md §2.3): they may hide a document
(visible then only to its author and the médecin traitant), block a
professional (never the médecin traitant), name their médecin traitant, and
oppose emergency access (CSP L.1111-17, §2.4). Documents are named by their
unique id (XDS uniqueId), professionals by IDNPS, so a choice survives a
directory re-import. ``record_document_archives`` holds the PDSm ``isArchived``
extension set through the FHIR API (an author's choice, not the patient's).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, ForeignKey, Integer, String, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from gateway.storage.models import Base, UTCDateTime, utcnow


class HiddenDocument(Base):
    """A document the patient hid from professionals other than its author and the médecin traitant."""

    __tablename__ = "record_hidden_documents"
    __table_args__ = (UniqueConstraint("patient_id", "document_unique_id", name="uq_record_hidden_documents_patient_doc"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    document_unique_id: Mapped[str] = mapped_column(String(255))
    hidden_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class BlockedProfessional(Base):
    """A professional the patient blocked: they see nothing of the record."""

    __tablename__ = "record_blocked_professionals"
    __table_args__ = (UniqueConstraint("patient_id", "professional_idnps", name="uq_record_blocked_professionals_patient_pro"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), index=True)
    professional_idnps: Mapped[str] = mapped_column(String(32))
    blocked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class RecordPreferences(Base):
    """One row per patient who made a choice: médecin traitant and emergency-access opposition."""

    __tablename__ = "record_preferences"

    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True)
    treating_doctor_idnps: Mapped[str | None] = mapped_column(String(32))
    emergency_access_opposed: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now())


class ArchivedDocument(Base):
    """PDSm DocumentReference extension isArchived = true for this document (absent row: false)."""

    __tablename__ = "record_document_archives"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_unique_id: Mapped[str] = mapped_column(String(255), unique=True)
    archived_by_idnps: Mapped[str] = mapped_column(String(32))
    archived_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())

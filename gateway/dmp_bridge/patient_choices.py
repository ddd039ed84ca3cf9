"""The patient's choices about their record, each one audited (mssante.md §2.3, §2.4, §7).

The webmail (and the admin CLI, acting at the patient's request) calls
``PatientChoicesService``: hide or unhide a document, block or unblock a
professional (never the médecin traitant), name the médecin traitant (a
doctor, TRE_G15 code 10, who is not blocked), refuse or allow emergency
access (``set_emergency_access(ins, allowed, actor=, source=)``, read back by
``emergency_access_allowed(ins)``). ``choices(ins)`` gives the ``PatientChoices`` the access policy reads.

``PatientNotifier`` is how the patient hears that their record was read: a
content-free text (§2.1: notifications carry no health data). ``gateway serve``
wires ``notify.AccessNoticeRecorder`` (grouped notices, at once for an emergency
access); ``LoggingNotifier`` is the stand-in when nothing is wired.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit.chain import Actor, Source, Subject
from gateway.audit.events import AuditEvent
from gateway.audit.log import AuditLog
from gateway.dmp_bridge.access import MEDECIN, PatientChoices
from gateway.dmp_bridge.choices_tables import BlockedProfessional, HiddenDocument, RecordPreferences
from gateway.dmp_bridge.tables import RecordDocument
from gateway.errors import Conflict, NotFound
from gateway.storage.db import Database
from gateway.storage.models import Patient, PatientState, Professional

log = logging.getLogger("gateway.dmp.choices")


class PatientNotifier(Protocol):
    """Tells a patient, by a content-free message, that something happened to their record."""

    async def notify_patient(self, ins: str, text: str, *, emergency: bool = False) -> None: ...


class LoggingNotifier:
    """The notifier when no mail delivery is wired: one log line per notification."""

    async def notify_patient(self, ins: str, text: str, *, emergency: bool = False) -> None:
        log.info("patient %s notified%s: %s", ins, " (emergency access)" if emergency else "", text)


class PatientChoicesService:
    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    async def choices(self, ins: str) -> PatientChoices:
        """Everything the patient decided; defaults (nothing hidden or blocked) for an unknown INS."""
        async with self.db.session() as session:
            patient = await _find_patient(session, ins)
            if patient is None:
                return PatientChoices(ins=ins)
            hidden = await session.scalars(select(HiddenDocument.document_unique_id)
                                           .where(HiddenDocument.patient_id == patient.id))
            blocked = await session.scalars(select(BlockedProfessional.professional_idnps)
                                            .where(BlockedProfessional.patient_id == patient.id))
            preferences = await session.get(RecordPreferences, patient.id)
        return PatientChoices(
            ins=patient.ins, hidden_documents=frozenset(hidden.all()), blocked_professionals=frozenset(blocked.all()),
            treating_doctor_idnps=preferences.treating_doctor_idnps if preferences else None,
            emergency_access_opposed=bool(preferences and preferences.emergency_access_opposed),
            space_closed=patient.state == PatientState.CLOSED.value)

    # ------------------------------------------------------------------ documents

    async def hide_document(self, ins: str, unique_id: str, *, actor: Actor, source: Source) -> None:
        async with self.db.session() as session:
            patient = await _patient(session, ins)
            await _document_of(session, patient, unique_id)
            if await _hidden_row(session, patient, unique_id) is None:
                session.add(HiddenDocument(patient_id=patient.id, document_unique_id=unique_id))
            await self._audit(session, AuditEvent.DOCUMENT_HIDDEN, actor, patient, source, Subject.document(unique_id))

    async def unhide_document(self, ins: str, unique_id: str, *, actor: Actor, source: Source) -> None:
        async with self.db.session() as session:
            patient = await _patient(session, ins)
            await session.execute(delete(HiddenDocument).where(HiddenDocument.patient_id == patient.id,
                                                               HiddenDocument.document_unique_id == unique_id))
            await self._audit(session, AuditEvent.DOCUMENT_UNHIDDEN, actor, patient, source, Subject.document(unique_id))

    # ------------------------------------------------------------------ professionals

    async def block_professional(self, ins: str, idnps: str, *, actor: Actor, source: Source) -> None:
        """Block ``idnps``; the médecin traitant cannot be blocked (Conflict)."""
        async with self.db.session() as session:
            patient = await _patient(session, ins)
            await _professional(session, idnps)
            preferences = await session.get(RecordPreferences, patient.id)
            if preferences is not None and preferences.treating_doctor_idnps == idnps:
                raise Conflict("the médecin traitant cannot be blocked; name another médecin traitant first",
                               field="idnps")
            if await _blocked_row(session, patient, idnps) is None:
                session.add(BlockedProfessional(patient_id=patient.id, professional_idnps=idnps))
            await self._audit(session, AuditEvent.PROFESSIONAL_BLOCKED, actor, patient, source, Subject.professional(idnps))

    async def unblock_professional(self, ins: str, idnps: str, *, actor: Actor, source: Source) -> None:
        async with self.db.session() as session:
            patient = await _patient(session, ins)
            await session.execute(delete(BlockedProfessional).where(BlockedProfessional.patient_id == patient.id,
                                                                    BlockedProfessional.professional_idnps == idnps))
            await self._audit(session, AuditEvent.PROFESSIONAL_UNBLOCKED, actor, patient, source,
                              Subject.professional(idnps))

    async def set_treating_doctor(self, ins: str, idnps: str | None) -> None:
        """Name the médecin traitant (a doctor the patient has not blocked), or none.

        The audit log has no event for this choice yet (gateway/audit/events.py): it is logged, and the
        lead adds the event.
        """
        async with self.db.session() as session:
            patient = await _patient(session, ins)
            if idnps is not None:
                await _check_treating_doctor(session, patient, idnps)
            preferences = await _preferences(session, patient)
            preferences.treating_doctor_idnps = idnps
        log.info("patient %s: médecin traitant set to %s", ins, idnps or "nobody")

    # ------------------------------------------------------------------ emergency access

    async def set_emergency_access(self, ins: str, allowed: bool, *, actor: Actor, source: Source) -> None:
        """The patient allows emergency access (the default) or refuses it (CSP L.1111-17); audited either way.

        A refusal makes every emergency access to the record fail with ``emergency-access-opposed``,
        for every profession, the SAMU regulating doctor included (the law lets an express earlier
        opposition stand against them too).
        """
        await self._set_emergency_opposition(ins, not allowed, actor, source)

    async def emergency_access_allowed(self, ins: str) -> bool:
        """False when the patient refused emergency access; True otherwise (an unknown INS included)."""
        return not (await self.choices(ins)).emergency_access_opposed

    async def oppose_emergency_access(self, ins: str, *, actor: Actor, source: Source) -> None:
        await self.set_emergency_access(ins, False, actor=actor, source=source)

    async def allow_emergency_access(self, ins: str, *, actor: Actor, source: Source) -> None:
        await self.set_emergency_access(ins, True, actor=actor, source=source)

    async def _set_emergency_opposition(self, ins: str, opposed: bool, actor: Actor, source: Source) -> None:
        async with self.db.session() as session:
            patient = await _patient(session, ins)
            preferences = await _preferences(session, patient)
            preferences.emergency_access_opposed = opposed
            event = AuditEvent.EMERGENCY_ACCESS_OPPOSED if opposed else AuditEvent.EMERGENCY_ACCESS_OPPOSITION_LIFTED
            await self._audit(session, event, actor, patient, source, None)

    async def _audit(self, session: AsyncSession, event: AuditEvent, actor: Actor, patient: Patient, source: Source,
                     subject: Subject | None) -> None:
        """The choice and its audit entry commit together, or not at all."""
        await session.flush()
        await self.audit.append(event, actor=actor, patient=patient.ins, source=source, subject=subject, session=session)


async def _find_patient(session: AsyncSession, ins: str) -> Patient | None:
    return await session.scalar(select(Patient).where(Patient.ins == ins.strip().upper()).order_by(Patient.id).limit(1))


async def _patient(session: AsyncSession, ins: str) -> Patient:
    patient = await _find_patient(session, ins)
    if patient is None:
        raise NotFound(f"no patient with INS {ins!r}", field="ins")
    return patient


async def _professional(session: AsyncSession, idnps: str) -> Professional:
    professional = await session.scalar(select(Professional).where(Professional.idnps == idnps))
    if professional is None:
        raise NotFound(f"no professional {idnps!r} in the directory", field="idnps")
    return professional


async def _document_of(session: AsyncSession, patient: Patient, unique_id: str) -> RecordDocument:
    document = await session.scalar(select(RecordDocument).where(RecordDocument.unique_id == unique_id,
                                                                 RecordDocument.patient_ins == patient.ins))
    if document is None:
        raise NotFound(f"no document {unique_id!r} in this record", field="document_id")
    return document


async def _hidden_row(session: AsyncSession, patient: Patient, unique_id: str) -> HiddenDocument | None:
    return await session.scalar(select(HiddenDocument).where(HiddenDocument.patient_id == patient.id,
                                                             HiddenDocument.document_unique_id == unique_id))


async def _blocked_row(session: AsyncSession, patient: Patient, idnps: str) -> BlockedProfessional | None:
    return await session.scalar(select(BlockedProfessional).where(BlockedProfessional.patient_id == patient.id,
                                                                  BlockedProfessional.professional_idnps == idnps))


async def _check_treating_doctor(session: AsyncSession, patient: Patient, idnps: str) -> None:
    professional = await _professional(session, idnps)
    if professional.profession_code != MEDECIN:
        raise Conflict(f"{idnps} is not a doctor (profession {professional.profession_code}): only a doctor can be "
                       "médecin traitant", field="idnps")
    if await _blocked_row(session, patient, idnps) is not None:
        raise Conflict(f"{idnps} is blocked by this patient: unblock them first", field="idnps")


async def _preferences(session: AsyncSession, patient: Patient) -> RecordPreferences:
    preferences = await session.get(RecordPreferences, patient.id)
    if preferences is None:
        preferences = RecordPreferences(patient_id=patient.id, emergency_access_opposed=False)
        session.add(preferences)
    return preferences

"""Patient notifications by mail: the FHIR API's reads and emergency accesses, told to the patient.

The notice goes into the patient's own mailbox (Mon espace santé) as
gateway-generated mail, content-free like the filing notice: what happened, never
which document or what it says (mssante.md 2.1, 2.4).
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from gateway.config import Settings
from gateway.dmp_bridge.acknowledgement import patient_notification
from gateway.pipeline.generated import GeneratedMailQueue
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Patient, State

log = logging.getLogger("gateway.dmp_bridge.notify")
ACCESS_SUBJECT = "Votre dossier a été consulté"


class MailboxNotifier:
    """``PatientNotifier`` that writes to the patient's hosted mailbox(es)."""

    def __init__(self, db: Database, settings: Settings, queue: GeneratedMailQueue) -> None:
        self.db = db
        self.queue = queue
        self.hostname = settings.hostname
        self.patient_domain = settings.directory.patient_domain

    async def notify_patient(self, ins: str, text: str) -> None:
        mailboxes = await self._mailboxes(ins)
        if not mailboxes:
            log.info("patient %s has no active mailbox: access notice not sent", ins)
        for mailbox in mailboxes:
            message = patient_notification(mailbox, self.patient_domain, self.hostname, subject=ACCESS_SUBJECT,
                                           text=text.rstrip() + "\n")
            await self.queue.send(self.db, message, mailbox)

    async def _mailboxes(self, ins: str) -> list[str]:
        async with self.db.session() as session:
            rows = await session.scalars(
                select(Mailbox.address).join(Patient, Patient.id == Mailbox.patient_id)
                .where(Patient.ins == ins, Mailbox.type == "PAT", Mailbox.hosted.is_(True),
                       Mailbox.state == State.ACTIVE.value))
            return list(rows.all())

"""Patient notices by mail: the FHIR API's reads and emergency accesses, told to the patient, grouped.

Every professional's read used to send its own mail: five reads, five mails.
Now a read only counts (``AccessNoticeRecorder``, the FHIR service's
``PatientNotifier``) in ``patient_notice_state``, and ``AccessNoticeTask``
(started by ``gateway serve``) sends one notice per patient and period:

- the first read after a quiet period is told at the next pass (a few seconds:
  the task is woken), then at most one notice per ``notices.access_period_hours``
  (24 h by default) or per the patient's chosen frequency, counting the reads in
  between;
- an emergency access (bris de glace) is told at once, whatever the period.

The notice goes to the patient's own mailbox (Mon espace santé), or to the
notification address they chose, as gateway-generated mail. It is content-free
(mssante.md 2.1, 2.4): how many reads and since when, never who, which document
or what it says; it links to the access history in the webmail, which says the
rest behind sign-in. The counters survive a restart; a notice is queued exactly
once (the counters are cleared in the transaction that queues it).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.dmp_bridge.access_history import french_moment
from gateway.dmp_bridge.acknowledgement import patient_notification
from gateway.dmp_bridge.notice_tables import NoticeFrequency, PatientNoticeState, PatientNotificationPreferences
from gateway.ops.periodic import PeriodicTask
from gateway.queue.generated import GeneratedMailQueue, PreparedMail
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Patient, PatientState, State, utcnow

log = logging.getLogger("gateway.dmp_bridge.notify")
ACCESS_SUBJECT = "Votre dossier a été consulté"
EMERGENCY_SUBJECT = "Accès en urgence à votre dossier"
HISTORY_PATH = "/historique"  # the webmail's access history page
WEEK = dt.timedelta(days=7)


class AccessNoticeRecorder:
    """``PatientNotifier`` of ``gateway serve``: counts the read for the next grouped notice, durably."""

    def __init__(self, db: Database, *, wake: Callable[[], None] | None = None) -> None:
        self.db = db
        self.wake = wake

    async def notify_patient(self, ins: str, text: str, *, emergency: bool = False) -> None:
        del text  # the grouped notice writes its own text
        async with self.db.session() as session:
            patient_id = await _patient_id(session, ins)
            if patient_id is None:
                log.info("no patient %s in the directory: access not counted for a notice", ins)
                return
            await session.execute(self._count(patient_id, emergency))
        if self.wake is not None:
            self.wake()

    def _count(self, patient_id: int, emergency: bool) -> Any:
        now = utcnow()
        reads, emergencies = (0, 1) if emergency else (1, 0)
        dialect_insert = sqlite_insert if self.db.is_sqlite else pg_insert
        statement = dialect_insert(PatientNoticeState).values(
            patient_id=patient_id, pending_reads=reads, pending_emergencies=emergencies, pending_since=now,
            last_sent_at=None, generation=1)
        table = PatientNoticeState.__table__.c
        return statement.on_conflict_do_update(index_elements=["patient_id"], set_={
            "pending_reads": table.pending_reads + reads,
            "pending_emergencies": table.pending_emergencies + emergencies,
            "pending_since": func.coalesce(table.pending_since, now),
            "generation": table.generation + 1,
        })


@dataclass(frozen=True)
class DueNotice:
    patient_id: int
    ins: str
    reads: int
    emergencies: int
    since: dt.datetime
    generation: int


class AccessNoticeTask(PeriodicTask):
    """Sends the grouped access notices that are due; woken at each read, and every ``notices.poll_seconds``."""

    name = "patient-access-notices"

    def __init__(self, db: Database, settings: Settings, queue: GeneratedMailQueue) -> None:
        super().__init__(interval_seconds=settings.notices.poll_seconds)
        self.db = db
        self.queue = queue
        self.period = dt.timedelta(hours=settings.notices.access_period_hours)
        self.patient_domain = settings.directory.patient_domain
        self.hostname = settings.hostname
        self.history_url = settings.https_base_url + HISTORY_PATH

    async def run_once(self, *, now: dt.datetime | None = None) -> int:
        """Send every notice due at ``now``; the number sent."""
        moment = now or utcnow()
        sent = 0
        for notice in await self._due(moment):
            sent += await self._send(notice, moment)
        return sent

    async def _due(self, now: dt.datetime) -> list[DueNotice]:
        async with self.db.session() as session:
            rows = (await session.execute(
                select(PatientNoticeState, Patient.ins, PatientNotificationPreferences.frequency)
                .join(Patient, Patient.id == PatientNoticeState.patient_id)
                .outerjoin(PatientNotificationPreferences,
                           PatientNotificationPreferences.patient_id == PatientNoticeState.patient_id)
                .where(or_(PatientNoticeState.pending_reads > 0, PatientNoticeState.pending_emergencies > 0)))).all()
        return [DueNotice(state.patient_id, ins, state.pending_reads, state.pending_emergencies,
                          state.pending_since or now, state.generation)
                for state, ins, frequency in rows if self._is_due(state, frequency, now)]

    def _is_due(self, state: PatientNoticeState, frequency: str | None, now: dt.datetime) -> bool:
        if state.pending_emergencies > 0 or state.last_sent_at is None:
            return True
        return now >= state.last_sent_at + self.period_for(frequency)

    def period_for(self, frequency: str | None) -> dt.timedelta:
        if frequency == NoticeFrequency.EACH.value:
            return dt.timedelta(0)
        if frequency == NoticeFrequency.WEEKLY.value:
            return WEEK
        return self.period

    async def _send(self, notice: DueNotice, now: dt.datetime) -> int:
        recipients = await self._recipients(notice.patient_id)
        prepared = [mail for mail in [await self._prepare(notice, address) for address in recipients] if mail]
        try:
            async with self.db.session() as session:
                claimed = await session.execute(
                    update(PatientNoticeState)
                    .where(PatientNoticeState.patient_id == notice.patient_id,
                           PatientNoticeState.generation == notice.generation)
                    .values(pending_reads=0, pending_emergencies=0, pending_since=None, last_sent_at=now,
                            generation=PatientNoticeState.generation + 1)
                    .execution_options(synchronize_session=False))
                if getattr(claimed, "rowcount", 0) != 1:  # a read arrived meanwhile, or another node sent it
                    raise _Superseded()
                for mail in prepared:
                    mail.add_to(session)
        except _Superseded:
            for mail in prepared:
                self.queue.discard(mail)
            return 0
        except BaseException:
            for mail in prepared:
                self.queue.discard(mail)
            raise
        for mail in prepared:
            self.queue.dispatch(mail)
        if not prepared:
            log.info("patient %s: access notice due but no address can receive it (cleared)", notice.ins)
        return 1 if prepared else 0

    async def _prepare(self, notice: DueNotice, address: str) -> PreparedMail | None:
        emergency = notice.emergencies > 0
        message = patient_notification(address, self.patient_domain, self.hostname,
                                       subject=EMERGENCY_SUBJECT if emergency else ACCESS_SUBJECT,
                                       text=notice_text(notice, self.history_url))
        return await self.queue.prepare(message, address, message_id=None)

    async def _recipients(self, patient_id: int) -> list[str]:
        """The chosen notification address, else the patient's hosted mailbox(es); none once the space is closed."""
        async with self.db.session() as session:
            patient = await session.get(Patient, patient_id)
            if patient is None or patient.state != PatientState.ACTIVE.value:
                return []
            preferences = await session.get(PatientNotificationPreferences, patient_id)
            if preferences is not None and preferences.address:
                return [preferences.address]
            rows = await session.scalars(
                select(Mailbox.address).where(Mailbox.patient_id == patient_id, Mailbox.type == "PAT",
                                              Mailbox.hosted.is_(True), Mailbox.state == State.ACTIVE.value))
            return list(rows.all())


class _Superseded(Exception):
    """The counters changed since they were read: the notice goes out at the next pass."""


def notice_text(notice: DueNotice, history_url: str) -> str:
    """The notice's French text: how many accesses since when, and where to read who and why (no health data)."""
    since = french_moment(notice.since)
    lines = ["Bonjour,", ""]
    if notice.emergencies:
        lines.append("Votre dossier médical a été consulté en urgence (accès « bris de glace ») par un professionnel "
                     "de santé.")
        if notice.reads:
            lines.append(f"Il a aussi été consulté {_times(notice.reads)} depuis le {since}.")
    else:
        lines.append(f"Votre dossier médical a été consulté {_times(notice.reads)} par des professionnels de santé "
                     f"depuis le {since}.")
    lines += ["", "Qui l'a consulté, quand et pourquoi : l'historique des accès de votre espace vous le dit.",
              f"Ouvrez-le ici, après vous être connecté : {history_url}", "",
              "Ce message ne contient aucune information médicale. Vous pouvez choisir la fréquence de ces "
              "messages dans votre espace, rubrique « Mes réglages ».", ""]
    return "\n".join(lines)


def _times(count: int) -> str:
    return "une fois" if count == 1 else f"{count} fois"


async def _patient_id(session: AsyncSession, ins: str) -> int | None:
    return await session.scalar(select(Patient.id).where(Patient.ins == ins.strip().upper()).order_by(Patient.id).limit(1))

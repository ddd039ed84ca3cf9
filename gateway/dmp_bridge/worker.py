"""The filing worker: every delivered message is examined, exactly once in effect, whatever crashes.

Durability comes from the database, not from memory. Each mail store delivery
(``mail_deliveries``: one row per message x recipient mailbox, committed with
the message) gets a ``filing_jobs`` row, created in the delivery's transaction
(``intake.py``) and, as the safety net, by one idempotent ``INSERT ... SELECT``
over the deliveries that have none (a LEFT JOIN): over all of them at the first
pass and every ``full_scan_seconds``, over those above the highest one already
seen at the other passes. A crash between delivery and filing therefore loses
nothing: the next pass finds the delivery without a finished job and files it.

Jobs are claimed with a lease, a chunk at a time (one UPDATE that succeeds for
one worker only, on any number of gateway nodes: one commit for the chunk), and
a chunk is filed as a batch; the next chunk's phase 1 runs while a chunk is in
phase 2 (``run_once``), phase 2 one chunk at a time. Phase 1, per job, side by side, with no database
write: read the delivered copy (its blob found by the batch's load query; for a message
S/MIME-encrypted to a key the gateway holds, the decrypted copy the pipeline
kept: ``SmimeService.decrypted_copy``), extract (a copy delivered to a
patient's mailbox only: nothing else feeds a record), find the depositor in the
queue row its door wrote at acceptance (the authenticated submitter's mailbox,
or the relay peer's sender: ``depositor.py``; never a header; resolved once per
batch for messages accepted alike) and ``plan_filing``. Phase 2 (``_file``): a
read-only transaction forecasts what the batch's transaction will decide
(``forecast_filing``: the record rows the batch's documents can meet read by one
query, ``RecordIndex``; the notices called for); outside any transaction, each
document it files is written ahead (``store_ahead``: its encrypted blob and
sealed metadata, fsynced; their fsyncs overlap), the message fields sealed, the
acknowledgements built and spooled (fsyncs side by side). Then one transaction
for the whole batch (group commit: one fsync of the database), one synchronous
function run in one hop to a database thread (``Database.run_in_transaction``,
SQL Core on SQLite's driver: ``storage/prepared.py``): it checks that the leases
are still this worker's (a job whose lease was lost is left out), decides every
document again on the rows it reads (``apply_filing``), and commits only if it
decided as forecast (else nothing is committed and phase 2 runs again): the
record rows, all their audit entries appended by one claim of the chain head
(``AuditLog.append_many``), the notice and queue rows, the outcome rows, and the
jobs ``filed`` or ``not-filed`` with the examined message's Message-ID, sender,
recipient and subject (sealed under the mailbox's key). If that transaction
fails, each job of the batch is filed again in a transaction of its own, so one bad job delays nobody else's filing.
Everything is decided again inside the transaction, so a job
interrupted anywhere is simply run again. Unexpected errors (database or disk
trouble) are retried with growing delays up to ``max_attempts``, then the job
is ``failed`` and shows in ``gateway record quarantine``; ``gateway record
refile`` runs it again. (``examined`` is no longer written: a job goes from
``received`` to its end in one commit; older rows in that state are resumed.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Protocol, TypeVar, cast

from sqlalchemy import Table, and_, bindparam, delete, func, insert, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.audit.log import AuditLog
from gateway.config import Settings
from gateway.directory.service import DirectoryService
from gateway.dmp_bridge.acknowledgement import Acknowledger, DeliveredMessage, SpooledNotice, WantedNotice
from gateway.dmp_bridge.depositor import Depositor, accepted_as, depositor_of_message
from gateway.dmp_bridge.examine import Examiner, examine_message, parse_headers
from gateway.dmp_bridge.extract import ExtractionResult
from gateway.dmp_bridge.filing import (
    AuditJournal,
    DocumentOutcome,
    FilingContext,
    FilingJournal,
    FilingReport,
    LoggingJournal,
    NotWrittenAhead,
    PatientLookup,
    PreparedFiling,
    RecordIndex,
    ToStore,
    TransactionPatients,
    apply_filing,
    committed,
    forecast_filing,
    plan_filing,
    store_ahead_many,
)
from gateway.dmp_bridge.record import (
    JOB_SUBJECT_COLUMN,
    OUTCOME_ATTACHMENT_COLUMN,
    RecordSealer,
)
from gateway.dmp_bridge.tables import (
    OPEN_JOB_STATES,
    FilingJob,
    FilingOutcome,
    JobState,
)
from gateway.errors import Conflict, NotFound
from gateway.mailstore.notify import ChangeEvent, ChangeHub, ChangeKind
from gateway.mailstore.sql import SqlMailStore
from gateway.mailstore.tables import Delivery, Folder, Message
from gateway.queue.generated import GeneratedMailQueue
from gateway.queue.tables import QueuedMessage
from gateway.security.at_rest import FieldSealer
from gateway.security.keys import mailbox_owner
from gateway.security.smime_policy import InboundResult
from gateway.security.smime_service import DecryptedCopy, SmimeService
from gateway.storage.blobs import BlobNotFound, BlobStore
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, utcnow
from gateway.storage.prepared import Prepared

log = logging.getLogger("gateway.dmp.worker")
T = TypeVar("T")


@dataclass(frozen=True)
class WorkerPolicy:
    accept_production: bool = False  # the directory's accept_production_ins
    max_attempts: int = 5
    retry_delays: tuple[int, ...] = (10, 60, 300, 900)  # seconds after attempt 1, 2, 3, 4...
    lease_seconds: int = 300  # a job whose worker died is taken over after this
    poll_seconds: float = 10.0  # the safety net: deliveries made by other nodes, retries falling due
    batch: int = 256
    concurrency: int = 4  # jobs prepared side by side (their blob fsyncs overlap), within SQLite's pool of 5
    claim_chunk: int = 64  # jobs leased per commit, and filed in one transaction (group commit)
    full_scan_seconds: int = 600  # the safety net's pass over every delivery (others look at new ones only)
    extract_processes: int = 0  # parsing and extraction in processes of their own (``examine.py``); 0: threads

    def retry_delay(self, attempts: int) -> dt.timedelta:
        return dt.timedelta(seconds=self.retry_delays[min(attempts, len(self.retry_delays)) - 1])


class _Gone(Exception):
    """The delivered copy is no longer where it was delivered (moved or expunged before filing)."""


class InboundSecurity(Protocol):
    """What the worker asks of ``SmimeService``: the S/MIME verdict and decrypted copy of a delivery."""

    async def inbound_result(self, queue_id: str, mailbox_id: int) -> InboundResult | None: ...

    async def decrypted_copy(self, delivery_key: str, mailbox_id: int) -> DecryptedCopy | None: ...


@dataclass(frozen=True)
class _Examined:
    """The delivered message as filing sees it."""

    delivered: DeliveredMessage
    signature_result: str | None


class FilingWorker:
    def __init__(self, db: Database, mailstore: SqlMailStore, blobs: BlobStore, *, acknowledger: Acknowledger | None,
                 hub: ChangeHub | None = None, journal: FilingJournal | None = None,
                 policy: WorkerPolicy = WorkerPolicy(), smime: InboundSecurity | None = None,
                 fields: FieldSealer | None = None) -> None:
        self.db = db
        self.mailstore = mailstore
        self.blobs = blobs
        self.acknowledger = acknowledger
        self.hub = hub
        self.journal = journal or LoggingJournal()
        self.policy = policy
        self.smime = smime
        self.sealer = RecordSealer(fields or FieldSealer(blobs.keys))
        self.examiner = Examiner(policy.extract_processes)
        self._warming: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listening = False
        self._scanned_up_to: int | None = None  # every delivery up to this id had a job at the last pass
        self._next_full_scan = utcnow()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Catch up on every delivery not yet filed, then keep filing in the background."""
        if self.hub is not None and not self._listening:
            self.hub.add_forwarder(self._on_change)
            self._listening = True
        # The extraction processes start beside the first pass (its first messages wait for them in their queue).
        self._warming = asyncio.create_task(self.examiner.start(), name="dmp-filing-processes")
        await self.run_once()
        self._task = asyncio.create_task(self._loop(), name="dmp-filing")

    async def stop(self) -> None:
        self._listening = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
            self._warming = None
        await asyncio.to_thread(self.examiner.close)

    def wake(self) -> None:
        self._woken.set()

    def _on_change(self, event: ChangeEvent) -> None:
        # Only a delivery has a filing job to run; an IMAP APPEND (most EXISTS on a busy INBOX) has none.
        if self._listening and event.kind == ChangeKind.EXISTS and event.delivered:
            self.wake()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.policy.poll_seconds)
            self._woken.clear()
            try:
                await self.run_once()
            except Exception:
                log.exception("filing pass failed; the next pass retries")

    # ----------------------------------------------------------------- passes

    async def run_once(self) -> int:
        """Create the missing jobs and run every job that is due; how many jobs ran.

        Chunks are pipelined: a chunk's phase 1 (reading, parsing, extracting: CPU) runs while the chunk
        before it is in phase 2 (its blobs', notices' and transaction's fsyncs: waiting on the disk).
        Phase 2 runs one chunk at a time, in order, and decides everything again on what the chunk before
        it committed; phase 1 only prepares (its patient look-ups are checked again in the transaction)."""
        await self.enqueue_deliveries()
        ran = 0
        filing: asyncio.Task[int] | None = None  # the previous chunk's phase 2
        try:
            while job_ids := await self._due_jobs():
                for chunk in _chunks(job_ids, self.policy.claim_chunk):
                    claimed = await self._claim(chunk)
                    if not claimed:
                        continue
                    planned = await self._plan_batch(claimed)
                    if filing is not None:
                        ran += await filing
                    filing = asyncio.create_task(self._file_batch(claimed, planned), name="dmp-filing-batch")
                if len(job_ids) < self.policy.batch:
                    break
            if filing is not None:
                ran, filing = ran + await filing, None
        except BaseException as error:
            await _settle(filing, cancel=isinstance(error, asyncio.CancelledError))
            raise
        return ran

    async def enqueue_deliveries(self, *, full: bool | None = None) -> int:
        """One ``received`` job per delivery that has none (idempotent, safe on concurrent nodes).

        Local delivery creates the job with the delivery (``intake.py``): this is the safety net. A full
        pass (a LEFT JOIN over every delivery, which grows with the table) runs at the first pass and then
        every ``full_scan_seconds``; the passes in between look only at the deliveries above the highest
        one the previous pass saw (by primary key). On SQLite, whose one writer commits deliveries in id
        order, that misses none; on PostgreSQL a delivery committed late under a lower id is caught by the
        next full pass."""
        now = utcnow()
        if full is None:
            full = self._scanned_up_to is None or now >= self._next_full_scan
        since = None if full else self._scanned_up_to
        missing = (select(Delivery.id, Delivery.delivery_key, Delivery.mailbox_id, literal(JobState.RECEIVED.value),
                          literal(0), literal(0))
                   .outerjoin(FilingJob, FilingJob.delivery_id == Delivery.id).where(FilingJob.id.is_(None)))
        if since is not None:
            missing = missing.where(Delivery.id > since)
        # In delivery id order: two nodes' passes insert the same missing jobs; in one order each waits for
        # the other's rows one after the other, where PostgreSQL saw two orders as a deadlock.
        missing = missing.order_by(Delivery.id)
        insert = pg_insert(FilingJob) if not self.db.is_sqlite else sqlite_insert(FilingJob)
        statement = insert.from_select(["delivery_id", "delivery_key", "mailbox_id", "state", "attempts", "documents_filed"],
                                       missing)
        newest_query = select(func.max(Delivery.id))
        async with self.db.session() as session:
            # SQLite: read under the write lock the insert takes (no delivery commits in between; a read
            # first would make the insert an upgrade that fails if one did). PostgreSQL: read before (a
            # delivery committed after it is above it or, committed late under a lower id, left to a full pass).
            newest = None if self.db.is_sqlite else await session.scalar(newest_query)
            result = await session.execute(statement.on_conflict_do_nothing(index_elements=["delivery_id"]))
            if self.db.is_sqlite:
                newest = await session.scalar(newest_query)
        self._scanned_up_to = max(newest or 0, self._scanned_up_to or 0)
        if full:
            self._next_full_scan = now + dt.timedelta(seconds=self.policy.full_scan_seconds)
        created = max(result.rowcount or 0, 0)  # type: ignore[attr-defined]
        if created:
            log.debug("%d new filing job(s) at %s", created, now.isoformat())
        return created

    async def _due_jobs(self) -> list[int]:
        now = utcnow()
        async with self.db.session() as session:
            return list((await session.scalars(
                select(FilingJob.id).where(FilingJob.state.in_(OPEN_JOB_STATES),
                                           or_(FilingJob.next_attempt_at.is_(None), FilingJob.next_attempt_at <= now),
                                           or_(FilingJob.lease_until.is_(None), FilingJob.lease_until < now))
                .order_by(FilingJob.id).limit(self.policy.batch))).all())

    async def _claim(self, job_ids: Sequence[int]) -> dict[int, dt.datetime]:
        """Lease the free jobs among ``job_ids`` in one commit; the claimed ones, with their lease (which
        is this claim's own value, so a worker can tell later whether the job is still its)."""
        now = utcnow()
        lease = now + dt.timedelta(seconds=self.policy.lease_seconds)
        async with self.db.session() as session:
            await session.execute(
                update(FilingJob).where(FilingJob.id.in_(job_ids), FilingJob.state.in_(OPEN_JOB_STATES),
                                        or_(FilingJob.lease_until.is_(None), FilingJob.lease_until < now))
                .values(lease_until=lease, attempts=FilingJob.attempts + 1, updated_at=now)
                .execution_options(synchronize_session=False))
            claimed = (await session.scalars(select(FilingJob.id).where(FilingJob.id.in_(job_ids),
                                                                        FilingJob.lease_until == lease))).all()
        return {job_id: lease for job_id in sorted(claimed)}

    # ----------------------------------------------------------------- a batch of jobs

    async def _run_batch(self, claimed: dict[int, dt.datetime]) -> int:
        """File the jobs of one claim together: phase 1 then phase 2 (``_plan_batch``, ``_file_batch``)."""
        return await self._file_batch(claimed, await self._plan_batch(claimed))

    async def _plan_batch(self, claimed: dict[int, dt.datetime]) -> list[_Planned]:
        """Phase 1 of one claim: each job read and planned on its own, side by side (no database write but
        the end of a job that stops here: gone, or deferred)."""
        loaded = await self._load_many(list(claimed))
        lookups = _BatchLookups(self.db)
        await lookups.load_queued({_queue_id(job.delivery_key) for job, _delivery, _mailbox, _blob in loaded.values()})
        slots = asyncio.Semaphore(self.policy.concurrency)

        async def plan(job_id: int) -> _Planned | None:
            async with slots:
                return await self._guarded(job_id, self._plan(job_id, claimed[job_id], loaded.get(job_id), lookups))

        return [job for job in await asyncio.gather(*(plan(job_id) for job_id in claimed)) if job is not None]

    async def _file_batch(self, claimed: dict[int, dt.datetime], planned: list[_Planned]) -> int:
        """Phase 2 of one claim: one transaction for all (``_file``: one fsync of the database for the
        batch). If that fails, each job is filed again in a transaction of its own, so one bad job spoils
        nothing. How many jobs the claim held."""
        if len(planned) > 1:
            try:
                await self._file(planned, attempts=2)
                return len(claimed)
            except Exception as error:
                log.info("filing batch of %d jobs rolled back (%s): committing each job on its own",
                         len(planned), error)
        for job in planned:
            await self._file_alone(job)
        return len(claimed)

    async def _guarded(self, job_id: int, step: Awaitable[T]) -> T | None:
        """A step of phase 1 (no database write); None when the job ended there (gone, or deferred)."""
        try:
            return await step
        except _Gone as gone:
            await self._finish(job_id, JobState.NOT_FILED, error=str(gone))
        except Exception as error:
            log.warning("filing job %d failed: %s", job_id, error, exc_info=True)
            await self._defer(job_id, f"{type(error).__name__}: {error}")
        return None

    async def _plan(self, job_id: int, lease: dt.datetime, row: _Loaded | None, lookups: _BatchLookups) -> _Planned:
        """Read the delivered copy, extract, find the depositor and plan each document (``plan_filing``)."""
        if row is None:
            raise _Gone(f"delivery of job {job_id} no longer exists")
        job, delivery, mailbox, blob_id = row
        patient_id = mailbox.patient_id if mailbox.type == "PAT" else None
        examined, extraction = await self._examine(job, delivery, mailbox, blob_id, extract=patient_id is not None)
        delivered = examined.delivered
        queued = await lookups.queued_message(_queue_id(job.delivery_key))
        context = FilingContext(delivery_key=job.delivery_key, message_id=_header(delivered.message, "Message-ID", 998),
                                sender=(queued.sender if queued else None) or None,
                                depositor=await lookups.depositor(queued), mailbox_patient_id=patient_id,
                                accept_production=self.policy.accept_production,
                                signature_result=examined.signature_result)
        prepared = await plan_filing(self.db, extraction, context, self.sealer, patients=lookups.patients)
        return _Planned(job_id, lease, mailbox.id, delivered, prepared)

    async def _file(self, jobs: Sequence[_Planned], *, attempts: int) -> None:
        """Phase 2 of ``jobs``: what their transaction will decide, forecast by one read transaction
        (``_forecast``); the documents it files written ahead and the message fields sealed (side by side:
        blob fsyncs overlap); the notices it sends built and spooled (fsyncs side by side); then the
        transaction itself, one synchronous function in one hop to the database thread (``_commit``). It
        decides everything again and commits only if it decided as forecast (else nothing is committed and
        this runs again, on what changed in between, up to ``attempts`` times)."""
        for attempt in range(1, attempts + 1):
            forecast = await self.db.run_in_transaction(lambda connection: self._forecast(connection, jobs))
            spooled: list[SpooledNotice] = []
            try:
                ready = await self._ready(jobs, forecast)
                spooled = ready.notices
                committed_jobs = await committed(self.db, lambda connection: self._commit(connection, ready))
            except (_Changed, NotWrittenAhead) as changed:
                self._discard(spooled)
                if isinstance(changed, _Changed):
                    for lost in [job for job in jobs if job.job_id not in changed.ours]:
                        log.warning("filing job %d: lease lost to another worker; its result is left to that worker",
                                    lost.job_id)
                        await lost.prepared.release(self.blobs, kept=())
                    jobs = [job for job in jobs if job.job_id in changed.ours]
                log.info("filing of %d job(s) decided otherwise than forecast (attempt %d): again", len(jobs), attempt)
                continue
            except Exception:
                self._discard(spooled)  # nothing committed: the blobs written ahead stay for the next attempt
                raise
            # Cancelled: the database thread still commits or rolls back; the spool files stay either way (files
            # without queue rows are removed by local delivery's recovery pass; removing them could lose notices).
            await self._after_commit(ready, committed_jobs)
            return
        raise RuntimeError(f"the record kept changing while {len(jobs)} job(s) were filed: filed again later")

    async def _after_commit(self, ready: _ReadyBatch, committed_jobs: _Committed) -> None:
        """What follows a committed filing: the blobs its rows reference handed over to the record at once
        (a later failure must never delete them), the notices' delivery woken, the blobs written ahead for
        nothing deleted. The filing is done whatever fails here: a failure is logged, never raised (raising
        had the jobs filed again and their committed documents' files deleted)."""
        kept = {job.job_id: report.blob_ids if (report := committed_jobs.reports.get(job.job_id)) is not None else ()
                for job in ready.jobs}
        for job in ready.jobs:
            job.prepared.settle(kept[job.job_id])
        try:
            if self.acknowledger is not None:
                self.acknowledger.dispatch(committed_jobs.notices)
        except Exception:
            # The notices are committed queue rows: local delivery's recovery pass delivers them.
            log.warning("filing committed; waking the delivery of its notices failed", exc_info=True)
        for job in ready.jobs:
            if job.job_id not in committed_jobs.reports:
                log.warning("filing job %d: lease lost to another worker; its result is left to that worker",
                            job.job_id)
            try:
                await job.prepared.release(self.blobs, kept=kept[job.job_id])
            except Exception:
                log.warning("filing job %d committed; a blob written ahead for nothing was not deleted",
                            job.job_id, exc_info=True)

    async def _file_alone(self, job: _Planned) -> None:
        """Phase 2 of one job in a transaction of its own (a batch of one, or after a batch rolled back)."""
        try:
            await self._file([job], attempts=3)
        except Exception as error:
            await job.prepared.release(self.blobs, kept=())
            log.warning("filing job %d failed: %s", job.job_id, error, exc_info=True)
            await self._defer(job.job_id, f"{type(error).__name__}: {error}")

    def _forecast(self, connection: Connection, jobs: Sequence[_Planned]) -> _Forecast:
        """What the transaction would decide now (a read transaction: nothing written), and the notices."""
        patients = TransactionPatients(connection)
        records = RecordIndex.read(connection, [job.prepared for job in jobs])
        reports: dict[int, FilingReport] = {}
        to_store: list[ToStore] = []
        for job in jobs:
            reports[job.job_id], documents = forecast_filing(connection, job.prepared, patients=patients,
                                                             records=records)
            to_store += documents
        wanted = self._wanted(connection, [(job.delivered, reports[job.job_id]) for job in jobs])
        return _Forecast(reports, to_store, wanted)

    def _wanted(self, connection: Connection,
                filings: Sequence[tuple[DeliveredMessage, FilingReport]]) -> list[WantedNotice]:
        return self.acknowledger.wanted_in(connection, filings) if self.acknowledger is not None else []

    async def _ready(self, jobs: Sequence[_Planned], forecast: _Forecast) -> _ReadyBatch:
        """Everything the transaction needs that is not a row: the documents it files written ahead (blobs
        fsynced, metadata sealed), the message fields sealed, the notices spooled; CPU work, out of it."""
        # ``concurrency`` groups side by side, each one worker-thread hop for its blobs (their fsyncs overlap).
        groups = [forecast.to_store[start::max(self.policy.concurrency, 1)]
                  for start in range(max(self.policy.concurrency, 1))]
        # Every group ends before an error is raised: a blob still being written must be on its item before
        # the job is filed again alone (else it would be written twice and the first copy left behind).
        outcomes = await asyncio.gather(*(store_ahead_many(self.blobs, self.sealer, group) for group in groups if group),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        sealed = [await self._sealed_message_fields(job.mailbox_id, job.delivered, job.prepared) for job in jobs]
        notices = await self.acknowledger.spool(forecast.wanted) if self.acknowledger is not None else []
        return _ReadyBatch([_Ready(job.job_id, job.lease, job.mailbox_id, job.delivered, job.prepared, fields,
                                   _shape(forecast.reports[job.job_id])) for job, fields in zip(jobs, sealed)],
                           forecast.wanted, notices)

    def _commit(self, connection: Connection, ready: _ReadyBatch) -> _Committed:
        """The batch's transaction (synchronous, in one hop to the database thread): the leases checked
        (which also takes SQLite's write lock first), the records decided on rows read once
        (``RecordIndex``), their audit entries appended by one claim of the chain head, the notices queued,
        the outcome rows and the jobs' end. ``_Changed`` (nothing committed) when it decided otherwise than
        the forecast its blobs and notices were prepared for."""
        ours = _check_leases(connection, ready.jobs)
        live = [job for job in ready.jobs if job.job_id in ours]
        patients = TransactionPatients(connection)
        records = RecordIndex.read(connection, [job.prepared for job in live])
        journal = self.journal.for_transaction()
        reports = {job.job_id: apply_filing(connection, job.prepared, journal, patients=patients, records=records)
                   for job in live}
        wanted = self._wanted(connection, [(job.delivered, reports[job.job_id]) for job in live])
        if (any(_shape(reports[job.job_id]) != job.shape for job in live)
                or wanted != [want for want in ready.wanted if want.job_id in ours]):
            raise _Changed(ours)
        journal.write(connection)
        notices = [notice for notice in ready.notices if notice.wanted.job_id in ours]
        if notices:
            Acknowledger.queue_in(connection, notices)
        _record_outcomes(connection, [(job, reports[job.job_id]) for job in live])
        return _Committed(reports, notices)

    def _discard(self, notices: Sequence[SpooledNotice]) -> None:
        if self.acknowledger is not None and notices:
            self.acknowledger.discard(notices)

    async def _load_many(self, job_ids: Sequence[int]) -> dict[int, _Loaded]:
        """Each job with its delivery, mailbox and the delivered copy's blob (None when the copy left its
        folder, or the folder was re-created), by one query (a job whose delivery is gone is missing)."""
        folder_of = and_(Folder.mailbox_id == Delivery.mailbox_id, Folder.name == Delivery.folder_name,
                         Folder.uidvalidity == Delivery.uidvalidity)
        async with self.db.session() as session:
            rows = (await session.execute(
                select(FilingJob, Delivery, Mailbox, Message.blob_id).join(Delivery, Delivery.id == FilingJob.delivery_id)
                .join(Mailbox, Mailbox.id == FilingJob.mailbox_id)
                .outerjoin(Folder, folder_of)
                .outerjoin(Message, and_(Message.folder_id == Folder.id, Message.uid == Delivery.uid))
                .where(FilingJob.id.in_(job_ids)))).all()
        return {row[0].id: (row[0], row[1], row[2], row[3]) for row in rows}

    async def _examine(self, job: FilingJob, delivery: Delivery, mailbox: Mailbox, blob_id: str | None, *,
                       extract: bool) -> tuple[_Examined, ExtractionResult]:
        """The delivered copy read, parsed (once) and, when ``extract``, its documents extracted: the S/MIME
        verdict first (the database), then the CPU work (``examine.py``): in the extraction processes, or in
        the same worker-thread hop as the reading and decryption (``BlobStore.read_then``)."""
        decrypted: DecryptedCopy | None = None
        signature: str | None = None
        if self.smime is not None:
            decrypted = await self.smime.decrypted_copy(job.delivery_key, mailbox.id)
            if decrypted is not None:
                signature = _signature_result(decrypted.status, decrypted.summary, decrypted.signer)
            else:
                result = await self.smime.inbound_result(_queue_id(job.delivery_key), mailbox.id)
                signature = _signature_result(result.status, result.summary, result.signer) if result is not None else None
        decrypted_content = decrypted.content if decrypted is not None else None
        if self.examiner.processes:  # read, decrypt, the headers parsed here; the extraction in a process
            raw, message = await self._read_delivered(delivery, blob_id, lambda raw: (raw, parse_headers(raw)))
            extraction = await self.examiner.extract(raw, decrypted_content, extract)
        else:  # one worker-thread hop: read, decrypt, parse, extract
            raw, (message, extraction) = await self._read_delivered(
                delivery, blob_id, lambda raw: (raw, examine_message(raw, decrypted_content, extract)))
        delivered = DeliveredMessage(job.id, job.delivery_key, mailbox.address, message, raw)
        return _Examined(delivered, signature), extraction

    async def _read_delivered(self, delivery: Delivery, blob_id: str | None,
                              work: Callable[[bytes], T]) -> T:
        gone = f"the delivered message left {delivery.folder_name} (UID {delivery.uid}) before filing"
        if blob_id is None:
            raise _Gone(gone)
        try:
            return await self.blobs.read_then(mailbox_owner(delivery.mailbox_id), blob_id, work)
        except (BlobNotFound, FileNotFoundError):
            # Expunged between the query and the read (its blob is deleted after the expunge commits).
            raise _Gone(gone) from None

    async def _sealed_message_fields(self, mailbox_id: int, delivered: DeliveredMessage,
                                     prepared: PreparedFiling) -> dict[str | None, str | None]:
        """The subject and the attachment names, sealed under the mailbox's key before the transaction
        (a key created on first use takes a transaction of its own). Key None is the subject."""
        names = {o.attachment for o in prepared.failures} | {p.document.attachment for p in prepared.pending}
        sealed: dict[str | None, str | None] = {
            name: await self.sealer.seal_for_mailbox(mailbox_id, OUTCOME_ATTACHMENT_COLUMN, name[:512])
            for name in names if name}
        sealed[None] = await self.sealer.seal_for_mailbox(mailbox_id, JOB_SUBJECT_COLUMN, delivered.subject or None)
        return sealed

    async def _finish(self, job_id: int, state: JobState, *, error: str) -> None:
        async with self.db.session() as session:
            await self._set_finished(session, job_id, state, last_error=error[:2000])

    @staticmethod
    async def _set_finished(session: AsyncSession, job_id: int, state: JobState, **values: object) -> None:
        now = utcnow()
        await session.execute(update(FilingJob).where(FilingJob.id == job_id).values(
            state=state.value, lease_until=None, next_attempt_at=None, finished_at=now, updated_at=now, **values)
            .execution_options(synchronize_session=False))

    async def _defer(self, job_id: int, error: str) -> None:
        async with self.db.session() as session:
            job = await session.get(FilingJob, job_id)
            if job is None:
                return
            if job.attempts >= self.policy.max_attempts:
                await self._set_finished(session, job_id, JobState.FAILED, last_error=error[:2000])
                log.error("filing job %d failed after %d attempts: %s", job_id, job.attempts, error)
                return
            job.last_error, job.lease_until = error[:2000], None
            job.next_attempt_at = utcnow() + self.policy.retry_delay(job.attempts)

    # ----------------------------------------------------------------- administration

    async def refile(self, delivery_id: int) -> FilingJob:
        """Run a finished job again (after a failure, or once the patient exists); returns the job after it."""
        async with self.db.session() as session:
            job = await session.scalar(select(FilingJob).where(FilingJob.delivery_id == delivery_id))
            if job is None:
                raise NotFound(f"no filing job for delivery {delivery_id}", field="delivery_id")
            if job.state in OPEN_JOB_STATES and job.lease_until is not None and job.lease_until > utcnow():
                raise Conflict(f"delivery {delivery_id} is being filed right now", field="delivery_id")
            job.state, job.attempts, job.next_attempt_at, job.lease_until = JobState.RECEIVED.value, 0, None, None
            job.finished_at, job.last_error = None, None
            job_id = job.id
        claimed = await self._claim([job_id])
        if claimed:
            await self._run_batch(claimed)
        async with self.db.session() as session:
            refreshed = await session.get(FilingJob, job_id)
        assert refreshed is not None
        return refreshed


_Loaded = tuple[FilingJob, Delivery, Mailbox, str | None]


@dataclass(frozen=True)
class _Planned:
    """A job after reading and planning: its documents decided or with their record fields, nothing written."""

    job_id: int
    lease: dt.datetime
    mailbox_id: int
    delivered: DeliveredMessage
    prepared: PreparedFiling


@dataclass(frozen=True)
class _Ready:
    """A job ready for its transaction: planned, its documents written ahead, its message fields sealed."""

    job_id: int
    lease: dt.datetime
    mailbox_id: int
    delivered: DeliveredMessage
    prepared: PreparedFiling
    sealed: dict[str | None, str | None]
    shape: tuple[tuple[object, ...], ...]  # the forecast's outcomes: what the notices were written for


@dataclass(frozen=True)
class _Forecast:
    reports: dict[int, FilingReport]
    to_store: list[ToStore]
    wanted: list[WantedNotice]


@dataclass(frozen=True)
class _ReadyBatch:
    jobs: list[_Ready]
    wanted: list[WantedNotice]
    notices: list[SpooledNotice]


@dataclass(frozen=True)
class _Committed:
    reports: dict[int, FilingReport]  # by job id, for the jobs still this worker's
    notices: list[SpooledNotice]


class _Changed(Exception):
    """The transaction decided otherwise than its forecast (a concurrent filer, a patient changed, a lease
    lost): rolled back; ``ours`` are the jobs still this worker's."""

    def __init__(self, ours: set[int]) -> None:
        super().__init__("decided otherwise than forecast")
        self.ours = ours


def _shape(report: FilingReport) -> tuple[tuple[object, ...], ...]:
    """What a report says (and its notices tell), without the row and blob ids only the commit knows."""
    return tuple((o.attachment, o.unique_id, o.outcome, o.code, o.reason, o.patient_id, o.patient_ins)
                 for o in report.outcomes)


class _BatchLookups:
    """What the jobs of one batch read alike, read once for the batch: queue rows, depositors, patients.

    A depositor depends only on what the door recorded at acceptance (``depositor.accepted_as``): two
    messages accepted alike have the same one. Everything read here only decides phase 1; the batch's
    transaction checks the patient again, and the depositor is the door's, fixed at acceptance."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.patients = PatientLookup(db=db)
        self._depositors: dict[tuple[str | None, str, str | None], Depositor | None] = {}
        self._queued: dict[str, QueuedMessage | None] = {}
        self._resolving = asyncio.Lock()

    async def load_queued(self, queue_ids: set[str]) -> None:
        """The queue rows of the batch's messages, by one query."""
        async with self.db.session() as session:
            rows = (await session.scalars(select(QueuedMessage).where(QueuedMessage.id.in_(queue_ids)))).all()
        self._queued.update({row.id: row for row in rows})

    async def queued_message(self, queue_id: str) -> QueuedMessage | None:
        if queue_id not in self._queued:
            async with self.db.session() as session:
                self._queued[queue_id] = await session.get(QueuedMessage, queue_id)
        return self._queued[queue_id]

    async def depositor(self, message: QueuedMessage | None) -> Depositor | None:
        key = accepted_as(message)
        if key is None:
            return None
        async with self._resolving:  # jobs prepared side by side wait for the first resolution of a sender
            if key not in self._depositors:
                async with self.db.session() as session:
                    self._depositors[key] = await depositor_of_message(session, message)
            return self._depositors[key]


def _outcome_row(job_id: int, outcome: DocumentOutcome, sealed: dict[str | None, str | None]) -> dict[str, object]:
    return {"job_id": job_id, "document_unique_id": outcome.unique_id,
            "attachment": sealed.get(outcome.attachment) if outcome.attachment else None,
            "outcome": outcome.outcome.value, "code": int(outcome.code) if outcome.code else None,
            "reason": outcome.reason, "record_document_id": outcome.record_document_id, "created_at": utcnow()}


JOBS = cast(Table, FilingJob.__table__)
OUTCOMES = cast(Table, FilingOutcome.__table__)
_DELETE_OUTCOMES = Prepared(delete(OUTCOMES).where(OUTCOMES.c.job_id == bindparam("job")))
_INSERT_OUTCOMES = Prepared(insert(OUTCOMES))
_FINISH_JOB = Prepared(update(JOBS).where(JOBS.c.id == bindparam("job")).values(
    state=bindparam("to_state"), result_code=bindparam("to_result_code"),
    documents_filed=bindparam("to_documents_filed"), patient_id=bindparam("to_patient_id"),
    message_id=bindparam("to_message_id"), sender=bindparam("to_sender"), recipient=bindparam("to_recipient"),
    subject=bindparam("to_subject"), lease_until=None, next_attempt_at=None, finished_at=bindparam("now"),
    updated_at=bindparam("now")))


def _check_leases(connection: Connection, ready: Sequence[_Ready]) -> set[int]:
    """The jobs of ``ready`` still leased by this worker (each with the lease of its claim), touched."""
    ours: set[int] = set()
    for lease in {job.lease for job in ready}:
        ids = [job.job_id for job in ready if job.lease == lease]
        ours.update(connection.execute(
            update(JOBS).where(JOBS.c.id.in_(ids), JOBS.c.lease_until == lease, JOBS.c.state.in_(OPEN_JOB_STATES))
            .values(updated_at=utcnow()).returning(JOBS.c.id)).scalars())
    return ours


def _record_outcomes(connection: Connection, filed: Sequence[tuple[_Ready, FilingReport]]) -> None:
    """The jobs' outcome rows (replacing an interrupted run's) and their end, by three executemany."""
    if not filed:
        return
    _DELETE_OUTCOMES.run_many(connection, [{"job": job.job_id} for job, _report in filed])
    _INSERT_OUTCOMES.run_many(connection, [_outcome_row(job.job_id, outcome, job.sealed)
                                           for job, report in filed for outcome in report.outcomes])
    now = utcnow()
    _FINISH_JOB.run_many(connection, [
        {"job": job.job_id, "now": now,
         **{f"to_{key}": value for key, value in _finished_values(report, job.delivered, job.sealed).items()}}
        for job, report in filed])


def _finished_values(report: FilingReport, delivered: DeliveredMessage,
                     sealed: dict[str | None, str | None]) -> dict[str, object]:
    """A finished job's columns: its state, first refusal, documents, patient and the examined message."""
    refusal = report.first_refusal
    patients = sorted(report.patient_ids)
    return {"state": (JobState.FILED if report.in_record else JobState.NOT_FILED).value,
            "result_code": int(refusal.code) if refusal and refusal.code else None,
            "documents_filed": len(report.filed), "patient_id": patients[0] if patients else None,
            "message_id": _header(delivered.message, "Message-ID", 998),
            "sender": (delivered.return_path or "")[:320] or None,
            "recipient": delivered.recipient[:320], "subject": sealed[None]}


class FilingServices(Protocol):
    """What the worker needs from ``gateway.app.Services``."""

    settings: Settings
    db: Database
    directory: DirectoryService
    blobs: BlobStore
    hub: ChangeHub
    mailstore: SqlMailStore
    fields: FieldSealer
    smime: SmimeService
    generated: GeneratedMailQueue


def build_filing_worker(services: FilingServices) -> FilingWorker:
    """The worker as ``gateway serve`` runs it: acknowledgements through the one generated-mail queue
    (``services.generated``: local delivery or the outbound worker takes them), events in the audit log."""
    settings = services.settings
    journal = AuditJournal(AuditLog.for_data_dir(services.db, settings.data_path))
    policy = WorkerPolicy(accept_production=settings.directory.accept_production_ins,
                          extract_processes=settings.filing.extract_processes)
    return FilingWorker(services.db, services.mailstore, services.blobs, hub=services.hub, journal=journal,
                        acknowledger=Acknowledger(services.db, services.generated, settings), policy=policy,
                        smime=services.smime, fields=services.fields)


def _queue_id(delivery_key: str) -> str:
    """The queue id a delivery key starts with (``<queue id>:<recipient row>``)."""
    return delivery_key.split(":", 1)[0]


async def _settle(task: asyncio.Task[int] | None, *, cancel: bool) -> None:
    """Wait for a chunk's phase 2 left running when the pass stops (cancelled with it when ``cancel``):
    its jobs end as any interrupted job does (run again once their lease expires)."""
    if task is None:
        return
    if cancel:
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("filing batch failed while its pass stopped; its jobs are run again")


def _chunks(items: Sequence[int], size: int) -> list[Sequence[int]]:
    return [items[start:start + size] for start in range(0, len(items), max(size, 1))]


def _signature_result(status: str, summary: str, signer: str | None) -> str | None:
    """The record's signature column: the RFC 7281 ``smime=...`` summary and the signer, for a signed message."""
    if signer is None and status in ("none", "neutral"):
        return None  # encrypted without a signature, or nothing S/MIME about it
    return f"{summary}; signer={signer}" if signer else summary


def _header(message: EmailMessage, name: str, limit: int) -> str | None:
    value = " ".join(str(message.get(name, "") or "").split())
    return value[:limit] or None

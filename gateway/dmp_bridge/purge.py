"""Finished filing jobs are purged: the DMP bridge's companion of the queue's purge (gateway.queue.purge).

Each local delivery leaves a delivery row (the mail store's idempotency key) and a filing job with its
outcomes and notice keys. Once a job is ``filed`` or ``not-filed`` and ``retention.filing_jobs_kept_hours``
have passed, its rows go, the delivery row with them: the safety net that creates a job for every delivery
without one (``FilingWorker.enqueue_deliveries``) must not file the message a second time. A job still
running (``received``, ``examined``) or ``failed`` (waiting for ``gateway record refile``) is never purged.
What was filed (``record_documents``) is the record itself, and the audit log is append-only: neither is
touched.

The queue asks ``needed`` before it deletes a message: while one of its deliveries still has a job (or none
yet), the message stays, because filing and refiling read who deposited it from the queued message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from functools import partial
from typing import Any

from sqlalchemy import Select, Table, delete, func, or_, select
from sqlalchemy.engine import Connection

from gateway.dmp_bridge.tables import FilingJob, FilingNotice, FilingOutcome, JobState
from gateway.mailstore.tables import Delivery
from gateway.queue.purge import PurgeCount
from gateway.storage.db import Database

PURGEABLE_STATES = (JobState.FILED.value, JobState.NOT_FILED.value)
_JOBS: Table = FilingJob.__table__              # type: ignore[assignment]
_OUTCOMES: Table = FilingOutcome.__table__      # type: ignore[assignment]
_NOTICES: Table = FilingNotice.__table__        # type: ignore[assignment]
_DELIVERIES: Table = Delivery.__table__         # type: ignore[assignment]
_KEYS_PER_QUERY = 500


class FilingPurge:
    """``PurgeCompanion`` of the queue: finished filing jobs past their window, with their delivery rows."""

    name = "filing jobs"

    def __init__(self, db: Database, *, kept_hours: float) -> None:
        self.db = db
        self.kept = dt.timedelta(hours=kept_hours)

    async def purge(self, now: dt.datetime, *, dry_run: bool, batch_size: int) -> PurgeCount:
        count = PurgeCount()
        cutoff = now - self.kept
        after = 0
        while True:
            scanned, last_id, batch = await self.db.run_in_transaction(
                partial(self._batch, cutoff=cutoff, after=after, limit=batch_size, dry_run=dry_run), write=not dry_run)
            count.merge(batch)
            if scanned < batch_size:
                return count
            after = last_id
            await asyncio.sleep(0)        # each batch its own short transaction

    def _batch(self, connection: Connection, *, cutoff: dt.datetime, after: int, limit: int,
               dry_run: bool) -> tuple[int, int, PurgeCount]:
        count = PurgeCount()
        query = select(_JOBS.c.id, _JOBS.c.delivery_id).where(_purgeable(cutoff), _JOBS.c.id > after)
        if not dry_run:
            # PostgreSQL: the jobs locked until the deletes commit (a refile waits); SQLite's BEGIN IMMEDIATE
            # already keeps every other writer out.
            query = query.with_for_update()
        rows = connection.execute(query.order_by(_JOBS.c.id).limit(limit)).all()
        if not rows:
            return 0, after, count
        jobs = [job_id for job_id, _delivery in rows]
        deliveries = [delivery_id for _job, delivery_id in rows]
        if dry_run:
            count.add("filing_notices", _count(connection, select(_NOTICES.c.id).where(_NOTICES.c.job_id.in_(jobs))))
            count.add("filing_outcomes", _count(connection, select(_OUTCOMES.c.id).where(_OUTCOMES.c.job_id.in_(jobs))))
            count.add("filing_jobs", len(jobs))
            count.add("mail_deliveries", len(deliveries))
            return len(rows), jobs[-1], count
        count.add("filing_notices", connection.execute(delete(_NOTICES).where(_NOTICES.c.job_id.in_(jobs))).rowcount)
        count.add("filing_outcomes", connection.execute(delete(_OUTCOMES).where(_OUTCOMES.c.job_id.in_(jobs))).rowcount)
        count.add("filing_jobs", connection.execute(delete(_JOBS).where(_JOBS.c.id.in_(jobs))).rowcount)
        # The delivery goes with its job: without it, the safety net would make a new job and file it again.
        count.add("mail_deliveries", connection.execute(delete(_DELIVERIES).where(
            _DELIVERIES.c.id.in_(deliveries))).rowcount)
        return len(rows), jobs[-1], count

    def needed(self, connection: Connection, keys: dict[str, str], now: dt.datetime) -> set[str]:
        """Queue ids with a delivery whose job is missing, running, failed or within its window."""
        cutoff = now - self.kept
        listed = list(keys)
        found: set[str] = set()
        for start in range(0, len(listed), _KEYS_PER_QUERY):
            chunk = listed[start:start + _KEYS_PER_QUERY]
            query = (select(_DELIVERIES.c.delivery_key)
                     .outerjoin(_JOBS, _JOBS.c.delivery_id == _DELIVERIES.c.id)
                     .where(_DELIVERIES.c.delivery_key.in_(chunk),
                            or_(_JOBS.c.id.is_(None), _JOBS.c.state.not_in(PURGEABLE_STATES),
                                _JOBS.c.finished_at.is_(None), _JOBS.c.finished_at >= cutoff)))
            found.update(keys[key] for (key,) in connection.execute(query))
        return found


def _purgeable(cutoff: dt.datetime) -> Any:
    return (_JOBS.c.state.in_(PURGEABLE_STATES)) & _JOBS.c.finished_at.is_not(None) & (_JOBS.c.finished_at < cutoff)


def _count(connection: Connection, query: Select[Any]) -> int:
    return int(connection.execute(select(func.count()).select_from(query.subquery())).scalar() or 0)

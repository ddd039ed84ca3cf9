"""The mail queue as one service: what happens to a message after the 250, and the administrator's verbs.

``MailQueue`` holds the sealed spool, the queue's rows, local delivery into the
mail store, the one generated-mail queue (DSNs, MDNs, notices) and, once
``gateway serve`` starts it, the outbound worker. ``gateway.app.open_services``
builds it once; the pipeline hands accepted messages to it, the DMP bridge and
the FHIR notices write through its generated-mail queue, and ``gateway queue``
only calls its methods (mox's queue package: ``list``, ``show``, ``retry``,
``hold``, ``release``, ``delete``, ``purge``).
"""

from __future__ import annotations

import datetime as dt
import ssl
from typing import Any

from gateway.config import Settings
from gateway.directory.generation import AnswerCache
from gateway.directory.service import DirectoryService
from gateway.errors import Conflict, NotFound
from gateway.queue.dsn import Action, RecipientReport
from gateway.queue.generated import GeneratedMailQueue
from gateway.queue.local_delivery import LocalDeliveryWorker, LocalStore, RecoveryReport
from gateway.queue.mx import MxResolver
from gateway.queue.outbound import DsnReports, OutboundWorker
from gateway.queue.outbound_store import MessageWork, OutboundStore
from gateway.queue.purge import PURGE_LOCK, PurgeCompanion, PurgeFollower, PurgeReport, QueuePurge
from gateway.queue.spool import Spool
from gateway.queue.store import QueueStore
from gateway.security.dkim import DkimSigner
from gateway.storage.advisory import run_alone
from gateway.storage.db import Database
from gateway.storage.models import utcnow


class MailQueue:
    """The durable queue and its workers; ``start_*``/``stop`` from ``gateway serve``, the verbs from the CLI."""

    def __init__(self, settings: Settings, db: Database, directory: DirectoryService, spool: Spool,
                 store: LocalStore | None) -> None:
        self.settings = settings
        self.spool = spool
        self.rows = QueueStore(db)
        self.outbound_rows = OutboundStore(db)
        smtp = settings.smtp
        self.local = LocalDeliveryWorker(self.rows, spool, store, authserv_id=settings.hostname,
                                         workers=smtp.delivery_workers, retry_seconds=smtp.local_retry_seconds,
                                         lifetime_hours=smtp.local_queue_lifetime_hours, directory=directory,
                                         backlog_limit=smtp.local_backlog_limit,
                                         backlog_wait_seconds=smtp.local_backlog_wait_seconds,
                                         answers=AnswerCache(db),
                                         claim_lease_seconds=settings.cluster.claim_lease_seconds)
        # The one generated-mail queue: local recipients to local delivery, others wake the outbound worker.
        self.generated = GeneratedMailQueue(settings, directory, spool, schedule_local=self.local.schedule,
                                            wake_remote=self.wake_remote)
        self.reports = DsnReports(settings, self.generated, spool)
        self.local.reports = self.reports          # RFC 3464 failure DSNs of local delivery
        self.outbound: OutboundWorker | None = None
        self.purger = QueuePurge(db, spool, batch_size=settings.retention.purge_batch_size)

    # ----------------------------------------------------------------- workers (gateway serve)

    async def start_local(self) -> RecoveryReport:
        """The recovery pass (every acknowledged message not yet delivered is scheduled again), then delivery."""
        return await self.local.start()

    async def start_outbound(self, tls_context: ssl.SSLContext, *, resolver: MxResolver | None = None,
                             signer: DkimSigner | None = None) -> OutboundWorker:
        """Build and start the outbound worker (mutual TLS with ``tls_context``); queued remote mail wakes it."""
        if self.outbound is None:
            self.outbound = OutboundWorker(self.rows.db, self.settings, self.generated, tls_context=tls_context,
                                           resolver=resolver, signer=signer)
        await self.outbound.start()
        return self.outbound

    def wake_remote(self) -> None:
        """A message with remote recipients was queued: the outbound worker looks now (when it runs here)."""
        if self.outbound is not None:
            self.outbound.wake()

    async def stop(self) -> None:
        if self.outbound is not None:
            await self.outbound.stop()
        await self.local.stop()

    # ----------------------------------------------------------------- the administrator (gateway queue)

    async def list(self, *, state: str | None = None) -> list[dict[str, Any]]:
        """Queued messages, and those finished within ``outbound.finished_listed_hours``; ``state`` filters."""
        within = dt.timedelta(hours=self.settings.outbound.finished_listed_hours)
        return await self.outbound_rows.list_messages(state=state, finished_within=within)

    async def show(self, queue_id: str) -> dict[str, Any]:
        """One message: every recipient with every delivery attempt."""
        record = await self.outbound_rows.show(queue_id)
        if record is None:
            raise NotFound(f"no message {queue_id} in the queue", field="queue_id")
        return record

    async def retry(self, queue_id: str | None = None) -> int:
        """Open recipients of ``queue_id`` (None: of every message) due now; how many."""
        if queue_id is not None and await self.outbound_rows.message(queue_id) is None:
            raise NotFound(f"no message {queue_id} in the queue", field="queue_id")
        count = await self.outbound_rows.retry([queue_id] if queue_id else None)
        self.wake_remote()
        return count

    async def hold(self, queue_id: str) -> None:
        """The outbound worker skips the message until it is released."""
        await self._set_held(queue_id, True)

    async def release(self, queue_id: str) -> None:
        """Delivery resumes; the open recipients are due at once."""
        await self._set_held(queue_id, False)
        self.wake_remote()

    async def _set_held(self, queue_id: str, held: bool) -> None:
        if not await self.outbound_rows.set_held(queue_id, held):
            raise NotFound(f"no queued message {queue_id}", field="queue_id")

    async def delete(self, queue_id: str, *, bounce: bool = False) -> bool:
        """Remove a message; with ``bounce`` the sender first gets a failure DSN (RFC 3464) for the recipients
        not yet delivered, queued in the transaction that deletes the rows. True when a DSN was queued."""
        message = await self.outbound_rows.message(queue_id)
        if message is None:
            raise NotFound(f"no message {queue_id} in the queue", field="queue_id")
        prepared = None
        if bounce:
            now = utcnow()
            reports = [RecipientReport(final_recipient=r.address, action=Action.FAILED, status="5.3.0",
                                       diagnostic="deleted from the queue by the administrator",
                                       original_recipient=r.orcpt, last_attempt=now)
                       for r in await self.outbound_rows.open_recipients(queue_id)]
            prepared = await self.reports.prepare(MessageWork.of(message), reports)
        try:
            await self.outbound_rows.delete(queue_id, prepared)
        except BaseException:
            if prepared is not None:
                self.reports.discard(prepared)
            raise
        if prepared is not None:
            self.reports.dispatch(prepared)
        self.spool.remove(queue_id)
        return prepared is not None

    def purge_with(self, companion: PurgeCompanion) -> None:
        """Another area's per-message rows (the DMP bridge's filing jobs) purged in the same pass, and asked
        before a message is deleted whether it still needs it."""
        self.purger.companions.append(companion)

    def purge_along(self, follower: PurgeFollower) -> None:
        """Another area's rows that belong to a message (the S/MIME verdicts of its deliveries), deleted with
        it in the same transaction; their files removed once it has committed."""
        self.purger.followers.append(follower)

    async def purge(self, *, dry_run: bool = False, now: dt.datetime | None = None) -> PurgeReport:
        """Delete the rows of messages finished more than ``outbound.finished_listed_hours`` before ``now``
        (and the companions' finished rows), in batches; ``dry_run`` counts what would go and deletes nothing.
        Messages still queued, and those a companion still needs, stay (gateway.queue.purge). One node at a
        time: Conflict when another one purges now."""
        now = now or utcnow()
        cutoff = now - dt.timedelta(hours=self.settings.outbound.finished_listed_hours)
        async with run_alone(self.rows.db, PURGE_LOCK) as alone:
            if not alone:
                raise Conflict("another node (or `gateway queue purge`) is purging now; its pass covers this one",
                               field="purge")
            return await self.purger.run(cutoff, now=now, dry_run=dry_run)

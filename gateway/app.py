"""The one place that assembles the gateway's services and runs its listeners.

Front ends and CLI commands receive a ``Services`` object; nothing else
constructs services, and no module holds state in globals.
"""

from __future__ import annotations

import asyncio
import gc
import datetime as dt
import json
import logging
import os
import signal
import ssl
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway import schema
from gateway.audit import AuditLog
from gateway.config import Settings
from gateway.directory.service import DirectoryService
from gateway.dmp_bridge.fhir.server import start_http_listener
from gateway.dmp_bridge.intake import FilingIntake
from gateway.dmp_bridge.notify import AccessNoticeRecorder, AccessNoticeTask
from gateway.dmp_bridge.purge import FilingPurge
from gateway.dmp_bridge.worker import build_filing_worker
from gateway.errors import UserError
from gateway.imap.listeners import start_imap_listeners
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.notify import ChangeHub, PgNotifyBridge
from gateway.mailstore.sql import SqlMailStore
from gateway.ops.http import MetricsListener, Readiness
from gateway.ops.metrics import REGISTRY, CountedFailures, LiveCollector
from gateway.ops.sdnotify import SystemdNotifier
from gateway.pipeline.conversations import ConversationBook
from gateway.pipeline.pipeline import Pipeline
from gateway.queue.generated import GeneratedMailQueue
from gateway.queue.local_delivery import LocalStore
from gateway.queue.outbound import OutboundWorker, outbound_tls_context
from gateway.queue.purge import PurgeTask as QueuePurgeTask
from gateway.queue.smime_purge import InboundResultsPurge
from gateway.queue.service import MailQueue
from gateway.queue.spool import Spool, spool_root
from gateway.queue.wake import QueueAnnouncer, QueueListener
from gateway.retention import ShreddingTask
from gateway.security.at_rest import FieldSealer, HeaderSealer, SpoolCipher
from gateway.security.auth_limiter import AuditedFailures, AuthLimiter, LimiterPolicy
from gateway.security.failure_counts import PurgeTask
from gateway.security.door_audit import DoorAudit
from gateway.security.keys import KeyManager
from gateway.security.oidc import OidcTokenVerifier
from gateway.security.passwords import PasswordHasher
from gateway.security.pki import TestPKI
from gateway.security.revocation import ReloadingContexts, RevocationList
from gateway.security.server_identity import ServerCertificate
from gateway.security.smime_service import SmimeService
from gateway.smtp.acceptors import (AcceptorSupervisor, MainProcessChannel, SharedConcurrencyLimiter,
                                    SharedMessageRates, acceptor_command)
from gateway.smtp.handler import SessionLimits
from gateway.smtp.listeners import start_smtp_listeners
from gateway.storage.blob_sweep import BlobSweep, BlobSweepTask
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from gateway.storage.private import private_dir, secure_data_dir, secure_tree
from gateway.webmail.app import build_webmail_app

log = logging.getLogger("gateway")


@dataclass
class Services:
    settings: Settings
    db: Database
    hasher: PasswordHasher
    directory: DirectoryService
    pki: TestPKI
    keys: KeyManager
    blobs: BlobStore
    hub: ChangeHub
    mailstore: SqlMailStore
    fields: FieldSealer          # sealed DB fields (cached headers, held S/MIME keys) under per-owner data keys
    spool_cipher: SpoolCipher    # the SMTP spool is sealed at rest
    smime: SmimeService
    audit: AuditLog
    auth_limiter: AuthLimiter    # one limiter for every door's sign-ins (SMTP, IMAP, FHIR, webmail)
    door_audit: DoorAudit        # the other refusals and faults at the doors, into the audit log
    revocation: RevocationList   # the CRLs as they are now, for every certificate login
    tls_contexts: ReloadingContexts  # listeners' TLS contexts, rebuilt when their files (CRLs, trust) change
    server_certificate: ServerCertificate  # what every listener presents: the tls.* files (IGC-Santé) or the test PKI's
    trust_anchors: list[Path]        # pki.trust_anchors as files: one live list, replaced in place on SIGHUP
    spool: Spool                 # the one spool, sealed with ``spool_cipher`` (serve and the CLI alike)
    queue: MailQueue             # after the 250: rows, local delivery, outbound worker, DSNs, the admin verbs
    generated: GeneratedMailQueue  # the one way mail the gateway writes itself enters the queue (``queue.generated``)
    pipeline: Pipeline           # parse -> policy -> security -> route -> hand to ``queue``, for every door
    token_verifier: OidcTokenVerifier | None = None   # SASL OAUTHBEARER/XOAUTH2 (PSC); None: no issuer configured


@asynccontextmanager
async def open_services(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Services]:
    """Build every service on a migrated database; dispose of them on exit."""
    private_dir(settings.data_path)
    db = Database(settings.database_url, echo=settings.database.echo, pool_size=settings.database.pool_size)
    try:
        if migrate:
            await db.migrate()
        hasher = PasswordHasher.from_settings(settings.auth)
        # Key-encryption keys live in files beside, never inside, the database (encryption at rest).
        keys = KeyManager(db, settings.data_path / "keys")
        blobs = BlobStore(settings.blob_path, keys)   # cluster.blob_dir: one store shared by every node
        hub = ChangeHub()
        fields = FieldSealer(keys)
        pki = TestPKI.from_settings(settings)
        directory = DirectoryService(db, settings, hasher)
        audit = AuditLog.for_data_dir(db, settings.data_path)
        auth_limiter = AuthLimiter(LimiterPolicy.from_settings(settings.auth), db=db,
                                   audit=CountedFailures(AuditedFailures(audit)))
        anchors = [Path(path).expanduser() for path in settings.pki.trust_anchors]
        revocation = RevocationList(lambda: [*pki.crl_paths, *anchors])   # anchor files carry other CAs' CRLs
        mailstore = SqlMailStore(db, blobs, hub, headers=HeaderSealer(fields))
        smime = SmimeService(db, settings, pki, blobs, fields)
        spool_cipher = await SpoolCipher.load(keys)
        spool = Spool(spool_root(settings), spool_cipher, node=settings.cluster.node_name, db=db)   # small ones in their rows
        queue, pipeline = mail_path(settings, db, directory, spool, LocalDelivery(mailstore), smime=smime)
        queue.local.follow_up = FilingIntake(fields)   # each delivery commits its filing job with it
        queue.purge_with(FilingPurge(db, kept_hours=settings.retention.filing_jobs_kept_hours))
        # A message's S/MIME verdicts and decrypted copies go with it; those whose message is already gone too.
        verdicts = InboundResultsPurge(db, blobs, kept_hours=settings.outbound.finished_listed_hours)
        queue.purge_along(verdicts)
        queue.purge_with(verdicts)
        yield Services(
            settings=settings,
            db=db,
            hasher=hasher,
            directory=directory,
            pki=pki,
            keys=keys,
            blobs=blobs,
            hub=hub,
            mailstore=mailstore,
            fields=fields,
            spool_cipher=spool_cipher,
            smime=smime,
            audit=audit,
            auth_limiter=auth_limiter,
            door_audit=DoorAudit(audit),
            revocation=revocation,
            tls_contexts=ReloadingContexts(),
            server_certificate=ServerCertificate(settings, pki),
            trust_anchors=anchors,
            spool=spool,
            queue=queue,
            generated=queue.generated,
            pipeline=pipeline,
            token_verifier=OidcTokenVerifier.from_settings(settings.oidc, directory),
        )
    finally:
        await db.dispose()


def blob_sweep(services: Services) -> BlobSweep:
    """The sweep of blob files no row refers to (``gateway serve``'s daily pass and ``gateway blobs sweep``)."""
    return BlobSweep(services.db, services.blobs, schema.metadata,
                     min_age=dt.timedelta(hours=services.settings.retention.blob_orphan_min_age_hours))


def mail_path(settings: Settings, db: Database, directory: DirectoryService, spool: Spool, store: LocalStore | None,
              *, smime: SmimeService | None = None) -> tuple[MailQueue, Pipeline]:
    """The queue and the pipeline that hands it every accepted message (part of ``open_services``; the SMTP
    test harness calls it with a mail store of its choosing)."""
    queue = MailQueue(settings, db, directory, spool, store)
    pipeline = Pipeline(settings, directory, queue.rows, spool, queue.local, ConversationBook(db), smime=smime)
    pipeline.on_remote_queued(queue.wake_remote)      # remote recipients queued: the outbound worker looks now
    return queue, pipeline


_LEFTOVER_TASKS_SECONDS = 5.0


async def _let_leftover_tasks_finish(timeout: float) -> None:
    """After the listeners and workers have stopped, and before the database closes: wait (bounded) for
    the tasks still running. A client that hangs up mid-command has its command task cancelled; SQLAlchemy
    then returns that task's connection in a shielded task of its own, and asyncio.run, cancelling whatever
    is left at exit, cut that rollback short ("Exception during reset" with a traceback in the log)."""
    current = asyncio.current_task()
    leftover = {task for task in asyncio.all_tasks() if task is not current and not task.done()}
    if not leftover:
        return
    _done, pending = await asyncio.wait(leftover, timeout=timeout)
    if pending:
        log.warning("stopping: %d task(s) still running after %.0f s are cancelled: %s", len(pending), timeout,
                    ", ".join(sorted({task.get_coro().__qualname__ for task in pending})))  # type: ignore[union-attr]


ROLES = ("smtp", "imap", "https", "workers")   # what ``gateway serve --only`` may name
LIMITER_PURGE_SECONDS = 600.0                     # expired sign-in failure windows deleted this often (one node)


def parse_roles(text: str | None) -> frozenset[str]:
    """``--only smtp,imap``: the roles this node serves (every one when None); UserError names a bad one."""
    if text is None:
        return frozenset(ROLES)
    names = [name.strip().lower() for name in text.split(",")]
    unknown = [name for name in names if name not in ROLES]
    if unknown or not any(names):
        shown = ", ".join(repr(name) for name in unknown) if unknown else "nothing"
        raise UserError(f"unknown role {shown}: --only takes a comma-separated subset of {', '.join(ROLES)}",
                        field="--only")
    return frozenset(names)


class Gateway:
    """``gateway serve``: start every listener, report readiness, stop cleanly on SIGTERM/SIGINT.

    ``roles`` (``gateway serve --only``) splits the work between nodes sharing one PostgreSQL database:
    ``smtp``, ``imap`` and ``https`` are the listeners, ``workers`` the background work (local delivery,
    outbound, filing, access notices, crypto-shredding). A node without ``workers`` still accepts mail and
    announces it to the nodes that deliver (gateway.queue.wake), which claim it with row locks.

    ``smtp.acceptor_processes`` >= 1: SMTP is accepted by that many child processes on the ports this process
    binds (gateway.smtp.acceptors; ``run_acceptor`` is a child's run); ``acceptor_command`` starts one."""

    def __init__(self, settings: Settings, *, reread_settings: Callable[[], Settings] | None = None,
                 roles: frozenset[str] = frozenset(ROLES), acceptor_command: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.roles = roles
        self.acceptor_command = list(acceptor_command) if acceptor_command is not None else None
        self.acceptors: AcceptorSupervisor | None = None   # the SMTP acceptor processes, when they run
        self._endpoints: list[tuple[str, str, int]] = []
        self._reread_settings = reread_settings      # SIGHUP: the configuration as its file says now
        self._stop = asyncio.Event()
        self.workers: dict[str, int] = {}   # background worker -> jobs it runs at once (ready.json, `gateway status`)
        self.systemd = SystemdNotifier.from_environment()   # Type=notify: READY, RELOADING, STOPPING, WATCHDOG

    def listeners(self) -> dict[str, dict[str, object]]:
        """Every listener the gateway opens, with its host and port (published in demo.json)."""
        listen = self.settings.listen
        return {
            "smtp_relay": {"host": listen.host, "port": listen.smtp_relay_port, "tls": "starttls", "auth": "client-certificate"},
            "smtp_submission": {"host": listen.host, "port": listen.smtp_submission_port, "tls": "starttls", "auth": "required"},
            "smtp_submissions": {"host": listen.host, "port": listen.smtp_submissions_port, "tls": "implicit", "auth": "required"},
            "imap": {"host": listen.host, "port": listen.imap_port, "tls": "starttls"},
            "imaps": {"host": listen.host, "port": listen.imaps_port, "tls": "implicit"},
            "https": {"host": listen.host, "port": listen.http_port, "tls": "implicit"},
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        fixed = secure_data_dir(self.settings.data_path)     # left by an older version or a looser umask
        if self.settings.smtp.spool_dir:
            fixed += secure_tree(Path(self.settings.smtp.spool_dir).expanduser())
        if fixed:
            log.warning("data directory: %d file and folder modes made private (0600 / 0700)", fixed)
        async with open_services(self.settings) as services, AsyncExitStack() as running:
            running.push_async_callback(_let_leftover_tasks_finish, _LEFTOVER_TASKS_SECONDS)  # runs last
            running.push_async_callback(services.door_audit.flush)   # once every door is closed: the folded counts
            services.server_certificate.paths()   # the tls.* files checked (UserError naming the key), or the PKI's
            await self._bridge_nodes(services, running)
            readiness = Readiness()
            metrics = await self._start_metrics(services, running, readiness)
            endpoints = await self._start(services, running, readiness) + metrics
            loop.add_signal_handler(signal.SIGHUP, self._reload_trust, services)
            self._endpoints = endpoints
            self._write_ready_file(endpoints, self.workers)
            readiness.listening = True
            # What start-up built (modules, schema, caches, the directory's trust lists) lives as long as the
            # process: out of the cyclic collector's reach, a full collection walks only what serving made
            # (under the SMTP load, each one had paused the event loop about 170 ms walking those).
            gc.collect()
            gc.freeze()
            log.info("gateway ready: %s", ", ".join(f"{name} {host}:{port}" for name, host, port in endpoints))
            self.systemd.ready(f"serving: {len(endpoints)} listeners")
            self.systemd.start_watchdog()
            running.push_async_callback(self.systemd.stop_watchdog)   # first to stop: then TimeoutStopSec bounds it
            await self._stop.wait()
            if self.acceptors is not None:
                self.acceptors.stop_restarting()
            readiness.stopping = True
            self.systemd.stopping()
            log.info("gateway stopping")
        clear_ready_file(self.settings.data_path)

    @staticmethod
    async def _bridge_nodes(services: Services, running: AsyncExitStack) -> None:
        """PostgreSQL: other nodes may share the database; their mail store changes reach this node's IDLE
        sessions (and this node's theirs) through LISTEN/NOTIFY. SQLite is one process: nothing to bridge."""
        if services.db.is_sqlite:
            return
        bridge = PgNotifyBridge(services.hub, services.settings.database_url)
        await bridge.start()
        running.push_async_callback(bridge.stop)

    async def _start_metrics(self, services: Services, running: AsyncExitStack,
                             readiness: Readiness) -> list[tuple[str, str, int]]:
        """The metrics listener first, so /health answers and /ready says "starting" while the rest starts."""
        if not self.settings.metrics.enabled:
            return []
        listener = MetricsListener(self.settings.metrics, services.db, readiness)
        await listener.start()
        running.push_async_callback(listener.aclose)
        assert listener.address is not None
        return [("metrics", *listener.address)]

    async def _start(self, services: Services, running: AsyncExitStack,
                     readiness: Readiness | None = None) -> list[tuple[str, str, int]]:
        """Start the workers and open the listeners of this node's roles; each is stopped by ``running`` in
        reverse order."""
        settings = self.settings
        grace = settings.listen.shutdown_grace_seconds
        notices = AccessNoticeTask(services.db, settings, services.generated)
        separate_acceptors = "smtp" in self.roles and settings.smtp.acceptor_processes > 0
        if separate_acceptors:
            # The acceptors commit beside this process (a restarted one's predecessor maybe still finishing):
            # the recovery pass leaves a young spool file without rows alone, as on a shared spool.
            services.spool.shared = True
        await self._announce_queued_work(services, running)
        outbound = await self._start_workers(services, running, notices) if "workers" in self.roles else None
        endpoints: list[tuple[str, str, int]] = []
        connections: dict[str, Callable[[], int]] = {}
        if separate_acceptors:
            # Stopped first on SIGTERM: every acceptor stops listening and finishes its transactions in flight.
            acceptors = AcceptorSupervisor(settings, settings.smtp.acceptor_processes,
                                           self.acceptor_command or acceptor_command(None, None),
                                           services.queue.local, services.queue.wake_remote,
                                           on_change=self._acceptors_changed)
            await acceptors.start()
            self.acceptors = acceptors
            running.push_async_callback(acceptors.aclose, grace)
            endpoints += [(f"smtp_{door}", host, port) for door, (host, port) in acceptors.addresses.items()]
        elif "smtp" in self.roles:
            # Stopped first on SIGTERM (callbacks run in reverse): no new mail, transactions in flight finish.
            smtp = await start_smtp_listeners(services, settings)
            running.push_async_callback(smtp.aclose, grace)
            connections["smtp"] = lambda: len(smtp.connections)
            endpoints += [(f"smtp_{door}", host, port) for door, (host, port) in smtp.addresses.items()]
        if "https" in self.roles:
            # The HTTPS listener: the patient webmail at its root, the FHIR API mounted under fhir.base_path.
            webmail = build_webmail_app(services, settings, pipeline=services.pipeline) if settings.webmail.enabled else None
            http = await start_http_listener(services, settings, root=webmail,
                                             notifier=AccessNoticeRecorder(services.db, wake=notices.wake))
            running.push_async_callback(http.aclose)
            endpoints += [("https", host, port) for host, port in http.addresses()[:1]]
        if "imap" in self.roles:
            imap = await start_imap_listeners(services, settings, mailstore=services.mailstore, hub=services.hub)
            running.push_async_callback(imap.aclose, grace)
            connections["imap"] = lambda: len(imap.server.connections)
            endpoints += [(name, host, port) for name, (host, port) in zip(("imap", "imaps"), imap.addresses())]
        collector = LiveCollector(services.db, open_connections=connections,
                                  outbound_totals=None if outbound is None else outbound_totals(outbound))
        REGISTRY.register(collector)
        running.callback(REGISTRY.unregister, collector)
        if readiness is not None:
            readiness.collector = collector
        return endpoints

    async def run_acceptor(self, channel_fd: int, sockets: dict[str, list[socket.socket]]) -> None:
        """An SMTP acceptor process (gateway.smtp.acceptors): SMTP only, on the sockets the main process bound,
        announcing what it queued and asking for the gateway-wide limits over the channel ``channel_fd``."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        # Ctrl-C in a terminal reaches the whole process group: the main process stops the acceptors itself.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        channel = MainProcessChannel(channel_fd)
        settings = self.settings
        async with open_services(settings, migrate=False) as services, AsyncExitStack() as running:
            running.push_async_callback(_let_leftover_tasks_finish, _LEFTOVER_TASKS_SECONDS)  # runs last
            running.push_async_callback(services.door_audit.flush)
            services.server_certificate.paths()
            local = services.queue.local
            local.delivers_here = False            # the main process delivers what this one queues
            local.elsewhere = channel.announce
            services.pipeline.on_remote_queued(channel.remote_queued)
            await channel.start(on_room=local.room_elsewhere, on_lost=self._stop.set)
            running.push_async_callback(channel.stop)          # after the listeners: the last queue ids go out
            services.pipeline.rates = SharedMessageRates(channel, settings.smtp)
            limits = SessionLimits(SharedConcurrencyLimiter(channel, "ip", settings.smtp.max_connections_per_ip),
                                   SharedConcurrencyLimiter(channel, "user", settings.smtp.max_sessions_per_user),
                                   services.auth_limiter)
            removed = services.spool.clear_incoming()   # its own incoming/<node>: half-received by its predecessor
            if removed:
                log.info("removed %d half-received message(s) of a previous acceptor", removed)
            smtp = await start_smtp_listeners(services, settings, sockets=sockets, limits=limits)
            running.push_async_callback(smtp.aclose, settings.listen.shutdown_grace_seconds)
            loop.add_signal_handler(signal.SIGHUP, self._reload_trust, services)
            gc.collect()
            gc.freeze()
            channel.ready()
            log.info("SMTP acceptor %s ready (pid %d)", settings.cluster.node_name, os.getpid())
            await self._stop.wait()
            log.info("SMTP acceptor %s stopping", settings.cluster.node_name)

    def _acceptors_changed(self) -> None:
        """An acceptor process was started again: ready.json names its new pid."""
        if self._endpoints:
            self._write_ready_file(self._endpoints, self.workers)

    async def _announce_queued_work(self, services: Services, running: AsyncExitStack) -> None:
        """Several nodes (PostgreSQL): a node without workers announces what it queued, the nodes with workers
        listen and deliver it at once (gateway.queue.wake). SQLite is one process, which has every role."""
        local = services.queue.local
        local.delivers_here = "workers" in self.roles
        if services.db.is_sqlite:
            return
        if local.delivers_here:
            listener = QueueListener(self.settings.database_url, local.schedule)
            await listener.start()
            running.push_async_callback(listener.stop)
        else:
            announcer = QueueAnnouncer(self.settings.database_url)
            await announcer.start()
            running.push_async_callback(announcer.stop)
            local.elsewhere = announcer.announce

    async def _start_workers(self, services: Services, running: AsyncExitStack,
                             notices: AccessNoticeTask) -> OutboundWorker:
        """The ``workers`` role: local delivery (after its recovery pass), outbound, filing, access notices,
        crypto-shredding, the sign-in limiter's purge, the purge of finished work."""
        settings = self.settings
        recovered = await services.queue.start_local()      # recovery pass, then local delivery
        log.info("queue recovery: %s", recovered)
        outbound = await services.queue.start_outbound(
            outbound_tls_context(services.pki, settings, identity=services.server_certificate.paths()))
        running.push_async_callback(services.queue.stop)
        filing = build_filing_worker(services)
        await filing.start()
        running.push_async_callback(filing.stop)
        self.workers = {"local_delivery": settings.smtp.delivery_workers,
                        "outbound": settings.outbound.max_concurrent_deliveries,
                        "filing": filing.policy.concurrency, "access_notices": 1, "shredding": 1, "purge": 1}
        await notices.start()
        running.push_async_callback(notices.stop)
        shredding = ShreddingTask(services.db, services.keys, services.fields,
                                  retention_days=settings.retention.closed_patient_days,
                                  interval_seconds=settings.retention.shred_interval_minutes * 60,
                                  index=services.mailstore.index)
        await shredding.start()
        running.push_async_callback(shredding.stop)
        limiter_purge = PurgeTask(services.db, services.auth_limiter.purge, interval_seconds=LIMITER_PURGE_SECONDS)
        await limiter_purge.start()
        running.push_async_callback(limiter_purge.stop)
        purge = QueuePurgeTask(services.queue.purge, interval_seconds=settings.retention.purge_interval_minutes * 60)
        await purge.start()
        running.push_async_callback(purge.stop)
        sweep = BlobSweepTask(blob_sweep(services), interval_seconds=settings.retention.blob_sweep_interval_hours * 3600)
        await sweep.start()
        running.push_async_callback(sweep.stop)
        return outbound

    def _reload_trust(self, services: Services) -> None:
        """SIGHUP: re-read the configuration, then the CRLs, the trust list and the listeners' certificates now.
        Open connections are kept: only new handshakes and logins see what changed."""
        log.info("SIGHUP: reloading configuration, CRLs, trust anchors and TLS certificates")
        self.systemd.reloading()
        try:
            if self._reread_settings is not None:
                self._apply_settings(services)
            services.revocation.reload()
            services.tls_contexts.reload()
            self._reload_outbound_identity(services)
            if self.acceptors is not None:
                self.acceptors.reload()             # each acceptor process reloads as this one does
            log.info("SIGHUP: reloaded")
        finally:
            self.systemd.ready("serving: reloaded")   # systemctl reload returns; the service goes on either way

    def _reload_outbound_identity(self, services: Services) -> None:
        """Outbound SMTP's context (our client certificate, the trust anchors, the CRLs) built again from the
        files as they are now; one that does not load keeps the running context."""
        outbound = services.queue.outbound
        if outbound is None:
            return
        try:
            outbound.tls_context = outbound_tls_context(services.pki, self.settings,
                                                        identity=services.server_certificate.paths())
        except (UserError, ssl.SSLError, OSError) as error:
            log.error("SIGHUP: outbound TLS context not reloaded, keeping the running one: %s", error)

    def _apply_settings(self, services: Services) -> None:
        """What can change while serving changes now (log level, trust anchors, the tls.* certificate files); the
        rest is named as waiting for a restart. A configuration that does not load keeps the running one."""
        assert self._reread_settings is not None
        try:
            fresh = self._reread_settings()
        except Exception as error:  # noqa: BLE001  (ConfigError names the key; anything else must not stop serving)
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", error)
            return
        logging.getLogger().setLevel(fresh.log_level)
        services.trust_anchors[:] = [Path(path).expanduser() for path in fresh.pki.trust_anchors]
        # The listeners' certificate files (tls.*): the contexts rebuilt next (``_reload_trust``) check and use them.
        services.server_certificate.configure(services.server_certificate.settings.model_copy(update={"tls": fresh.tls}))
        waiting = sorted(changed_settings(self.settings, fresh) - LIVE_SETTINGS)
        if waiting:
            log.warning("SIGHUP: changed settings that apply at the next restart: %s", ", ".join(waiting))
        self.settings = self.settings.model_copy(update={"log_level": fresh.log_level, "tls": fresh.tls,
                                                         "pki": self.settings.pki.model_copy(
                                                             update={"trust_anchors": fresh.pki.trust_anchors})})

    def _write_ready_file(self, servers: list[tuple[str, str, int]], workers: dict[str, int]) -> None:
        """``<data_dir>/run/ready.json``: written once every listener accepts connections."""
        run_dir = private_dir(self.settings.data_path / "run")
        payload = {"pid": os.getpid(), "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "listeners": {name: {"host": host, "port": port} for name, host, port in servers},
                   "workers": workers}
        if self.acceptors is not None:
            payload["acceptors"] = self.acceptors.describe()
        tmp = run_dir / "ready.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(payload, indent=2))
        tmp.replace(run_dir / "ready.json")


def outbound_totals(outbound: OutboundWorker) -> Callable[[], dict[str, int]]:
    """The outbound worker's totals, as the metrics collector reads them."""
    return lambda: {"delivered": outbound.stats.delivered, "deferred": outbound.stats.deferred,
                    "bounced": outbound.stats.failed}


# Applied by SIGHUP without a restart.
LIVE_SETTINGS = frozenset({"log_level", "pki.trust_anchors", "tls.server_certificate_file", "tls.server_key_file",
                           "tls.server_chain_file"})


def changed_settings(old: Settings, new: Settings) -> set[str]:
    """Dotted names of the settings whose values differ."""
    before, after = old.model_dump(), new.model_dump()
    changed = set()
    for key in before.keys() | after.keys():
        if isinstance(before.get(key), dict) and isinstance(after.get(key), dict):
            changed |= {f"{key}.{sub}" for sub in before[key].keys() | after[key].keys()
                        if before[key].get(sub) != after[key].get(sub)}
        elif before.get(key) != after.get(key):
            changed.add(key)
    return changed


def clear_ready_file(data_path: Path) -> None:
    (data_path / "run" / "ready.json").unlink(missing_ok=True)

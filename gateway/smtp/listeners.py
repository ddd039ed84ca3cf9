"""Assemble the SMTP side and open its three listeners.

``start_smtp_listeners(services, settings)`` is what ``gateway serve`` calls:
it builds the pipeline (queue, spool, policy, local delivery), runs the
recovery pass (every acknowledged message not yet delivered is scheduled
again), and opens

- submission  (``listen.smtp_submission_port``): STARTTLS, then AUTH, then mail;
- submissions (``listen.smtp_submissions_port``): implicit TLS, then AUTH;
- relay       (``listen.smtp_relay_port``): STARTTLS with a client certificate
  verified against the trust anchors (CERT_REQUIRED), no AUTH.

TLS 1.2 or newer everywhere (gateway.security.tls).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from gateway.config import Settings
from gateway.ops.metrics import CONNECTIONS
from gateway.directory.service import DirectoryService
from gateway.pipeline.conversations import ConversationBook
from gateway.queue.local_delivery import LocalDelivery, LocalStore
from gateway.queue.generated import GeneratedMailQueue
from gateway.pipeline.origin import Door
from gateway.pipeline.pipeline import Pipeline
from gateway.queue.store import QueueStore
from gateway.queue.spool import Spool
from gateway.security.at_rest import SpoolCipher
from gateway.security.auth_limiter import AuthLimiter, LimiterPolicy
from gateway.security.revocation import ReloadingContexts, RevocationList
from gateway.security.smime_service import SmimeService
from gateway.security.tls import server_context
from gateway.smtp.handler import GatewayHandler, SessionLimits, TokenVerifier
from gateway.queue.outbound import DsnReports
from gateway.smtp.server import GatewaySMTP, ListenerKind, ProtocolLimits
from gateway.storage.db import Database

log = logging.getLogger("gateway.smtp")


@dataclass(frozen=True)
class TlsMaterial:
    """Our certificate chain and key, and the anchors client certificates must chain to."""

    cert_chain: Path
    key: Path
    client_ca: Path
    crls: tuple[Path, ...] = ()                 # those missing now are used once they appear
    extra_anchors: Sequence[Path] = ()          # pki.trust_anchors: other operators' CAs and CRLs (live on SIGHUP)
    reloading: ReloadingContexts | None = None  # re-read the files when they change (revocation at once)

    def context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        def build() -> ssl.SSLContext:
            return server_context(self.cert_chain, self.key, client_ca=self.client_ca,
                                  require_client_cert=require_client_cert,
                                  crls=[path for path in self.crls if path.is_file()],
                                  extra_anchors=tuple(self.extra_anchors))
        if self.reloading is None:
            return build()
        return self.reloading.server(build, lambda: (self.cert_chain, self.key, self.client_ca, *self.crls,
                                                     *self.extra_anchors))


class SmtpListeners(list[asyncio.Server]):
    """The open listeners (a list, as ``gateway serve`` expects) plus what runs behind them."""

    def __init__(self, pipeline: Pipeline, delivery: LocalDelivery, session_limits: SessionLimits) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.delivery = delivery
        self.session_limits = session_limits
        self.addresses: dict[str, tuple[str, int]] = {}
        self.connections: weakref.WeakSet[GatewaySMTP] = weakref.WeakSet()

    async def aclose(self, grace_seconds: float = 0.0) -> None:
        """Stop listening; tell idle sessions 421 4.3.2 now and those running a command (a DATA in flight)
        after its reply, waiting up to ``grace_seconds`` for them; then 421 to the rest; stop local delivery
        (the queue keeps what is not delivered yet)."""
        for server in self:
            server.close()
        for connection in list(self.connections):
            connection.shut_down()
        deadline = asyncio.get_running_loop().time() + grace_seconds
        while any(not c.closed for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.force_shut_down()
        for server in self:
            await server.wait_closed()
        await self.delivery.stop()


def spool_root(settings: Settings) -> Path:
    return Path(settings.smtp.spool_dir).expanduser().resolve() if settings.smtp.spool_dir else settings.data_path / "spool"


def build_pipeline(settings: Settings, db: Database, directory: DirectoryService, store: LocalStore | None,
                   *, spool_cipher: SpoolCipher | None = None, smime: SmimeService | None = None) -> Pipeline:
    queue = QueueStore(db)
    spool = Spool(spool_root(settings), spool_cipher)
    delivery = LocalDelivery(queue, spool, store, authserv_id=settings.hostname,
                             workers=settings.smtp.delivery_workers, retry_seconds=settings.smtp.local_retry_seconds,
                             lifetime_hours=settings.smtp.local_queue_lifetime_hours, directory=directory)
    pipeline = Pipeline(settings, directory, queue, spool, delivery, ConversationBook(db), smime=smime)
    # Failure DSNs of local delivery (RFC 3464) take the one generated-mail queue, like the outbound worker's.
    generated = GeneratedMailQueue(settings, directory, spool, schedule_local=delivery.schedule,
                                   wake_remote=pipeline.remote_queued)
    delivery.reports = DsnReports(settings, generated, spool)
    return pipeline


def tls_material_from_pki(services: Any, settings: Settings) -> TlsMaterial:
    issued = services.pki.ensure_gateway_server_cert(settings.hostname, settings.pki.server_names, settings.pki.server_ips)
    anchors = getattr(services, "trust_anchors", None)
    if anchors is None:
        anchors = tuple(Path(path).expanduser() for path in settings.pki.trust_anchors)
    return TlsMaterial(issued.chain_path, issued.key_path, services.pki.ca_bundle_path, tuple(services.pki.crl_paths),
                       anchors, getattr(services, "tls_contexts", None))


async def start_smtp_listeners(services: Any, settings: Settings) -> SmtpListeners:
    """Build the pipeline from ``services`` (db, directory, pki, mailstore) and open the three listeners."""
    from gateway.mailstore.delivery import LocalDelivery as MailStoreDelivery

    store: LocalStore = MailStoreDelivery(services.mailstore)   # provisions folders, idempotent on delivery keys
    pipeline = build_pipeline(settings, services.db, services.directory, store,
                              spool_cipher=getattr(services, "spool_cipher", None), smime=getattr(services, "smime", None))
    return await open_listeners(pipeline, services.directory, settings, tls_material_from_pki(services, settings),
                                token_verifier=getattr(services, "token_verifier", None),
                                auth_limiter=getattr(services, "auth_limiter", None),
                                revocation=getattr(services, "revocation", None))


async def open_listeners(pipeline: Pipeline, directory: DirectoryService, settings: Settings, tls: TlsMaterial,
                         *, token_verifier: TokenVerifier | None = None,
                         auth_limiter: AuthLimiter | None = None,
                         revocation: RevocationList | None = None) -> SmtpListeners:
    report = await pipeline.delivery.start()
    log.info("SMTP recovery: %s", report)
    limits = SessionLimits.from_settings(
        settings.smtp, auth_limiter or AuthLimiter(LimiterPolicy.from_settings(settings.auth)))
    listeners = SmtpListeners(pipeline, pipeline.delivery, limits)
    plan = (
        (ListenerKind.SUBMISSION, settings.listen.smtp_submission_port, tls.context(require_client_cert=False)),
        (ListenerKind.SUBMISSIONS, settings.listen.smtp_submissions_port, tls.context(require_client_cert=False)),
        # The relay door's certificate is checked when presented (CERT_OPTIONAL still refuses one that does not
        # verify) and required by the protocol, which tells a peer without one why (530 5.7.0) before closing.
        (ListenerKind.RELAY, settings.listen.smtp_relay_port, tls.context(require_client_cert=False)),
    )
    try:
        for kind, port, context in plan:
            handler = GatewayHandler(Door(kind.value), pipeline, directory, limits, token_verifier, revocation)
            server = await _listen(kind, handler, settings, port, context, listeners.connections)
            listeners.append(server)
            host, bound_port = server.sockets[0].getsockname()[:2]
            listeners.addresses[kind.value] = (host, bound_port)
    except BaseException:
        await listeners.aclose()
        raise
    return listeners


async def _listen(kind: ListenerKind, handler: GatewayHandler, settings: Settings, port: int,
                  context: ssl.SSLContext, connections: "weakref.WeakSet[GatewaySMTP]") -> asyncio.Server:
    smtp = settings.smtp
    limits = ProtocolLimits(max_message_size=smtp.max_message_size, max_line_length=smtp.max_line_length,
                            max_auth_failures=smtp.auth_failures_per_connection, timeout_seconds=smtp.timeout_seconds)
    disabled = frozenset(word.upper() for word in smtp.disabled_extensions)

    def factory() -> GatewaySMTP:
        connection = GatewaySMTP(handler, kind=kind, hostname=settings.hostname, tls_context=context, limits=limits,
                                 disabled_extensions=disabled)
        connections.add(connection)
        CONNECTIONS.labels(f"smtp_{kind.value}").inc()
        return connection

    loop = asyncio.get_running_loop()
    # Implicit TLS (submissions) is handshaken by GatewaySMTP itself, so refusals are logged like STARTTLS ones.
    return await loop.create_server(factory, host=settings.listen.host, port=port, reuse_address=True)

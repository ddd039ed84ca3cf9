"""Open the SMTP side's three listeners in front of the pipeline.

``start_smtp_listeners(services, settings)`` is what ``gateway serve`` calls:
the pipeline and the queue behind it come built from ``gateway.app.open_services``
(the queue's recovery pass has run); it opens

- submission  (``listen.smtp_submission_port``): STARTTLS, then AUTH, then mail;
- submissions (``listen.smtp_submissions_port``): implicit TLS, then AUTH;
- relay       (``listen.smtp_relay_port``): STARTTLS with a client certificate
  verified against the trust anchors (CERT_REQUIRED), no AUTH.

TLS 1.2 or newer everywhere (gateway.security.tls).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import weakref
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Protocol

from gateway.config import Settings
from gateway.ops.metrics import CONNECTIONS
from gateway.ops.proxied import ProxyGuard, open_listener, proxy_guard
from gateway.directory.service import DirectoryService
from gateway.pipeline.origin import Door
from gateway.pipeline.pipeline import Pipeline
from gateway.security.auth_limiter import AuthLimiter, LimiterPolicy
from gateway.security.door_audit import DoorAudit
from gateway.security.pki import TestPKI
from gateway.security.revocation import ReloadingContexts, RevocationList
from gateway.security.server_identity import ServerCertificate
from gateway.security.tls import server_context
from gateway.smtp.handler import GatewayHandler, SessionLimits, TokenVerifier
from gateway.smtp.server import GatewaySMTP, ListenerKind, ProtocolLimits

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
    identity: ServerCertificate | None = None   # when set, our chain and key as it gives them now (tls.* or the PKI)

    def _identity(self) -> tuple[Path, Path]:
        return self.identity.paths() if self.identity is not None else (self.cert_chain, self.key)

    def _identity_files(self) -> tuple[Path, ...]:
        return self.identity.watched() if self.identity is not None else (self.cert_chain, self.key)

    def context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        def build() -> ssl.SSLContext:
            cert_chain, key = self._identity()
            return server_context(cert_chain, key, client_ca=self.client_ca,
                                  require_client_cert=require_client_cert,
                                  crls=[path for path in self.crls if path.is_file()],
                                  extra_anchors=tuple(self.extra_anchors))
        if self.reloading is None:
            return build()
        return self.reloading.server(build, lambda: (*self._identity_files(), self.client_ca, *self.crls,
                                                     *self.extra_anchors))


class SmtpListeners(list[asyncio.Server]):
    """The open listeners (a list, as ``gateway serve`` expects) and the pipeline behind them."""

    def __init__(self, pipeline: Pipeline, session_limits: SessionLimits) -> None:
        super().__init__()
        self.pipeline = pipeline
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


class SmtpServices(Protocol):
    """What the listeners need of ``gateway.app.Services``."""

    pipeline: Pipeline
    directory: DirectoryService
    pki: TestPKI
    tls_contexts: ReloadingContexts
    server_certificate: ServerCertificate
    @property
    def token_verifier(self) -> TokenVerifier | None: ...
    auth_limiter: AuthLimiter
    revocation: RevocationList
    door_audit: DoorAudit


def tls_material_from_pki(services: SmtpServices, settings: Settings) -> TlsMaterial:
    """Our certificate as ``services.server_certificate`` gives it (the operator's ``tls.*`` files, or the
    test PKI's), client certificates verified against the PKI's CAs, the trust anchors and the CRLs."""
    chain, key = services.server_certificate.paths()
    anchors = getattr(services, "trust_anchors", None)
    if anchors is None:
        anchors = tuple(Path(path).expanduser() for path in settings.pki.trust_anchors)
    return TlsMaterial(chain, key, services.pki.ca_bundle_path, tuple(services.pki.crl_paths),
                       anchors, services.tls_contexts, services.server_certificate)


# A listening socket per door, bound already: an SMTP acceptor process's, inherited from the main process.
BoundSockets = Mapping[str, Sequence[socket.socket]]


async def start_smtp_listeners(services: SmtpServices, settings: Settings, *, sockets: BoundSockets | None = None,
                               limits: SessionLimits | None = None) -> SmtpListeners:
    """Open the three listeners in front of ``services.pipeline`` (on ``sockets`` when given, by door name:
    ``submission``, ``submissions``, ``relay``); ``limits``: the session limits, when not this process's own."""
    return await open_listeners(services.pipeline, services.directory, settings, tls_material_from_pki(services, settings),
                                token_verifier=services.token_verifier, auth_limiter=services.auth_limiter,
                                revocation=services.revocation, door_audit=services.door_audit,
                                proxy=proxy_guard(services, settings), sockets=sockets, limits=limits)


async def open_listeners(pipeline: Pipeline, directory: DirectoryService, settings: Settings, tls: TlsMaterial,
                         *, token_verifier: TokenVerifier | None = None,
                         auth_limiter: AuthLimiter | None = None,
                         revocation: RevocationList | None = None,
                         door_audit: DoorAudit | None = None,
                         proxy: ProxyGuard | None = None,
                         sockets: BoundSockets | None = None,
                         limits: SessionLimits | None = None) -> SmtpListeners:
    if limits is None:
        limits = SessionLimits.from_settings(
            settings.smtp, auth_limiter or AuthLimiter(LimiterPolicy.from_settings(settings.auth)))
    listeners = SmtpListeners(pipeline, limits)
    plan = (
        (ListenerKind.SUBMISSION, settings.listen.smtp_submission_port, tls.context(require_client_cert=False)),
        (ListenerKind.SUBMISSIONS, settings.listen.smtp_submissions_port, tls.context(require_client_cert=False)),
        # The relay door's certificate is checked when presented (CERT_OPTIONAL still refuses one that does not
        # verify) and required by the protocol, which tells a peer without one why (530 5.7.0) before closing.
        (ListenerKind.RELAY, settings.listen.smtp_relay_port, tls.context(require_client_cert=False)),
    )
    try:
        for kind, port, context in plan:
            handler = GatewayHandler(Door(kind.value), pipeline, directory, limits, token_verifier, revocation,
                                     door_audit)
            bound: Sequence[socket.socket | None] = sockets[kind.value] if sockets is not None else [None]
            for sock in bound:
                server = await _listen(kind, handler, settings, port, context, listeners.connections, proxy, sock)
                listeners.append(server)
                if kind.value not in listeners.addresses:
                    host, bound_port = server.sockets[0].getsockname()[:2]
                    listeners.addresses[kind.value] = (host, bound_port)
    except BaseException:
        await listeners.aclose()
        raise
    return listeners


async def _listen(kind: ListenerKind, handler: GatewayHandler, settings: Settings, port: int,
                  context: ssl.SSLContext, connections: "weakref.WeakSet[GatewaySMTP]",
                  proxy: ProxyGuard | None, sock: socket.socket | None = None) -> asyncio.Server:
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

    # Implicit TLS (submissions) is handshaken by GatewaySMTP itself, so refusals are logged like STARTTLS ones;
    # behind HAProxy the PROXY header is read before (gateway.ops.proxied).
    return await open_listener(factory, settings.listen.host, port, guard=proxy, door=f"smtp_{kind.value}", sock=sock)

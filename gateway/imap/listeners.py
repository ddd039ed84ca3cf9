"""Assemble the IMAP side for ``gateway serve``: TLS context, session context, the two listeners.

``start_imap_listeners(services, settings, mailstore=...)`` opens
``listen.imap_port`` (STARTTLS, RFC 3501 6.2.1) and ``listen.imaps_port``
(implicit TLS, RFC 8314).  Client certificates are asked for but optional:
when one is presented it must chain to the trust anchors, and it then allows
SASL EXTERNAL (RFC 4422 appendix A).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from gateway.config import Settings
from gateway.imap.protocol.capabilities import unknown_names
from gateway.imap.protocol.reader import pre_auth_limits
from gateway.imap.server import ImapServer, ImapServerConfig, UserConnectionLimiter
from gateway.imap.session import SessionContext, SessionSettings
from gateway.mailstore.interface import MailStore
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.warmup import HINT_NAME, IndexWarmup
from gateway.ops.proxied import proxy_guard
from gateway.security.auth_limiter import AuthLimiter, LimiterPolicy
from gateway.security.revocation import optional_client_certificate_context

log = logging.getLogger("gateway.imap")



class ImapListeners(list[asyncio.Server]):
    """The open listeners (a list, as ``gateway serve`` expects) and the server behind them."""

    def __init__(self, server: ImapServer, warmup: IndexWarmup | None = None) -> None:
        super().__init__(server.servers)
        self.server = server
        self.warmup = warmup

    def addresses(self) -> list[tuple[str, int]]:
        return self.server.addresses()

    async def aclose(self, grace_seconds: float = 0.0) -> None:
        await self.server.close(grace_seconds)
        if self.warmup is not None:
            await self.warmup.stop()      # after the sessions: the folders they had open are remembered


def tls_context_from_pki(services: Any, settings: Settings) -> ssl.SSLContext:
    """Our certificate (every name clients use, DNS names included) and optional client certificates."""
    return optional_client_certificate_context(services, settings.hostname, settings.pki.server_names,
                                               settings.pki.server_ips)


def session_settings(settings: Settings) -> SessionSettings:
    """Session knobs from the ``[imap]`` section."""
    imap = settings.imap
    disabled = tuple(imap.disabled_capabilities)
    for name in unknown_names(disabled):
        log.warning("imap.disabled_capabilities: %s is not a capability we announce", name)
    return SessionSettings(hostname=settings.hostname, disabled_capabilities=disabled,
                           max_auth_failures=imap.max_auth_failures,
                           idle_timeout_seconds=imap.idle_timeout_minutes * 60.0)


async def start_imap_listeners(services: Any, settings: Settings, *, mailstore: MailStore,
                               hub: ChangeHub | None = None) -> ImapListeners:
    """Open the IMAP (STARTTLS) and IMAPS (implicit TLS) listeners on ``settings.listen``.

    ``hub`` is the change hub the mail store publishes to (IDLE wake-ups); by
    default the store's own ``hub`` attribute.
    """
    change_hub = hub if hub is not None else getattr(mailstore, "hub", None)
    if not isinstance(change_hub, ChangeHub):
        raise RuntimeError("IMAP needs the mail store's change hub for IDLE (pass hub=...)")
    imap = settings.imap
    limiter = UserConnectionLimiter(imap.max_connections_per_user)
    # The gateway's one sign-in limiter, shared with SMTP and FHIR (an in-memory one for partial test services).
    auth_limiter = getattr(services, "auth_limiter", None) or AuthLimiter(LimiterPolicy.from_settings(settings.auth))
    context = SessionContext(mailstore=mailstore, hub=change_hub, directory=services.directory,
                             limiter=limiter, settings=session_settings(settings), auth_limiter=auth_limiter,
                             revocation=getattr(services, "revocation", None),
                             door_audit=getattr(services, "door_audit", None))
    config = ImapServerConfig(host=settings.listen.host, starttls_port=settings.listen.imap_port,
                              implicit_tls_port=settings.listen.imaps_port,
                              tls_context=tls_context_from_pki(services, settings),
                              max_connections=imap.max_connections,
                              pre_auth_timeout=float(imap.login_timeout_seconds),
                              autologout_seconds=imap.autologout_minutes * 60.0,
                              pre_auth_reader_limits=pre_auth_limits(imap.max_literal_before_login),
                              max_unauthenticated_per_ip=imap.max_unauthenticated_connections_per_ip,
                              proxy=proxy_guard(services, settings))
    server = ImapServer(config, context)
    await server.start()
    # The folders in use before the restart: their indexes loaded while the clients reconnect.
    warmup = IndexWarmup(mailstore, settings.data_path / "run" / HINT_NAME, imap.index_preload_messages)
    warmup.start()
    return ImapListeners(server, warmup)

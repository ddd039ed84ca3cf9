"""The SMTP doors' handler: aiosmtpd-style hooks that hand every decision to the pipeline.

The protocol (gateway.smtp.server) calls these hooks; they translate the SMTP
session into an ``Origin`` and call the one ``Pipeline``. What is specific to a
connection lives here too: the per-IP connection limit and the per-account session
limit; AUTH attempts go through the gateway's one ``AuthLimiter``. Every slot taken is released when the connection
ends, whatever the path (maddy#348).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import SmtpSettings
from gateway.directory.service import Account, DirectoryService
from gateway.pipeline.limits import ConcurrencyLimiter, Slot
from gateway.pipeline.origin import Door, Origin
from gateway.pipeline.pipeline import Pipeline, Transaction
from gateway.queue.spool import SpoolFile
from gateway.security.auth_limiter import AuthLimiter, AuthThrottled, LimiterPolicy
from gateway.security.door_audit import DoorAudit
from gateway.security.revocation import RevocationList
from gateway.mail import codes
from gateway.mail.codes import Reply, MailRefusal
from gateway.mail.parameters import MailParameters
from gateway.mail.paths import SmtpPath
from gateway.smtp.server import (
    CertificateCredentials,
    Credentials,
    GatewayEnvelope,
    GatewaySession,
    GatewaySMTP,
    MessageSink,
    PasswordCredentials,
    RecipientRequest,
    TokenCredentials,
)

log = logging.getLogger("gateway.smtp")


class TokenVerifier(Protocol):
    """Checks an OAuth bearer token (OIDC, e.g. Pro Santé Connect) and names the account it grants."""

    async def account_for_token(self, user: str, token: str) -> Account | None: ...

    def error_status(self) -> bytes:
        """RFC 7628 3.2.2: the JSON error status of a refused OAUTHBEARER (status, scope, openid-configuration)."""
        ...


@dataclass
class SessionLimits:
    """Shared by every SMTP listener of one gateway process; in an SMTP acceptor process, the two limiters
    ask the main process, which holds the counts of every acceptor (gateway.smtp.acceptors)."""

    connections_per_ip: ConcurrencyLimiter
    sessions_per_user: ConcurrencyLimiter
    auth_limiter: AuthLimiter           # the gateway's one limiter (services.auth_limiter), shared with IMAP and FHIR

    @classmethod
    def from_settings(cls, smtp: SmtpSettings, auth_limiter: AuthLimiter | None = None) -> "SessionLimits":
        return cls(
            ConcurrencyLimiter(smtp.max_connections_per_ip),
            ConcurrencyLimiter(smtp.max_sessions_per_user),
            auth_limiter if auth_limiter is not None else AuthLimiter(LimiterPolicy()),
        )


class GatewayHandler:
    """One per listener; ``door`` says which."""

    def __init__(self, door: Door, pipeline: Pipeline, directory: DirectoryService, limits: SessionLimits,
                 token_verifier: TokenVerifier | None = None, revocation: RevocationList | None = None,
                 door_audit: DoorAudit | None = None) -> None:
        self.door = door
        self.door_audit = door_audit
        self.revocation = revocation
        self.pipeline = pipeline
        self.directory = directory
        self.limits = limits
        self.token_verifier = token_verifier
        self.token_auth_available = token_verifier is not None

    # ----------------------------------------------------------------- connection

    async def connection_opened(self, server: GatewaySMTP, session: GatewaySession) -> None:
        address = _client_address(session)
        slot = await self.limits.connections_per_ip.acquire(address)
        if slot is None:
            raise MailRefusal(codes.TOO_MANY_CONNECTIONS.format(who=address, limit=self.limits.connections_per_ip.limit))
        server.connection_data["ip_slot"] = slot
        if server.closed:           # gone while an acceptor process asked for the slot: nobody else releases it
            self.connection_closed(server)

    def connection_closed(self, server: GatewaySMTP) -> None:
        for key in ("user_slot", "ip_slot"):
            slot: Slot | None = server.connection_data.pop(key, None)
            if slot is not None:
                slot.release()

    # ----------------------------------------------------------------- outcomes answered at the boundary

    async def command_refused(self, session: GatewaySession, reply: Reply, detail: str | None) -> None:
        """Every policy refusal goes to the audit log (a relay attempt, a spoofed sender, a smuggled message)."""
        if self.door_audit is not None and codes.is_policy_refusal(reply):
            await self.door_audit.refused("smtp", _client_address(session), _signed_in(session), str(reply), detail)

    async def command_failed(self, session: GatewaySession, command: str, error: BaseException) -> None:
        if self.door_audit is not None:
            await self.door_audit.failed("smtp", _client_address(session), _signed_in(session), command,
                                         f"{error.__class__.__name__}")

    # ----------------------------------------------------------------- AUTH

    async def authenticate(self, server: GatewaySMTP, session: GatewaySession, credentials: Credentials) -> Account:
        address = _client_address(session)
        login = _login_of(credentials)
        limiter = self.limits.auth_limiter
        try:
            await limiter.check("smtp", login, address)
        except AuthThrottled as throttled:
            # RFC 4954 6: 454 4.7.0, a temporary failure; the password was not looked at.
            raise MailRefusal(codes.AUTH_LOCKED.format(seconds=throttled.retry_after),
                              detail=f"throttled: {address} / {login}") from None
        account = await self._verify(server, credentials)
        if account is None:
            await limiter.failed("smtp", login, address)
            raise MailRefusal(codes.AUTH_INVALID, detail=f"{credentials.__class__.__name__} for {login or '?'}")
        await limiter.succeeded("smtp", login, address)
        slot = await self.limits.sessions_per_user.acquire(account.address)
        if slot is None:
            # A limit, said as a limit: clients must not conclude the password is wrong (stalwart#190).
            raise MailRefusal(codes.TOO_MANY_SESSIONS.format(who=account.address, limit=self.limits.sessions_per_user.limit))
        server.connection_data["user_slot"] = slot
        if server.closed:
            self.connection_closed(server)
        return account

    def token_error_status(self) -> bytes:
        """The verifier's RFC 7628 3.2.2 error status, which tells the client where to get a new token."""
        if self.token_verifier is None:
            return json.dumps({"status": "invalid_token"}).encode()
        return self.token_verifier.error_status()

    async def _verify(self, server: GatewaySMTP, credentials: Credentials) -> Account | None:
        if isinstance(credentials, PasswordCredentials):
            return await self.directory.authenticate(credentials.login, credentials.password)
        if isinstance(credentials, CertificateCredentials):
            # The connection may predate a revocation: the CRLs as they are now decide (RFC 5280 6.3).
            ssl_object = server.transport.get_extra_info("ssl_object") if server.transport is not None else None
            if self.revocation is not None and self.revocation.peer_is_revoked(ssl_object):
                log.warning("AUTH EXTERNAL refused: certificate %s is revoked", credentials.fingerprint_sha256[:16])
                return None
            account = await self.directory.account_for_certificate(credentials.fingerprint_sha256)
            if account is not None and credentials.authzid and not account.may_send_as(credentials.authzid):
                raise MailRefusal(codes.AUTHZID_REFUSED)               # RFC 4422 A.1
            return account
        if isinstance(credentials, TokenCredentials) and self.token_verifier is not None and credentials.token:
            return await self.token_verifier.account_for_token(credentials.user, credentials.token)
        return None

    # ----------------------------------------------------------------- transaction

    def _origin(self, session: GatewaySession) -> Origin:
        peer = session.peer if isinstance(session.peer, tuple) else (str(session.peer), None)
        return Origin(door=self.door, client_address=str(peer[0]), client_port=peer[1] if len(peer) > 1 else None,
                      helo=session.host_name, tls=session.tls, account=session.identity,
                      auth_mechanism=session.auth_mechanism)

    async def handle_MAIL(self, server: GatewaySMTP, session: GatewaySession, envelope: GatewayEnvelope,
                          path: SmtpPath | None, params: MailParameters) -> Reply:
        envelope.state["transaction"] = await self.pipeline.start_transaction(self._origin(session), path, params)
        return codes.SENDER_OK

    async def handle_RCPT(self, server: GatewaySMTP, session: GatewaySession, envelope: GatewayEnvelope,
                          recipient: RecipientRequest) -> Reply:
        recipient.route = await self.pipeline.add_recipient(_transaction(envelope), recipient.path, recipient.params)
        return codes.RECIPIENT_OK

    async def open_message(self, server: GatewaySMTP, session: GatewaySession, envelope: GatewayEnvelope) -> MessageSink:
        # No file yet: a message kept in memory creates it when it is made durable (gateway.queue.spool).
        return self.pipeline.open_spool()

    async def handle_DATA(self, server: GatewaySMTP, session: GatewaySession, envelope: GatewayEnvelope) -> Reply:
        sink = envelope.sink
        assert isinstance(sink, SpoolFile)
        queue_id = await self.pipeline.accept(_transaction(envelope), sink)
        return codes.QUEUED.format(queue_id=queue_id)

    def abandon_transaction(self, server: GatewaySMTP, envelope: GatewayEnvelope) -> None:
        if envelope.sink is not None:
            envelope.sink.discard()


def _transaction(envelope: GatewayEnvelope) -> Transaction:
    transaction: Any = envelope.state.get("transaction")
    assert isinstance(transaction, Transaction), "RCPT/DATA before an accepted MAIL"
    return transaction


def _client_address(session: GatewaySession) -> str:
    return str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer)


def _signed_in(session: GatewaySession) -> str | None:
    """The authenticated login of the session, if any (``authenticate`` put its account in ``identity``)."""
    address = getattr(session.identity, "address", None)
    return str(address) if address else None


def _login_of(credentials: Credentials) -> str:
    if isinstance(credentials, PasswordCredentials):
        return credentials.login.strip().lower()
    if isinstance(credentials, TokenCredentials):
        return credentials.user.strip().lower()
    return "certificate " + credentials.fingerprint_sha256[:16]

"""The SMTP protocol: aiosmtpd's ``SMTP`` with the parts a health mail operator needs.

This class speaks the protocol and nothing else. Every decision (who may log
in, send as whom, to whom, how much; where the bytes go) belongs to the handler
object it is given (``SmtpHandler``), in aiosmtpd's hook style. What we own here
instead of aiosmtpd:

- the command loop, so every reply carries an enhanced code (RFC 2034/3463),
  TLS and AUTH requirements are one gate per listener kind (RFC 3207 4,
  RFC 4954 6), and a ``MailRefusal`` raised anywhere becomes its reply;
- EHLO from the declared extension list (gateway.smtp.ehlo);
- MAIL/RCPT parameters: SIZE, BODY, SMTPUTF8, AUTH and DSN (RFC 1870, 6152,
  6531, 4954 5, 3461 4);
- AUTH: PLAIN (RFC 4616), LOGIN, EXTERNAL (RFC 4422 A, a verified client
  certificate), OAUTHBEARER (RFC 7628) and XOAUTH2, all checked by the handler;
- DATA streamed to the handler's sink as it arrives: only <CRLF>.<CRLF> ends it
  and a bare CR or LF refuses the message (RFC 5321 2.3.8, 4.1.1.4: no SMTP
  smuggling), dot-unstuffing (RFC 5321
  4.5.2), line-length and size limits enforced while reading, the body read to
  the final dot whatever happens so the session stays in sync (RFC 5321 4.2.5),
  never more than a bounded buffer in memory (aiosmtpd buffers the whole body).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import base64
import binascii
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from gateway.ops.metrics import SMTP_VERBS, timed, verb_label
from gateway.ops.proxied import peer_address
from gateway.pipeline.origin import TlsInfo
from gateway.mail import codes
from gateway.mail.codes import Reply, MailRefusal
from gateway.smtp.body import BodyReader, BodyReading
from gateway.smtp.ehlo import EhloContext, ehlo_keywords
from gateway.mail.parameters import (
    MailParameters,
    RcptParameters,
    parse_mail_parameters,
    parse_rcpt_parameters,
    reply_for_size,
)
from gateway.mail.paths import SmtpPath, parse_path, split_path_argument
from gateway.security import sasl

log = logging.getLogger("gateway.smtp")

COMMAND_LINE_LIMIT = 512           # RFC 5321 4.5.3.1.4
PARAMETER_LINE_LIMIT = 2048        # MAIL/RCPT with SIZE, BODY, DSN parameters (RFC 5321 4.5.3.1.4 allows more)
AUTH_LINE_LIMIT = 12288            # RFC 4954 4: AUTH command lines up to 12288 octets
BEFORE_TLS = frozenset({"EHLO", "HELO", "NOOP", "QUIT", "RSET", "STARTTLS"})   # RFC 3207 4
NEED_AUTH = frozenset({"MAIL", "RCPT", "DATA", "VRFY", "EXPN"})               # RFC 4954 6 (530)
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
TOKEN_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")


class ListenerKind(str, Enum):
    """The three doors. Their rules are here, in one table, not spread in the code."""

    SUBMISSION = "submission"     # RFC 6409, port 587: STARTTLS, then AUTH, then mail
    SUBMISSIONS = "submissions"   # RFC 8314, port 465: implicit TLS, then AUTH, then mail
    RELAY = "relay"               # RFC 5321, port 25 between operators: STARTTLS with a client certificate, no AUTH

    @property
    def implicit_tls(self) -> bool:
        return self is ListenerKind.SUBMISSIONS

    @property
    def auth_offered(self) -> bool:
        return self is not ListenerKind.RELAY

    @property
    def auth_required(self) -> bool:
        return self is not ListenerKind.RELAY

    @property
    def client_certificate_required(self) -> bool:
        return self is ListenerKind.RELAY


@dataclass(frozen=True)
class ProtocolLimits:
    max_message_size: int
    max_line_length: int
    max_errors: int = 10
    max_auth_failures: int = 3
    timeout_seconds: float = 300.0   # RFC 5321 4.5.3.2.7: at least 5 minutes


@dataclass(frozen=True)
class PasswordCredentials:
    mechanism: str
    login: str
    password: str


@dataclass(frozen=True)
class CertificateCredentials:
    """SASL EXTERNAL: the identity is the verified TLS client certificate (RFC 4422 A)."""

    fingerprint_sha256: str
    authzid: str


@dataclass(frozen=True)
class TokenCredentials:
    """OAUTHBEARER (RFC 7628 3.1) or XOAUTH2: a bearer token for ``user``."""

    mechanism: str
    user: str
    token: str


Credentials = PasswordCredentials | CertificateCredentials | TokenCredentials


class GatewaySession(Session):
    """Per-session state (reset by STARTTLS, RFC 3207 4.2)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.tls: TlsInfo | None = None
        self.identity: Any = None            # what the handler's authenticate() returned
        self.auth_mechanism: str | None = None
        self.auth_failures = 0


@dataclass
class RecipientRequest:
    path: SmtpPath
    params: RcptParameters
    route: Any = None                        # set by the handler when it accepts the recipient


class GatewayEnvelope(Envelope):
    """Per-transaction state (reset by RSET, EHLO and the end of DATA)."""

    def __init__(self) -> None:
        super().__init__()
        self.has_sender = False
        self.mail_path: SmtpPath | None = None
        self.mail_params = MailParameters()
        self.recipients: list[RecipientRequest] = []
        self.sink: MessageSink | None = None
        self.size = 0
        self.state: dict[str, Any] = {}      # the handler's own per-transaction data


class MessageSink(Protocol):
    """Where DATA goes as it arrives (a spool file, in the gateway)."""

    def write(self, data: bytes) -> None: ...

    def discard(self) -> None: ...


class SmtpHandler(Protocol):
    """The hooks the protocol calls. Refuse by raising ``MailRefusal``."""

    token_auth_available: bool

    def token_error_status(self) -> bytes: ...

    async def connection_opened(self, server: "GatewaySMTP", session: GatewaySession) -> None: ...

    def connection_closed(self, server: "GatewaySMTP") -> None: ...

    async def authenticate(self, server: "GatewaySMTP", session: GatewaySession, credentials: Credentials) -> Any: ...

    async def handle_MAIL(self, server: "GatewaySMTP", session: GatewaySession, envelope: GatewayEnvelope,
                          path: SmtpPath | None, params: MailParameters) -> Reply: ...

    async def handle_RCPT(self, server: "GatewaySMTP", session: GatewaySession, envelope: GatewayEnvelope,
                          recipient: RecipientRequest) -> Reply: ...

    async def open_message(self, server: "GatewaySMTP", session: GatewaySession, envelope: GatewayEnvelope) -> MessageSink: ...

    async def command_refused(self, session: GatewaySession, reply: Reply, detail: str | None) -> None:
        """After a refusal (any 4xx or 5xx reply) was sent: the handler audits what it must."""

    async def command_failed(self, session: GatewaySession, command: str, error: BaseException) -> None:
        """After a command failed inside the server and was answered 451."""

    async def handle_DATA(self, server: "GatewaySMTP", session: GatewaySession, envelope: GatewayEnvelope) -> Reply: ...

    def abandon_transaction(self, server: "GatewaySMTP", envelope: GatewayEnvelope) -> None: ...


class GatewaySMTP(SMTP):
    """One SMTP connection on one of the three listener kinds."""

    def __init__(self, handler: SmtpHandler, *, kind: ListenerKind, hostname: str,
                 tls_context: ssl.SSLContext | None, limits: ProtocolLimits,
                 disabled_extensions: frozenset[str] = frozenset()) -> None:
        # The stream limit bounds what one read may hold; DATA lines are checked
        # against limits.max_line_length explicitly, AUTH lines may reach 12288.
        self.line_length_limit = max(limits.max_line_length + 3, AUTH_LINE_LIMIT + 2, 16384)
        super().__init__(
            handler, hostname=hostname, tls_context=None if kind.implicit_tls else tls_context,
            enable_SMTPUTF8=True, data_size_limit=limits.max_message_size, timeout=limits.timeout_seconds,
            auth_require_tls=True, ident="ESMTP",
        )
        self.kind = kind
        self.implicit_tls_context = tls_context if kind.implicit_tls else None   # RFC 8314 3.3: TLS from the start
        self.limits = limits
        self.disabled_extensions = disabled_extensions
        self.handler: SmtpHandler = handler
        self.connection_data: dict[str, Any] = {}   # the handler's per-connection data (survives STARTTLS)
        self._errors = 0
        self._closed_notified = False
        self._idle_deadline = 0.0     # loop time after which an idle connection is closed (_reset_timeout)
        self._stopping = False        # SIGTERM: no further command once the running one has its reply
        self._command_running = False
        self._current_verb = "other"     # the verb of the command running (audit of a fault names it)
        self._commands: dict[str, Callable[[str | None], Awaitable[None]]] = {
            "EHLO": self.smtp_EHLO, "HELO": self.smtp_HELO, "STARTTLS": self.smtp_STARTTLS,
            "AUTH": self.smtp_AUTH, "MAIL": self.smtp_MAIL, "RCPT": self.smtp_RCPT, "DATA": self.smtp_DATA,
            "RSET": self.smtp_RSET, "NOOP": self.smtp_NOOP, "QUIT": self.smtp_QUIT, "VRFY": self.smtp_VRFY,
            "EXPN": self.smtp_EXPN, "HELP": self.smtp_HELP,
        }

    # ----------------------------------------------------------------- aiosmtpd plumbing

    def _create_session(self) -> GatewaySession:
        return GatewaySession(self.loop)

    def _create_envelope(self) -> GatewayEnvelope:
        return GatewayEnvelope()

    # Properties here must not raise: aiosmtpd's __init__ reads every attribute (inspect.getmembers).
    @property
    def gsession(self) -> GatewaySession:
        return cast(GatewaySession, self.session)

    @property
    def genvelope(self) -> GatewayEnvelope:
        return cast(GatewayEnvelope, self.envelope)

    def _set_post_data_state(self) -> None:
        """Every end of a transaction (DATA done, RSET, EHLO, disconnect) releases its sink."""
        previous = self.envelope
        if isinstance(previous, GatewayEnvelope):
            self.handler.abandon_transaction(self, previous)
        self.envelope = self._create_envelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The client's address: behind a trusted proxy, the one its PROXY header gave (gateway.ops.proxied).
        peer = peer_address(transport)
        if peer is not None:
            self.gsession.peer = peer  # type: ignore[assignment]  # aiosmtpd says str; it holds the peername tuple
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:   # implicit TLS, or the TLS layer after STARTTLS
            self.gsession.tls = TlsInfo.from_ssl_object(ssl_object)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._notify_closed()

    def _notify_closed(self) -> None:
        if self._closed_notified:
            return
        self._closed_notified = True
        if isinstance(self.envelope, GatewayEnvelope):
            self.handler.abandon_transaction(self, self.envelope)
        self.handler.connection_closed(self)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """RFC 5321 4.5.3.2: the idle timeout starts again. aiosmtpd cancels its timer and schedules a new one
        at every command and data block (a heap entry each, cancelled ones left in the loop's heap); here the
        deadline moves and one timer per connection, when it fires before the deadline, re-arms for the rest."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return                                                     # fires first, then re-arms
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        if self.loop.time() < self._idle_deadline:                     # active since: wait for the rest
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: say why before closing an idle connection.
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"{codes.TIMEOUT}\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def shut_down(self) -> None:
        """The gateway is stopping: a connection waiting for its next command is told 421 and closed now;
        one running a command (a DATA in flight) gets that command's reply first, then the 421."""
        self._stopping = True
        if not self._command_running:
            self.force_shut_down()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def force_shut_down(self) -> None:
        """Say 421 and close now (RFC 5321 3.8: 421 at any time, even mid-DATA); nothing is acknowledged."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"{codes.SERVICE_SHUTTING_DOWN}\r\n".encode())
            transport.close()

    async def reply(self, reply: Reply, *, detail: str | None = None) -> None:
        await self.push(str(reply))
        if reply.code >= 400:   # every refusal, however the command reached it, is the handler's to record
            await self._after(self.handler.command_refused(self.gsession, reply, detail))

    @property
    def tls_active(self) -> bool:
        return getattr(self.session, "tls", None) is not None

    # ----------------------------------------------------------------- command loop

    async def _handle_client(self) -> None:
        if self.implicit_tls_context is not None:
            # RFC 8314 3.3: the handshake is ours (not the event loop's), so a refused one is answered and
            # logged exactly as after STARTTLS.
            try:
                await self._start_tls_layer(self.implicit_tls_context)
            except TLSSetupException as refused:
                self._handshake_refused(refused)
                return
        try:
            await self.handler.connection_opened(self, self.gsession)
        except MailRefusal as refusal:
            await self._refuse_and_close(refusal.reply)
            return
        await self.reply(codes.GREETING.format(hostname=self.hostname))
        while self.transport is not None and not self.transport.is_closing():
            if self._stopping:
                await self._refuse_and_close(codes.SERVICE_SHUTTING_DOWN)
                return
            try:
                await self._one_command()
            except MailRefusal as refusal:
                await self._answer_refusal(refusal)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except TLSSetupException as refused:
                self._handshake_refused(refused)
                return
            except Exception as error:
                log.exception("%r error in SMTP command", self.gsession.peer)
                await self.reply(codes.LOCAL_ERROR)
                await self._after(self.handler.command_failed(self.gsession, self._current_verb, error))

    def _handshake_refused(self, refused: TLSSetupException) -> None:
        """One log line naming the peer, the door and the reason; no traceback (a refusal is not a fault)."""
        log.info("%r %s door: TLS handshake refused: %s", self.session.peer if self.session else None,
                 self.kind.value, handshake_failure_reason(refused.__cause__))
        if self.transport is not None:
            self.transport.close()

    async def _answer_refusal(self, refusal: MailRefusal) -> None:
        if refusal.detail:
            log.info("%r refused: %s (%s)", self.gsession.peer, refusal.reply, refusal.detail)
        if refusal.reply.code == 421:   # RFC 5321 3.8: 421 closes the transmission channel
            await self._refuse_and_close(refusal.reply, detail=refusal.detail)
        else:
            await self.reply(refusal.reply, detail=refusal.detail)

    async def _after(self, hook: Awaitable[None]) -> None:
        """An outcome hook of the handler, once the reply is sent: its failure never ends the session."""
        try:
            await hook
        except Exception:
            log.exception("%r the handler's outcome hook failed", self.gsession.peer)

    async def _refuse_and_close(self, reply: Reply, *, detail: str | None = None) -> None:
        try:
            await self.reply(reply, detail=detail)
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _one_command(self) -> None:
        line = await self._read_command_line()
        if line is None:
            return
        self._command_running = True     # SIGTERM lets it finish (shut_down)
        self._current_verb = verb_label(line.split(b" ", 1)[0].decode("ascii", "replace"), SMTP_VERBS)
        try:
            with timed("smtp", self._current_verb):
                await self._run_command(line)
        finally:
            self._command_running = False

    async def _run_command(self, line: bytes) -> None:
        command, arg = self._split_command(line)
        method = self._commands.get(command)
        if method is None:
            await self._count_error(codes.UNKNOWN_COMMAND.format(command=command[:20]))
            return
        if self._lacks_required_certificate(command):
            # RFC 3207 4.1: the relay door needs a verified client certificate; the TLS layer lets a peer
            # without one in (CERT_OPTIONAL) so it hears why before the connection closes (issue 11 item 10).
            await self._refuse_and_close(codes.CLIENT_CERT_REQUIRED)
            return
        gate = self._gate(command)
        if gate is not None:
            await self._count_error(gate)
            return
        self._reset_timeout()
        await method(arg)

    async def _read_command_line(self) -> bytes | None:
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as overrun:
            await self._discard_long_line(overrun.consumed)
            await self._count_error(codes.LINE_TOO_LONG)
            return None
        line = line.rstrip(b"\r\n")
        if not line:
            await self._count_error(codes.BAD_SYNTAX)
            return None
        verb = line.split(b" ", 1)[0].upper()
        limit = AUTH_LINE_LIMIT if verb == b"AUTH" else PARAMETER_LINE_LIMIT if verb in (b"MAIL", b"RCPT") else COMMAND_LINE_LIMIT
        if len(line) > limit:
            await self._count_error(codes.LINE_TOO_LONG)
            return None
        return line

    async def _discard_long_line(self, consumed: int) -> None:
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as more:
                await self._reader.read(more.consumed)

    def _split_command(self, line: bytes) -> tuple[str, str | None]:
        verb, _, rest = line.partition(b" ")
        try:
            command = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            raise MailRefusal(codes.NON_ASCII_COMMAND) from None
        # RFC 6531 3.3: arguments may be UTF-8; keep undecodable bytes recoverable.
        arg = rest.strip().decode("utf-8", errors="surrogateescape") or None
        return command, arg

    def _lacks_required_certificate(self, command: str) -> bool:
        tls = self.gsession.tls
        return (self.kind.client_certificate_required and tls is not None and not tls.peer_certificate_sha256
                and command != "QUIT")

    def _gate(self, command: str) -> Reply | None:
        """The listener's rules, checked before any command runs."""
        requires_tls = not self.kind.implicit_tls
        if requires_tls and not self.tls_active and command not in BEFORE_TLS:
            return codes.TLS_REQUIRED                                  # RFC 3207 4
        if self.kind.auth_required and not self.gsession.authenticated and command in NEED_AUTH:
            return codes.AUTH_REQUIRED                                 # RFC 4954 6
        return None

    async def _count_error(self, reply: Reply) -> None:
        """RFC 5321 4.2.5 leaves room to drop a client that only sends errors."""
        self._errors += 1
        if self._errors >= self.limits.max_errors:
            await self._refuse_and_close(codes.TOO_MANY_ERRORS)
        else:
            await self.reply(reply)

    # ----------------------------------------------------------------- greeting and housekeeping

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="EHLO needs a domain or address literal"))
        _refuse_control_characters("EHLO", hostname)
        self._set_rset_state()  # type: ignore[no-untyped-call]  # RFC 5321 4.1.4: EHLO resets
        self.gsession.host_name = hostname
        self.gsession.extended_smtp = True
        context = EhloContext(
            tls_active=self.tls_active, starttls_possible=self.tls_context is not None,
            max_message_size=self.limits.max_message_size, auth_mechanisms=self.auth_mechanisms_now(),
        )
        lines = [self.hostname] + ehlo_keywords(context, self.disabled_extensions)
        for line in lines[:-1]:
            await self.push(f"250-{line}")
        await self.push(f"250 {lines[-1]}")

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="HELO needs a domain"))
        _refuse_control_characters("HELO", hostname)
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.gsession.host_name = hostname
        self.gsession.extended_smtp = False
        await self.push(f"250 {self.hostname}")

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(codes.OK)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="RSET takes no argument"))
        self._set_rset_state()  # type: ignore[no-untyped-call]
        await self.reply(codes.OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self.reply(codes.CLOSING)
        if self.transport is not None:
            self.transport.close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.reply(codes.CANNOT_VRFY)          # RFC 5321 3.5.3: no address harvesting

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(codes.NOT_IMPLEMENTED)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.reply(codes.HELP.format(commands=" ".join(sorted(self._commands))))

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="STARTTLS takes no argument"))
        if self.tls_active:
            raise MailRefusal(codes.TLS_ALREADY_ACTIVE)
        if self.tls_context is None:
            raise MailRefusal(codes.TLS_UNAVAILABLE)
        if not self.gsession.host_name:
            raise MailRefusal(codes.SEND_HELO_FIRST)
        await self.reply(codes.READY_TLS)
        await self._start_tls_layer(self.tls_context)

    async def _start_tls_layer(self, context: ssl.SSLContext) -> None:
        """Put a server-side TLS layer under this protocol (RFC 3207 4.2: state is reset afterwards).

        The same moves as aiosmtpd's STARTTLS, whose reply line lacks the enhanced code.
        """
        assert self.transport is not None
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, context, waiter, server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error

    # ----------------------------------------------------------------- AUTH (RFC 4954)

    def auth_mechanisms_now(self) -> tuple[str, ...]:
        """Mechanisms usable on this connection now: only over TLS, only on submission doors."""
        if not self.kind.auth_offered or not self.tls_active or self.gsession.authenticated:
            return ()
        mechanisms = list(PASSWORD_MECHANISMS)
        if self.gsession.tls and self.gsession.tls.peer_certificate_sha256:
            mechanisms.append("EXTERNAL")                              # RFC 4422 A
        if getattr(self.handler, "token_auth_available", False):
            mechanisms.extend(TOKEN_MECHANISMS)                        # RFC 7628
        return tuple(mechanisms)

    async def smtp_AUTH(self, arg: str | None) -> None:
        session = self.gsession
        if not self.kind.auth_offered:
            raise MailRefusal(codes.NOT_IMPLEMENTED)
        if not session.extended_smtp:
            raise MailRefusal(codes.SEND_HELO_FIRST)
        if not self.tls_active:
            raise MailRefusal(codes.ENCRYPTION_REQUIRED)
        if session.authenticated:
            raise MailRefusal(codes.ALREADY_AUTHENTICATED)
        if self.genvelope.has_sender:
            raise MailRefusal(codes.AUTH_NOT_IN_TRANSACTION)
        mechanism, initial = self._split_auth_argument(arg)
        if mechanism not in self.auth_mechanisms_now():
            raise MailRefusal(codes.UNKNOWN_MECHANISM)
        credentials = await self._read_credentials(mechanism, initial)
        if credentials is None:
            return
        try:
            identity = await self.handler.authenticate(self, session, credentials)
        except MailRefusal as refusal:
            await self._auth_failed(refusal, mechanism)
            return
        session.authenticated = True
        session.identity = identity
        session.auth_data = identity
        session.auth_mechanism = mechanism
        await self.reply(codes.AUTH_OK)

    async def _auth_failed(self, refusal: MailRefusal, mechanism: str) -> None:
        if mechanism == "OAUTHBEARER" and refusal.reply.code == 535:
            # RFC 7628 3.2.2: an error challenge first; the client answers with a dummy ^A.
            status = self.handler.token_error_status()              # the verifier's, naming its issuer
            await self.push("334 " + base64.b64encode(status).decode())
            await self._reader.readuntil(b"\n")
        self.gsession.auth_failures += 1
        if self.gsession.auth_failures >= self.limits.max_auth_failures and refusal.reply.code != 421:
            await self.reply(refusal.reply)
            raise MailRefusal(codes.TOO_MANY_AUTH_FAILURES)
        raise refusal

    @staticmethod
    def _split_auth_argument(arg: str | None) -> tuple[str, str | None]:
        parts = (arg or "").split()
        if not 1 <= len(parts) <= 2:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="AUTH mechanism [initial-response]"))
        return parts[0].upper(), parts[1] if len(parts) == 2 else None

    async def _sasl_response(self, initial: str | None, challenge: bytes = b"") -> bytes | None:
        """The client's response: the initial one (RFC 4954 4, "=" is empty) or one read after a 334."""
        if initial is not None:
            text = "" if initial == "=" else initial
        else:
            await self.push("334 " + base64.b64encode(challenge).decode())
            line = await self._reader.readuntil(b"\n")
            text = line.strip().decode("ascii", errors="replace")
            if text == "*":                                            # RFC 4954 4: client cancels
                await self.reply(codes.AUTH_ABORTED)
                return None
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            await self.reply(codes.AUTH_BAD_BASE64)
            return None

    async def _read_credentials(self, mechanism: str, initial: str | None) -> Credentials | None:
        readers = {
            "PLAIN": self._read_plain, "LOGIN": self._read_login, "EXTERNAL": self._read_external,
            "OAUTHBEARER": self._read_oauthbearer, "XOAUTH2": self._read_xoauth2,
        }
        return await readers[mechanism](initial)

    async def _read_plain(self, initial: str | None) -> Credentials | None:
        response = await self._sasl_response(initial)
        if response is None:
            return None
        try:
            plain = sasl.decode_plain(response)                        # RFC 4616 2
        except sasl.SaslMalformed:
            raise MailRefusal(codes.AUTH_BAD_RESPONSE) from None
        if plain.authzid_differs():
            raise MailRefusal(codes.AUTHZID_REFUSED)
        return PasswordCredentials("PLAIN", plain.authcid, plain.password)

    async def _read_login(self, initial: str | None) -> Credentials | None:
        # draft-murchison-sasl-login: "Username:" then "Password:" challenges.
        login = await self._sasl_response(initial, b"Username:")
        if login is None:
            return None
        password = await self._sasl_response(None, b"Password:")
        if password is None:
            return None
        answer = sasl.decode_login(login, password)
        return PasswordCredentials("LOGIN", answer.authcid, answer.password)

    async def _read_external(self, initial: str | None) -> Credentials | None:
        response = await self._sasl_response(initial)
        if response is None:
            return None
        tls = self.gsession.tls
        if tls is None or tls.peer_certificate_sha256 is None:
            raise MailRefusal(codes.AUTH_NO_CERTIFICATE)
        return CertificateCredentials(tls.peer_certificate_sha256, sasl.decode_external(response))   # RFC 4422 A.1

    async def _read_oauthbearer(self, initial: str | None) -> Credentials | None:
        response = await self._sasl_response(initial)
        if response is None:
            return None
        bearer = sasl.decode_oauthbearer(response)                     # RFC 7628 3.1
        return TokenCredentials("OAUTHBEARER", bearer.user, bearer.token)

    async def _read_xoauth2(self, initial: str | None) -> Credentials | None:
        response = await self._sasl_response(initial)
        if response is None:
            return None
        bearer = sasl.decode_xoauth2(response)
        return TokenCredentials("XOAUTH2", bearer.user, bearer.token)

    # ----------------------------------------------------------------- the mail transaction

    async def smtp_MAIL(self, arg: str | None) -> None:
        session, envelope = self.gsession, self.genvelope
        if not session.host_name:
            raise MailRefusal(codes.SEND_HELO_FIRST)
        if envelope.has_sender:
            raise MailRefusal(codes.BAD_SEQUENCE.format(detail="nested MAIL command"))
        path_text, param_text = split_path_argument(_strip_keyword("FROM:", arg))
        if param_text and not session.extended_smtp:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="parameters need EHLO"))
        params = parse_mail_parameters(param_text)
        path = parse_path(path_text, allow_null=True)
        too_big = reply_for_size(params.size, self.limits.max_message_size, codes.SIZE_EXCEEDED)
        if too_big is not None:
            raise MailRefusal(too_big)                                 # RFC 1870 6.1
        if path is not None and not path.is_ascii and not params.smtputf8:
            raise MailRefusal(codes.SMTPUTF8_NOT_ANNOUNCED)            # RFC 6531 3.7.4.1
        reply = await self.handler.handle_MAIL(self, session, envelope, path, params)
        envelope.has_sender = True
        envelope.mail_path = path
        envelope.mail_params = params
        envelope.mail_from = path.address if path else ""
        envelope.smtp_utf8 = params.smtputf8
        await self.reply(reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        session, envelope = self.gsession, self.genvelope
        if not envelope.has_sender:
            raise MailRefusal(codes.BAD_SEQUENCE.format(detail="need MAIL before RCPT"))
        path_text, param_text = split_path_argument(_strip_keyword("TO:", arg))
        if param_text and not session.extended_smtp:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="parameters need EHLO"))
        params = parse_rcpt_parameters(param_text)
        path = parse_path(path_text, allow_null=False, allow_postmaster=True)   # RFC 5321 4.5.1
        assert path is not None
        if not path.is_ascii and not envelope.mail_params.smtputf8:
            raise MailRefusal(codes.SMTPUTF8_NOT_ANNOUNCED)
        recipient = RecipientRequest(path, params)
        reply = await self.handler.handle_RCPT(self, session, envelope, recipient)
        envelope.recipients.append(recipient)
        envelope.rcpt_tos.append(path.address)
        await self.reply(reply)

    async def smtp_DATA(self, arg: str | None) -> None:
        session, envelope = self.gsession, self.genvelope
        if arg:
            raise MailRefusal(codes.SYNTAX_PARAMS.format(detail="DATA takes no argument"))
        if not envelope.has_sender:
            raise MailRefusal(codes.BAD_SEQUENCE.format(detail="need MAIL before DATA"))
        if not envelope.recipients:
            raise MailRefusal(codes.NO_VALID_RECIPIENTS)               # RFC 5321 3.3
        envelope.sink = await self.handler.open_message(self, session, envelope)
        await self.reply(codes.START_DATA)
        try:
            reading = await self._receive_body(envelope.sink)
            envelope.size = reading.size
            if reading.problem is not None:
                log.info("%r message refused while reading DATA: %s", session.peer, reading.problem)
            reply = reading.problem or await self._finish_data(session, envelope)
        finally:
            self._set_post_data_state()
        await self.reply(reply)

    async def _finish_data(self, session: GatewaySession, envelope: GatewayEnvelope) -> Reply:
        try:
            return await self.handler.handle_DATA(self, session, envelope)
        except MailRefusal as refusal:
            log.info("%r message from <%s> refused: %s%s", session.peer, envelope.mail_from, refusal.reply,
                     f" ({refusal.detail})" if refusal.detail else "")
            return refusal.reply

    async def _receive_body(self, sink: MessageSink) -> BodyReading:
        """Read to the lone dot, unstuffing and checking as we go (RFC 5321 4.5.2, 4.5.3.1.6; gateway.smtp.body)."""
        return await BodyReader(self._reader, sink, max_line_length=self.limits.max_line_length,
                                max_message_size=self.limits.max_message_size,
                                stream_limit=self.line_length_limit, on_flush=self._reset_timeout).read()


def handshake_failure_reason(error: BaseException | None) -> str:
    """Why a TLS handshake failed, in a few words: OpenSSL's reason and, for a certificate, its verdict."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return (error.reason or str(error)).replace("_", " ").lower()
    if isinstance(error, (ConnectionError, TimeoutError)):
        return f"{type(error).__name__}: the client left during the handshake"
    return f"{type(error).__name__}: {error}" if error is not None else "unknown"


def _refuse_control_characters(command: str, argument: str) -> None:
    """RFC 5321 4.1.1.1: the EHLO/HELO argument is a domain or an address literal; it is copied into the
    Received field (RFC 5321 4.4), where a CR or another control character would forge header lines."""
    if any(ord(c) < 32 or ord(c) == 127 for c in argument):
        raise MailRefusal(codes.SYNTAX_PARAMS.format(detail=f"{command} argument holds a control character"))


def _strip_keyword(keyword: str, arg: str | None) -> str:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        raise MailRefusal(codes.SYNTAX_PARAMS.format(detail=f"expected {keyword}<address>"))
    return arg[len(keyword):].strip()


"""The IMAP listeners on asyncio: STARTTLS (port 143 style) and implicit TLS (port 993 style).

One task per connection runs ``connection_loop``: greeting, then read a
command (``protocol.reader``, literals and limits included), let the
``Session`` execute it, flush, repeat.  Time limits:

- a connection that has not logged in gets ``pre_auth_timeout`` seconds per
  command (half-open and idle scanners do not hold sockets for long);
- an authenticated one gets ``autologout_seconds`` (RFC 3501 5.4: at least 30
  minutes); IDLE has its own limit (``commands.idle``);
- a client that stops reading gets ``write_timeout`` seconds to drain.

The per-user connection limit is generous (Thunderbird opens about five) and
refused as a limit (``NO [LIMIT]``), never as a wrong password (stalwart#190).
Every log line carries the connection id and, once known, the user (mox#30).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections import Counter
from dataclasses import dataclass, field

from gateway.imap.protocol import response
from gateway.imap.protocol.errors import ImapError
from gateway.imap.protocol.reader import (
    ClientDisconnected, CommandReader, ContinuationRequest, RawCommand, ReaderLimits, pre_auth_limits,
)
from gateway.imap.session import Session, SessionContext, State
from gateway.ops.metrics import CONNECTIONS, IMAP_VERBS, timed, verb_label
from gateway.ops.proxied import ImplicitTls, ProxyGuard, open_listener, peer_address, stream_factory
from gateway.pipeline.limits import ConcurrencyLimiter, Slot

log = logging.getLogger("gateway.imap")
_connection_numbers = itertools.count(1)
FLUSH_OCTETS = 64 * 1024         # queued responses handed to the transport at once beyond this
DRAIN_ABOVE_OCTETS = 64 * 1024   # asyncio's default high-water mark: below it, drain() has nothing to wait for


@dataclass(frozen=True)
class ImapServerConfig:
    """Where to listen and how long to wait; built from settings by ``listeners``."""

    host: str
    starttls_port: int
    implicit_tls_port: int
    tls_context: ssl.SSLContext
    max_connections: int = 2000
    pre_auth_timeout: float = 60.0
    autologout_seconds: float = 30 * 60.0
    write_timeout: float = 60.0
    tls_handshake_timeout: float = 30.0
    reader_limits: ReaderLimits = field(default_factory=ReaderLimits)          # once logged in
    pre_auth_reader_limits: ReaderLimits = field(default_factory=pre_auth_limits)  # before: small literals only
    max_unauthenticated_per_ip: int = 20     # connections of one address not (yet) logged in
    proxy: ProxyGuard | None = None          # listen.proxy_protocol_from: HAProxy's PROXY header believed from them


class UserConnectionLimiter:
    """Counts authenticated connections per user; ``acquire`` fails beyond ``limit``."""

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()

    def acquire(self, user: str) -> bool:
        if self._counts[user] >= self.limit:
            return False
        self._counts[user] += 1
        return True

    def release(self, user: str) -> None:
        self._counts[user] -= 1
        if self._counts[user] <= 0:
            del self._counts[user]

    def count(self, user: str) -> int:
        return self._counts[user]


class ImapConnection:
    """One client's byte stream: commands in, responses out, and the STARTTLS upgrade."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: ImapServerConfig) -> None:
        self.stream = reader
        self.writer = writer
        self.config = config
        self.limits = config.pre_auth_reader_limits
        self.commands = CommandReader(reader, self.limits)
        self.pre_auth_slot: Slot | None = None     # this address's unauthenticated connections (released at login)
        self.stopping = False       # the server is shutting down: BYE once the running command has its reply
        self.command_running = False
        self.said_bye = False
        self._pending: list[bytes] = []             # responses written, not yet handed to the transport
        self._pending_octets = 0

    @property
    def is_tls(self) -> bool:
        return self.writer.get_extra_info("ssl_object") is not None

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        value = self.writer.get_extra_info("ssl_object")
        return value if isinstance(value, ssl.SSLObject) else None

    @property
    def peer_ip(self) -> str:
        peer = peer_address(self.writer)      # behind a trusted proxy: the client its PROXY header named
        return peer[0] if peer is not None else "?"

    @property
    def peer(self) -> str:
        peer = peer_address(self.writer)
        return f"{peer[0]}:{peer[1]}" if peer is not None else "?"

    def write(self, data: bytes) -> None:
        """Queue ``data``; it goes out at the next ``drain`` (or once ``FLUSH_OCTETS`` are waiting), so the
        untagged lines and the tagged reply of a command leave in one TLS record and one send, not one each."""
        self._pending.append(data)
        self._pending_octets += len(data)
        if self._pending_octets >= FLUSH_OCTETS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        self._pending_octets = 0
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        """Send what is queued, then wait (at most ``write_timeout``) while the client is slow to read."""
        self._flush()
        transport = self.writer.transport
        if not transport.is_closing() and transport.get_write_buffer_size() < DRAIN_ABOVE_OCTETS:
            return      # nothing backed up: StreamWriter.drain would return at once (no timer, no task)
        await asyncio.wait_for(self.writer.drain(), self.config.write_timeout)

    async def read_command(self) -> RawCommand:
        return await self.commands.read_command(self._continue)

    async def _continue(self, request: ContinuationRequest) -> None:
        """RFC 3501 7.5: ask for a synchronising literal."""
        self.write(response.continuation("Ready for literal data"))
        await self.drain()

    async def read_line(self) -> bytes:
        return await self.commands.read_line()

    def discard_buffered_input(self) -> int:
        """Forget anything read but not yet used (RFC 3501 6.2.1: nothing pipelined survives STARTTLS).

        Reading is paused here, before the OK goes out: otherwise the client's
        ClientHello, sent as soon as it reads the OK, could be taken in as
        plain data before ``start_tls`` installs the TLS layer, and the
        handshake would hang.  ``start_tls`` resumes reading on the TLS transport.
        """
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()
        dropped = self.commands.assembler.buffered
        self.commands = CommandReader(self.stream, self.limits)
        return dropped

    def logged_in(self) -> None:
        """The client is known now: the full limits (APPEND literals) apply, and it no longer counts
        against its address's unauthenticated connections."""
        if self.limits is not self.config.reader_limits:
            self.limits = self.config.reader_limits
            self.commands.assembler.limits = self.limits
        if self.pre_auth_slot is not None:
            self.pre_auth_slot.release()

    async def start_tls(self) -> None:
        await self.writer.start_tls(self.config.tls_context,
                                    ssl_handshake_timeout=self.config.tls_handshake_timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._flush()
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 5)


class ImapServer:
    """Owns the listening sockets and the connection tasks."""

    def __init__(self, config: ImapServerConfig, context: SessionContext) -> None:
        self.config = config
        self.context = context
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self._open: dict[asyncio.Task[None], ImapConnection] = {}
        # The same limiter as SMTP's per-address connections; here it counts connections not logged in,
        # so one address cannot hold every socket while colleagues behind one NAT still all log in.
        self.unauthenticated_per_ip = ConcurrencyLimiter(config.max_unauthenticated_per_ip)

    async def start(self) -> list[asyncio.Server]:
        connections = stream_factory(self._serve)
        plain = await open_listener(connections, self.config.host, self.config.starttls_port,
                                    guard=self.config.proxy, door="imap")
        self.servers.append(plain)
        implicit = await open_listener(connections, self.config.host, self.config.implicit_tls_port,
                                       guard=self.config.proxy, door="imaps",
                                       tls=ImplicitTls(self.config.tls_context, self.config.tls_handshake_timeout))
        self.servers.append(implicit)
        for server in self.servers:
            log.info("IMAP listening on %s", ", ".join(str(s.getsockname()[:2]) for s in server.sockets))
        return self.servers

    def addresses(self) -> list[tuple[str, int]]:
        return [server.sockets[0].getsockname()[:2] for server in self.servers]

    async def close(self, grace_seconds: float = 0.0) -> None:
        """Stop listening; RFC 3501 7.1.5: every client hears ``* BYE`` (one waiting for a command or in IDLE
        at once, one running a command once it has its tagged reply, within ``grace_seconds``)."""
        for server in self.servers:
            server.close()
        for task, connection in list(self._open.items()):
            connection.stopping = True
            if not connection.command_running:
                _bye_and_cancel(task, connection)
        pending = set(self.connections)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace_seconds)
        for task in pending:
            _bye_and_cancel(task, self._open.get(task))
        if pending:
            await asyncio.wait(pending, timeout=10)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        CONNECTIONS.labels("imap").inc()
        connection = ImapConnection(reader, writer, self.config)
        self._open[task] = connection
        try:
            refusal = self._over_limit(connection)
            if refusal is not None:
                # RFC 3501 7.1.5: BYE as the greeting, with the reason, then close.
                connection.write(response.bye(refusal))
                await connection.drain()
                await self._audit_refused_connection(connection, refusal)
                return
            await connection_loop(connection, self.context, self.config)
        except Exception as error:
            log.exception("IMAP connection from %s failed", connection.peer)
            if self.context.door_audit is not None:
                await self.context.door_audit.failed("imap", connection.peer_ip, None, "connection",
                                                     error.__class__.__name__)
        finally:
            if connection.pre_auth_slot is not None:
                connection.pre_auth_slot.release()
            self.connections.discard(task)
            self._open.pop(task, None)
            await connection.close()

    async def _audit_refused_connection(self, connection: ImapConnection, refusal: str) -> None:
        """A connection refused by a cap is a policy refusal (as SMTP's 421 4.7.0): folded per address."""
        if self.context.door_audit is not None:
            await self.context.door_audit.refused("imap", connection.peer_ip, None, f"BYE {refusal}",
                                                  reason="connection-limit", command="connect")

    def _over_limit(self, connection: ImapConnection) -> str | None:
        if len(self.connections) > self.config.max_connections:
            return "Too many connections, try again later"
        connection.pre_auth_slot = self.unauthenticated_per_ip.try_acquire(connection.peer_ip)
        if connection.pre_auth_slot is None:
            log.warning("IMAP connection from %s refused: %d connections of that address not logged in",
                        connection.peer, self.unauthenticated_per_ip.limit)
            return (f"Too many connections from {connection.peer_ip} not logged in "
                    f"(limit {self.unauthenticated_per_ip.limit}), try again later")
        return None


async def connection_loop(connection: ImapConnection, context: SessionContext, config: ImapServerConfig) -> None:
    """Greeting, then commands until LOGOUT, a timeout, a fatal error or the client leaving."""
    session = Session(connection, context, f"C{next(_connection_numbers)}")
    session.log.info("connection from %s (%s)", connection.peer, "TLS" if connection.is_tls else "plain")
    try:
        # RFC 3501 7.1.1 greeting, with the capabilities (saves clients a round trip).
        connection.write(response.greeting(f"{context.settings.hostname} IMAP4rev1 ready", session.capabilities()))
        await connection.drain()
        await _command_loop(connection, session, config)
    except (ClientDisconnected, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        session.log.info("client went away")
    except TimeoutError:
        session.log.info("client stopped reading")
    finally:
        session.close()
        session.log.info("connection closed")


async def _command_loop(connection: ImapConnection, session: Session, config: ImapServerConfig) -> None:
    while session.state is not State.LOGOUT:
        timeout = config.pre_auth_timeout if session.account is None else config.autologout_seconds
        try:
            async with asyncio.timeout(timeout):     # no task per command, unlike wait_for on Python 3.11
                raw = await connection.read_command()
        except TimeoutError:
            # RFC 3501 5.4: the autologout timer; BYE says why before closing.
            connection.write(response.bye("Autologout; idle for too long"))
            await connection.drain()
            return
        except ImapError as error:
            connection.write(error.response())
            await session.audit_refusal(error, error.verb or "?")
            if error.fatal:
                connection.write(response.bye("Protocol error, closing"))
                await connection.drain()
                return
            await connection.drain()
            continue
        connection.command_running = not _is_idle(raw)     # shutting down: IDLE is ended, others finish
        try:
            with timed("imap", _verb(raw)):
                await session.execute(raw)
        finally:
            connection.command_running = False
        if session.account is not None:
            connection.logged_in()
        await connection.drain()
        if connection.stopping and not connection.said_bye:
            connection.said_bye = True
            connection.write(response.bye(SHUTTING_DOWN))
            await connection.drain()
            return


SHUTTING_DOWN = "Server shutting down, try again later"


def _verb(raw: RawCommand) -> str:
    words = raw.data.split(None, 2)
    return verb_label(words[1].decode("ascii", "replace"), IMAP_VERBS) if len(words) >= 2 else "other"


def _is_idle(raw: RawCommand) -> bool:
    return _verb(raw) == "IDLE"


def _bye_and_cancel(task: asyncio.Task[None], connection: ImapConnection | None) -> None:
    """RFC 3501 7.1.5: BYE says why the server closes; written before the task ends, flushed by its close."""
    if connection is not None and not connection.said_bye:
        connection.said_bye = True
        connection.write(response.bye(SHUTTING_DOWN))
    task.cancel()

"""Listening behind HAProxy: the PROXY protocol header read before the listener's protocol (and before TLS).

``open_listener(factory, host, port, guard=..., door=..., tls=...)`` replaces ``loop.create_server`` for every
client-facing listener (SMTP's three doors, IMAP and IMAPS, HTTPS). With ``listen.proxy_protocol_from``
empty (the default) it *is* ``loop.create_server``. Otherwise each accepted connection first meets a
``_HeaderReader``:

- from an address outside ``listen.proxy_protocol_from``: the connection is handed over at once, untouched,
  as the client (a ``PROXY ...`` line it sends is then only bytes of the listener's protocol: SMTP answers it
  as an unknown command); HAProxy's spec, section 2: a header is never believed from anyone but a proxy;
- from a trusted proxy: the header must arrive complete and valid within
  ``listen.proxy_protocol_timeout_seconds``, else the connection is closed, logged and audited
  (``door_refused``, folded like the doors' other refusals) with the reason; once read, the listener's protocol (behind a TLS layer on
  implicit-TLS ports: the header comes before the ClientHello) gets a transport whose ``peername`` is the
  client HAProxy saw, and the bytes that followed the header.

``peer_address(transport)`` is the one function the front ends read the client's address with (limits,
logs, audit, Received:): whatever they hold, a stream writer, an aiohttp request's transport or an
aiosmtpd one, it answers the client's (host, port).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from gateway.ops.proxy_protocol import Address, ProxyHeaderError, parse_header

log = logging.getLogger("gateway.proxy")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ProtocolFactory = Callable[[], asyncio.BaseProtocol]


# ------------------------------------------------------------------ the one way to read a client's address

class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def peer_address(holder: _HasExtraInfo | None) -> Address | None:
    """The client's (host, port): the PROXY header's source behind a trusted proxy, else the socket's peer.
    ``holder`` is a transport or a stream writer (anything with ``get_extra_info``)."""
    peer = holder.get_extra_info("peername") if holder is not None else None
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        return _plain_host(str(peer[0])), int(peer[1])
    return None


def peer_host(holder: _HasExtraInfo | None) -> str | None:
    """The client's IP address as text (None for a Unix socket or a closed transport)."""
    address = peer_address(holder)
    return address[0] if address is not None else None


def _plain_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# ------------------------------------------------------------------ who is believed

class RefusalSink(Protocol):
    """Where refused headers are recorded (the audit log, in ``gateway serve``)."""

    async def header_refused(self, door: str, proxy: str, reason: str) -> None: ...


@dataclass
class ProxyGuard:
    """The trusted proxies (``listen.proxy_protocol_from``) and what to do with a refused header."""

    networks: tuple[Network, ...] = ()
    timeout_seconds: float = 5.0
    refusals: RefusalSink | None = None
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def from_networks(cls, networks: Iterable[str], timeout_seconds: float = 5.0,
                      refusals: RefusalSink | None = None) -> ProxyGuard:
        return cls(tuple(ipaddress.ip_network(text, strict=False) for text in networks), timeout_seconds, refusals)

    @property
    def enabled(self) -> bool:
        return bool(self.networks)

    def trusts(self, peer: Any) -> bool:
        """Is this socket peer one of our proxies? (Only then is a header read and believed.)"""
        if not isinstance(peer, (tuple, list)) or not peer:
            return False
        try:
            address = ipaddress.ip_address(_plain_host(str(peer[0])))
        except ValueError:
            return False
        return any(address.version == network.version and address in network for network in self.networks)

    def refused(self, door: str, proxy: str, reason: str) -> None:
        """Log now; audit in the background (the connection is closed either way)."""
        log.warning("%s listener: connection from proxy %s closed: PROXY header refused: %s", door, proxy, reason)
        if self.refusals is None:
            return
        task = asyncio.get_running_loop().create_task(self._record(door, proxy, reason))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record(self, door: str, proxy: str, reason: str) -> None:
        assert self.refusals is not None
        try:
            await self.refusals.header_refused(door, proxy, reason)
        except Exception:  # noqa: BLE001  (the refusal stands; its missing trace is said loudly)
            log.exception("%s listener: refused PROXY header from %s could not be audited", door, proxy)


@dataclass(frozen=True)
class ImplicitTls:
    """TLS from the first byte after the header (SMTPS, IMAPS, HTTPS)."""

    context: ssl.SSLContext
    handshake_timeout: float | None = None


SHARED_LISTEN_BACKLOG = 100     # a shared listening socket's queue of connections not accepted yet (asyncio's default)


async def open_listener(factory: ProtocolFactory, host: str, port: int, *, guard: ProxyGuard | None, door: str,
                        tls: ImplicitTls | None = None, reuse_address: bool = True,
                        sock: socket.socket | None = None) -> asyncio.Server:
    """``loop.create_server`` for a client-facing listener, reading PROXY headers from trusted proxies.
    ``sock``: a listening socket bound already, which other processes accept on too (the SMTP acceptor
    processes, gateway.smtp.acceptors), instead of ``host`` and ``port``. Such a socket is accepted from one
    connection per wake-up: asyncio's ``backlog`` is also how many connections it accepts in a row when the
    socket is readable, so a burst of connections all went to whichever process woke first (a connection
    accepted is kept for the whole session); one at a time, the process that is free first takes the next."""
    loop = asyncio.get_running_loop()
    where: dict[str, Any] = {"sock": sock, "backlog": 1} if sock is not None else {
        "host": host, "port": port, "reuse_address": reuse_address}
    if guard is None or not guard.enabled:
        server = await loop.create_server(factory, ssl=tls.context if tls else None,
                                          ssl_handshake_timeout=tls.handshake_timeout if tls else None, **where)
    else:
        server = await loop.create_server(lambda: _HeaderReader(factory, guard, door, tls), **where)
    if sock is not None:
        sock.listen(SHARED_LISTEN_BACKLOG)     # create_server said listen(1): the kernel's queue as it was bound
    return server


def stream_factory(connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                   limit: int = 2 ** 16) -> ProtocolFactory:
    """What ``asyncio.start_server`` builds for each connection, for ``open_listener``."""
    def build() -> asyncio.BaseProtocol:
        loop = asyncio.get_running_loop()
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=limit, loop=loop), connected, loop=loop)
    return build


# ------------------------------------------------------------------ the header, before anything else

class _HeaderReader(asyncio.Protocol):
    """The first protocol of a connection on a listener behind proxies: reads the header, then hands over."""

    def __init__(self, factory: ProtocolFactory, guard: ProxyGuard, door: str, tls: ImplicitTls | None) -> None:
        self.factory = factory
        self.guard = guard
        self.door = door
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if not self.guard.trusts(peer):
            # Not a proxy: the connection is its own client; what it sends is its protocol's business.
            self._hand_over(transport, b"")
            return
        self.timer = asyncio.get_running_loop().call_later(self.guard.timeout_seconds, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        try:
            header = parse_header(self.buffer)
        except ProxyHeaderError as error:
            self._refuse(error.reason)
            return
        if header is None:
            return
        assert self.transport is not None
        real = self.transport.get_extra_info("peername")
        client = header.client or (_plain_host(str(real[0])), int(real[1]))
        log.debug("%s listener: proxy %s says client %s:%d (%s)", self.door, real[0], *client, header.note)
        self._hand_over(ProxiedTransport(self.transport, client), bytes(self.buffer[header.length:]))

    def eof_received(self) -> bool:
        if not self.done:
            self._refuse("the proxy closed the connection before a complete header")
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self._stop_timer()
        self.done = True

    def _timed_out(self) -> None:
        if not self.done:
            received = f" ({len(self.buffer)} bytes received)" if self.buffer else ""
            self._refuse(f"no complete header within {self.guard.timeout_seconds:g} seconds{received}")

    def _refuse(self, reason: str) -> None:
        """2.1: "Any sequence which does not exactly match the protocol must be discarded and cause the
        receiver to abort the connection"."""
        self.done = True
        self._stop_timer()
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        self.guard.refused(self.door, str(peer[0]) if peer else "?", reason)
        self.transport.abort()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _hand_over(self, transport: asyncio.Transport, rest: bytes) -> None:
        """The listener's protocol (behind TLS when implicit) takes the connection; ``rest`` follows."""
        self.done = True
        self._stop_timer()
        assert self.transport is not None
        protocol = self.factory()
        if self.tls is not None:
            waiter = asyncio.get_running_loop().create_future()
            waiter.add_done_callback(_retrieve)
            protocol = sslproto.SSLProtocol(asyncio.get_running_loop(), protocol, self.tls.context, waiter,
                                            server_side=True,
                                            ssl_handshake_timeout=self.tls.handshake_timeout)  # type: ignore[arg-type]
        self.transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if rest:
            # After the tasks connection_made started (SMTPS puts its TLS layer in place there), before any
            # further read: the event loop runs callbacks in the order they were scheduled.
            asyncio.get_running_loop().call_soon(_feed, self.transport, rest)


def _retrieve(waiter: asyncio.Future[None]) -> None:
    """A refused handshake is the client's problem, already answered by the TLS layer: note it, no traceback."""
    if not waiter.cancelled() and waiter.exception() is not None:
        log.info("TLS handshake refused: %s", waiter.exception())


def _feed(transport: asyncio.Transport, data: bytes) -> None:
    """Give ``data`` to whatever protocol reads the connection now."""
    if transport.is_closing():
        return
    protocol = transport.get_protocol()
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


class ProxiedTransport(asyncio.Transport):
    """The accepted connection's transport, seen as the client HAProxy saw: ``peername`` is the header's
    source (``proxy_peername`` the proxy's own address); everything else is the real transport's."""

    _start_tls_compatible = True      # STARTTLS (loop.start_tls) works over it as over the real one

    def __init__(self, transport: asyncio.Transport, client: Address) -> None:
        super().__init__()
        self._real = transport
        self._client = client

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._client
        if name == "proxy_peername":
            return self._real.get_extra_info("peername", default)
        return self._real.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        # Private parts asyncio's TLS layer reaches for (_force_close on a fatal error).
        if name == "_real":   # not set yet (copy, repr during __init__): no recursion
            raise AttributeError(name)
        return getattr(self._real, name)

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def close(self) -> None:
        self._real.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._real.get_protocol()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._real.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._real.writelines(list_of_data)

    def write_eof(self) -> None:
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def abort(self) -> None:
        self._real.abort()


# ------------------------------------------------------------------ refusals go to the audit log

AUDIT_DOORS = {"smtp_submission": "smtp", "smtp_submissions": "smtp", "smtp_relay": "smtp",
               "imap": "imap", "imaps": "imap", "https": "https"}


class DoorRefusals:
    """Refused headers as the doors' other refusals (``door_refused``, security/door_audit.py): the same
    refusal from the same proxy is written once per window with the count of those folded into it, so a
    misconfigured or hostile proxy cannot flood the chain."""

    def __init__(self, door_audit: Any) -> None:
        self.door_audit = door_audit

    async def header_refused(self, door: str, proxy: str, reason: str) -> None:
        try:
            ip: str | None = str(ipaddress.ip_address(proxy))
        except ValueError:
            ip = None
        await self.door_audit.refused(AUDIT_DOORS.get(door, "system"), ip, None,
                                      f"connection closed: PROXY header refused: {reason}", f"listener {door}")


def proxy_guard(services: Any, settings: Any) -> ProxyGuard:
    """The guard of a listener group of ``gateway serve``: ``listen.proxy_protocol_from``, refusals audited
    through ``services.door_audit`` (when the services have one)."""
    door_audit = getattr(services, "door_audit", None)
    return ProxyGuard.from_networks(settings.listen.proxy_protocol_from, settings.listen.proxy_protocol_timeout_seconds,
                                    DoorRefusals(door_audit) if door_audit is not None else None)


# ------------------------------------------------------------------ aiohttp: the HTTPS listener

class ProxiedSite(web.TCPSite):
    """aiohttp's TCP site, listening through ``open_listener`` (request.remote is then the client's)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 guard: ProxyGuard | None, door: str = "https") -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        self._guard = guard
        self._door = door
        self._listen_host = host

    async def start(self) -> None:
        await web.BaseSite.start(self)         # registers the site with its runner (TCPSite.start would listen)
        server = self._runner.server
        assert server is not None
        tls = ImplicitTls(self._ssl_context) if self._ssl_context is not None else None
        self._server = await open_listener(server, self._listen_host, self._port, guard=self._guard, door=self._door, tls=tls)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

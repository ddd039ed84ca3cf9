"""Who is believed (ProxyGuard, listen.proxy_protocol_from) and the listener seam, in process."""

from __future__ import annotations

import asyncio
import json

import pytest
from tests.harness import wait_until_async

from gateway.config import ConfigError, load_settings
from gateway.ops.proxied import ProxyGuard, open_listener, peer_address
from gateway.ops.proxy_protocol import encode_v1, encode_v2


def test_trust_is_by_network_and_family() -> None:
    guard = ProxyGuard.from_networks(["10.0.0.5", "192.0.2.0/28", "2001:db8::/64"])
    assert guard.enabled
    assert guard.trusts(("10.0.0.5", 40000)) and not guard.trusts(("10.0.0.6", 40000))
    assert guard.trusts(("192.0.2.15", 1)) and not guard.trusts(("192.0.2.16", 1))
    assert guard.trusts(("::ffff:10.0.0.5", 1, 0, 0))            # a dual-stack socket's view of an IPv4 proxy
    assert guard.trusts(("2001:db8::1", 1, 0, 0)) and not guard.trusts(("2001:db9::1", 1, 0, 0))
    assert not guard.trusts(None) and not guard.trusts("/run/socket") and not guard.trusts(("not-an-ip", 1))
    assert not ProxyGuard.from_networks([]).enabled


def test_the_setting_is_checked_and_named() -> None:
    settings = load_settings(environ={"GATEWAY_LISTEN_PROXY_PROTOCOL_FROM": json.dumps(["127.0.0.1/32", "::1"])})
    assert settings.listen.proxy_protocol_from == ["127.0.0.1/32", "::1"]
    assert load_settings(environ={}).listen.proxy_protocol_from == []            # off by default
    with pytest.raises(ConfigError, match="proxy_protocol_from"):
        load_settings(environ={"GATEWAY_LISTEN_PROXY_PROTOCOL_FROM": json.dumps(["10.0.0.300"])})
    with pytest.raises(ConfigError, match="proxy_protocol_timeout_seconds"):
        load_settings(environ={"GATEWAY_LISTEN_PROXY_PROTOCOL_TIMEOUT_SECONDS": "1"})   # the spec: 3 s at least


class _Recorder(asyncio.Protocol):
    """What the listener's own protocol sees: its peer and its bytes."""

    seen: list[tuple[object, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.peer = peer_address(transport)
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"\n"):
            _Recorder.seen.append((self.peer, self.data))
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(b"ok\n")


class _Refusals:
    def __init__(self) -> None:
        self.reasons: list[tuple[str, str, str]] = []

    async def header_refused(self, door: str, proxy: str, reason: str) -> None:
        self.reasons.append((door, proxy, reason))


async def _exchange(port: int, source: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(100), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_header_believed_from_the_proxy_only_and_refusals_recorded() -> None:
    _Recorder.seen = []
    refusals = _Refusals()
    guard = ProxyGuard.from_networks(["127.0.0.1/32"], timeout_seconds=3, refusals=refusals)
    server = await open_listener(_Recorder, "127.0.0.1", 0, guard=guard, door="imap")
    port = server.sockets[0].getsockname()[1]
    try:
        # The proxy, v2 then v1, header and first line in one write: the client's address, the line intact.
        assert await _exchange(port, "127.0.0.1", encode_v2(("198.51.100.7", 4321)) + b"A1 NOOP\r\n") == b"ok\n"
        assert await _exchange(port, "127.0.0.1", encode_v1(("198.51.100.8", 4322), ("127.0.0.1", port))
                               + b"A2 NOOP\r\n") == b"ok\n"
        # LOCAL (a health check): the proxy itself.
        assert await _exchange(port, "127.0.0.1", encode_v2(None) + b"A3 NOOP\r\n") == b"ok\n"
        # Anyone else: no header read; what it sends is the protocol's, header included.
        forged = encode_v1(("203.0.113.66", 1), ("127.0.0.1", port))
        assert await _exchange(port, "127.0.0.2", forged) == b"ok\n"
        # The proxy with garbage: closed, nothing reaches the protocol.
        assert await _exchange(port, "127.0.0.1", b"A4 NOOP\r\n") == b""
        # the audit write runs in the background
        await wait_until_async(lambda: True if refusals.reasons else None, timeout=5, what="the refusal recorded")
    finally:
        server.close()
        await server.wait_closed()
    peers = [(peer[0] if isinstance(peer, tuple) else None, data) for peer, data in _Recorder.seen]
    assert peers == [("198.51.100.7", b"A1 NOOP\r\n"), ("198.51.100.8", b"A2 NOOP\r\n"), ("127.0.0.1", b"A3 NOOP\r\n"),
                     ("127.0.0.2", forged)]
    assert refusals.reasons == [("imap", "127.0.0.1", "not a PROXY protocol header (neither the v1 \"PROXY \" "
                                                      "text nor the v2 signature)")]


async def test_off_by_default_is_the_plain_listener() -> None:
    _Recorder.seen = []
    server = await open_listener(_Recorder, "127.0.0.1", 0, guard=ProxyGuard(), door="imap")
    port = server.sockets[0].getsockname()[1]
    try:
        header = encode_v1(("203.0.113.66", 1), ("127.0.0.1", port))
        assert await _exchange(port, "127.0.0.1", header) == b"ok\n"
    finally:
        server.close()
        await server.wait_closed()
    assert [(peer[0] if isinstance(peer, tuple) else None, data) for peer, data in _Recorder.seen] == [
        ("127.0.0.1", header)]

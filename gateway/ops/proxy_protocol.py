"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2): a pure, incremental parser.

A load balancer in TCP mode (HAProxy ``send-proxy`` / ``send-proxy-v2``) opens its own connection to us and
writes, before anything else (before a TLS ClientHello too), who its client was. ``parse_header(buffer)``
reads that header from the bytes received so far:

- ``None``: not complete yet, and nothing so far contradicts the protocol (read more);
- a ``ProxyHeader``: ``length`` bytes are the header, what follows belongs to the client's protocol;
  ``client`` is the address to use, or ``None`` to use the connection's real peer (v2 LOCAL: the
  proxy's own health check; v1 UNKNOWN; v2 UNSPEC, UNIX or datagram addresses);
- ``ProxyHeaderError``: the bytes are not a valid header (the reason says why); the spec (2.1)
  says to abort the connection.

Whether the header is believed at all is the listener's decision (``gateway.ops.proxied``): only from
configured proxy addresses. This module only reads bytes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107                     # 2.1: "If the CRLF sequence is not found in the first 107 characters"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # 2.2: \x0D \x0A \x0D \x0A \x00 \x0D \x0A \x51 \x55 \x49 \x54 \x0A
V2_FIXED = 16                         # 2.2: signature, version/command, family/protocol, length
V2_MAX_BLOCK = 1024                   # addresses + TLVs we accept (the spec fits it all in 536 bytes, section 2)
V2_LOCAL, V2_PROXY = 0x0, 0x1         # 2.2: the command in the 13th byte's low nibble
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0x0, 0x1, 0x2, 0x3
UNSPEC, STREAM, DGRAM = 0x0, 0x1, 0x2
ADDRESS_BLOCK = {AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}   # 2.2: 2*4+2*2, 2*16+2*2, 2*108

_V4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")   # 2.1: no heading zeroes
_V6 = re.compile(rb"[0-9A-Fa-f:]{2,39}")                                       # 2.1: hex sets and colons only
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")                                       # 2.1: no heading zeroes

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header: ``reason`` says what is wrong (logged and audited)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProxyHeader:
    version: int                      # 1 (text) or 2 (binary)
    length: int                       # bytes of the header; the client's protocol starts after them
    client: Address | None            # the client the proxy saw; None: use the connection's real peer
    server: Address | None            # the address the client connected to, on the proxy
    note: str                         # what kind of header it was ("TCP4", "LOCAL", "UNKNOWN"...)


def parse_header(data: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of ``data``, None while incomplete; ProxyHeaderError when invalid."""
    if not data:
        return None
    if data[:1] == b"\r":
        return _parse_v2(data)
    if V1_PREFIX.startswith(bytes(data[:6])):
        return _parse_v1(data)
    raise ProxyHeaderError("not a PROXY protocol header (neither the v1 \"PROXY \" text nor the v2 signature)")


# ------------------------------------------------------------------ version 1 (2.1)

def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    window = bytes(data[:V1_MAX_LINE])
    end = _line_end(window)
    if end is None:
        if len(data) >= V1_MAX_LINE:
            raise ProxyHeaderError(f"v1: no CRLF within the first {V1_MAX_LINE} bytes")
        return None
    fields = window[:end].split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyHeaderError("v1: the line must start with \"PROXY \" and a protocol")
    protocol = fields[1]
    if protocol == b"UNKNOWN":   # 2.1: the receiver must ignore anything before the CRLF; use the real peer
        return ProxyHeader(1, end + 2, None, None, "UNKNOWN")
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1: unknown protocol {_shown(protocol)} (TCP4, TCP6 or UNKNOWN)")
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1: {protocol.decode()} needs exactly 4 fields separated by single spaces")
    source, destination = (_v1_address(protocol, field) for field in fields[2:4])
    source_port, destination_port = (_v1_port(field) for field in fields[4:6])
    return ProxyHeader(1, end + 2, (source, source_port), (destination, destination_port), protocol.decode())


def _line_end(window: bytes) -> int | None:
    """Where the CRLF ending the line starts; None when not seen yet.
    2.1: "The receiver must not tolerate a single CR or LF character to end the line"."""
    for index, byte in enumerate(window):
        if byte == 0x0A:
            raise ProxyHeaderError("v1: a lone LF in the line (only CRLF ends it)")
        if byte == 0x0D:
            if index + 1 == len(window):
                return None
            if window[index + 1] != 0x0A:
                raise ProxyHeaderError("v1: a lone CR in the line (only CRLF ends it)")
            return index
    return None


def _v1_address(protocol: bytes, field: bytes) -> str:
    pattern = _V4 if protocol == b"TCP4" else _V6
    try:
        if pattern.fullmatch(field) is None:
            raise ValueError
        address = ipaddress.ip_address(field.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"v1: {_shown(field)} is not a canonical {protocol.decode()} address") from None
    if address.version != (4 if protocol == b"TCP4" else 6):
        raise ProxyHeaderError(f"v1: {_shown(field)} is not of the announced family {protocol.decode()}")
    return _plain(address)


def _v1_port(field: bytes) -> int:
    if _PORT.fullmatch(field) is None or int(field) > 65535:
        raise ProxyHeaderError(f"v1: {_shown(field)} is not a port (0 to 65535, no heading zeroes)")
    return int(field)


# ------------------------------------------------------------------ version 2 (2.2)

def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if bytes(data[:12]) != V2_SIGNATURE[:min(len(data), 12)]:
        raise ProxyHeaderError("v2: bad signature")
    if len(data) < 13:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:   # 2.2: "the receiver must only accept this value"
        raise ProxyHeaderError(f"v2: version {version} (only 2 exists)")
    if command not in (V2_LOCAL, V2_PROXY):   # 2.2: "Receivers must drop connections presenting unexpected values"
        raise ProxyHeaderError(f"v2: unknown command {command:#x} (LOCAL 0x0 or PROXY 0x1)")
    if len(data) < V2_FIXED:
        return None
    family, transport = data[13] >> 4, data[13] & 0x0F
    block = int.from_bytes(data[14:16], "big")
    if block > V2_MAX_BLOCK:
        raise ProxyHeaderError(f"v2: a {block}-byte address block (at most {V2_MAX_BLOCK} accepted)")
    if len(data) < V2_FIXED + block:
        return None
    length = V2_FIXED + block
    if command == V2_LOCAL:   # 2.2: use the real connection endpoints; the family is ignored
        return ProxyHeader(2, length, None, None, "LOCAL")
    if family > AF_UNIX or transport > DGRAM:   # 2.2: "must be rejected as invalid by receivers"
        raise ProxyHeaderError(f"v2: unknown address family or protocol byte {data[13]:#04x}")
    needed = ADDRESS_BLOCK.get(family, 0)
    if block < needed:
        raise ProxyHeaderError(f"v2: family {family:#x} needs {needed} address bytes, the header has {block}")
    if family in (AF_UNSPEC, AF_UNIX) or transport != STREAM:
        # 2.2: what a receiver does not implement falls back to UNSPEC: the connection's real endpoints.
        return ProxyHeader(2, length, None, None, f"PROXY family {family:#x} protocol {transport:#x}")
    size = 4 if family == AF_INET else 16
    body = bytes(data[V2_FIXED:V2_FIXED + needed])
    source = _plain(ipaddress.ip_address(body[:size]))
    destination = _plain(ipaddress.ip_address(body[size:2 * size]))
    ports = body[2 * size:2 * size + 4]
    return ProxyHeader(2, length, (source, int.from_bytes(ports[:2], "big")),
                       (destination, int.from_bytes(ports[2:], "big")), "TCP4" if family == AF_INET else "TCP6")


# ------------------------------------------------------------------ helpers

def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """IPv4-mapped IPv6 addresses as IPv4, so one client has one key in the per-address limits."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _shown(value: bytes) -> str:
    return repr(value[:48].decode("ascii", "backslashreplace"))


def describe(data: bytes) -> str:
    """One line saying what ``parse_header`` makes of ``data`` (for logs and the transcript test)."""
    try:
        header = parse_header(data)
    except ProxyHeaderError as error:
        return f"refused: {error.reason}"
    if header is None:
        return "incomplete: waiting for more bytes"
    if header.client is None:
        return f"v{header.version} {header.note}: the connection's own peer is the client ({header.length} bytes)"
    host, port = header.client
    return f"v{header.version} {header.note}: client {host} port {port} ({header.length} bytes)"


def encode_v1(client: Address, server: Address) -> bytes:
    """A v1 line (what HAProxy's ``send-proxy`` writes): for tests and tools."""
    family = "TCP6" if ":" in client[0] else "TCP4"
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode("ascii")


def encode_v2(client: Address | None, server: Address | None = None) -> bytes:
    """A v2 header (HAProxy's ``send-proxy-v2``): PROXY over TCP, or LOCAL when ``client`` is None."""
    if client is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + (0).to_bytes(2, "big")
    server = server or ("0.0.0.0" if ":" not in client[0] else "::", 0)
    source, destination = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    family = AF_INET if source.version == 4 else AF_INET6
    block = source.packed + destination.packed + client[1].to_bytes(2, "big") + server[1].to_bytes(2, "big")
    return V2_SIGNATURE + bytes([0x21, (family << 4) | STREAM]) + len(block).to_bytes(2, "big") + block

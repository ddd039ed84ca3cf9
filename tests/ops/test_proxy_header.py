"""The PROXY protocol parser (gateway.ops.proxy_protocol): HAProxy's spec, hostile bytes, and a transcript."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from gateway.ops.proxy_protocol import (
    V1_MAX_LINE,
    V2_MAX_BLOCK,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    describe,
    encode_v1,
    encode_v2,
    parse_header,
)

# What a receiver makes of each v1 line: read by a person, checked by the test (HAProxy's spec, 2.1).
V1_TRANSCRIPT = """
PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n        | v1 TCP4: client 192.168.0.1 port 56324 (47 bytes)
PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\\r\\n           | v1 TCP6: client 2001:db8::1 port 4000 (44 bytes)
PROXY TCP6 ::ffff:c000:201 ::1 4000 25\\r\\n                | v1 TCP6: client 192.0.2.1 port 4000 (40 bytes)
PROXY UNKNOWN\\r\\n                                         | v1 UNKNOWN: the connection's own peer is the client (15 bytes)
PROXY UNKNOWN ffff::1 ffff::2 65535 65535\\r\\n             | v1 UNKNOWN: the connection's own peer is the client (43 bytes)
PROXY TCP4 192.168.0.1 192.168.0.11 56324                | incomplete: waiting for more bytes
PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\n          | refused: v1: a lone LF in the line (only CRLF ends it)
PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\rX         | refused: v1: a lone CR in the line (only CRLF ends it)
PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\\r\\n       | refused: v1: '192.168.0.01' is not a canonical TCP4 address
PROXY TCP4 256.1.1.1 192.168.0.11 56324 443\\r\\n          | refused: v1: '256.1.1.1' is not a canonical TCP4 address
PROXY TCP4 2001:db8::1 192.168.0.11 56324 443\\r\\n        | refused: v1: '2001:db8::1' is not a canonical TCP4 address
PROXY TCP6 192.168.0.1 2001:db8::2 56324 443\\r\\n         | refused: v1: '192.168.0.1' is not a canonical TCP6 address
PROXY TCP6 fe80::1%eth0 2001:db8::2 56324 443\\r\\n        | refused: v1: 'fe80::1%eth0' is not a canonical TCP6 address
PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\\r\\n       | refused: v1: '056324' is not a port (0 to 65535, no heading zeroes)
PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\\r\\n        | refused: v1: '65536' is not a port (0 to 65535, no heading zeroes)
PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\\r\\n       | refused: v1: TCP4 needs exactly 4 fields separated by single spaces
PROXY TCP4 192.168.0.1 192.168.0.11 56324\\r\\n            | refused: v1: TCP4 needs exactly 4 fields separated by single spaces
PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\\r\\n        | refused: v1: unknown protocol 'UDP4' (TCP4, TCP6 or UNKNOWN)
PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\\r\\n        | refused: v1: unknown protocol 'tcp4' (TCP4, TCP6 or UNKNOWN)
PROXYTCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n         | refused: not a PROXY protocol header (neither the v1 "PROXY " text nor the v2 signature)
EHLO client.example\\r\\n                                   | refused: not a PROXY protocol header (neither the v1 "PROXY " text nor the v2 signature)
"""


def _unescape(text: str) -> bytes:
    return text.replace("\\r", "\r").replace("\\n", "\n").encode("ascii")


@pytest.mark.parametrize("line", [line for line in V1_TRANSCRIPT.strip().splitlines()],
                         ids=lambda line: line.split("|")[0].strip()[:60])
def test_v1_transcript(line: str) -> None:
    sent, expected = (part.strip() for part in line.split("|", 1))
    assert describe(_unescape(sent)) == expected


def test_v1_the_longest_line_the_spec_allows_is_read() -> None:
    longest = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(longest) == V1_MAX_LINE
    header = parse_header(longest + b"EHLO x\r\n")
    assert header is not None and header.length == V1_MAX_LINE and header.client is None


def test_v1_no_crlf_in_107_bytes_is_refused_not_waited_for() -> None:
    with pytest.raises(ProxyHeaderError, match="no CRLF within the first 107 bytes"):
        parse_header(b"PROXY TCP4 " + b"1" * (V1_MAX_LINE - 11))
    assert parse_header(b"PROXY TCP4 " + b"1" * (V1_MAX_LINE - 12)) is None   # 106 bytes: may still end


def test_v1_bytes_after_the_line_belong_to_the_client() -> None:
    data = encode_v1(("203.0.113.9", 51000), ("198.51.100.1", 587)) + b"EHLO x\r\n"
    header = parse_header(data)
    assert header == ProxyHeader(1, len(data) - 8, ("203.0.113.9", 51000), ("198.51.100.1", 587), "TCP4")
    assert data[header.length:] == b"EHLO x\r\n"


# ------------------------------------------------------------------ version 2

def test_v2_tcp4_and_tcp6() -> None:
    four = encode_v2(("203.0.113.9", 51000), ("198.51.100.1", 993))
    assert four[:16] == V2_SIGNATURE + b"\x21\x11\x00\x0c"     # PROXY, TCP over IPv4, 12 address bytes
    assert parse_header(four + b"\x16\x03\x01") == ProxyHeader(2, 28, ("203.0.113.9", 51000),
                                                               ("198.51.100.1", 993), "TCP4")
    six = encode_v2(("2001:db8::9", 51000), ("2001:db8::1", 443))
    assert six[12:16] == b"\x21\x21\x00\x24"                     # TCP over IPv6, 36 address bytes
    assert parse_header(six) == ProxyHeader(2, 52, ("2001:db8::9", 51000), ("2001:db8::1", 443), "TCP6")


def test_v2_local_means_the_real_peer_whatever_follows() -> None:
    """2.2: LOCAL (health checks): use the real endpoints; the family is ignored, the length still skipped."""
    assert parse_header(encode_v2(None)) == ProxyHeader(2, 16, None, None, "LOCAL")
    with_block = V2_SIGNATURE + b"\x20\xff\x00\x03abc" + b"rest"
    assert parse_header(with_block) == ProxyHeader(2, 19, None, None, "LOCAL")


def test_v2_tlvs_are_skipped() -> None:
    tlv = b"\x05\x00\x04abcd"                                    # PP2_TYPE_UNIQUE_ID
    base = encode_v2(("192.0.2.7", 1000), ("192.0.2.8", 25))
    data = base[:14] + (12 + len(tlv)).to_bytes(2, "big") + base[16:] + tlv + b"EHLO"
    header = parse_header(data)
    assert header is not None and header.client == ("192.0.2.7", 1000) and data[header.length:] == b"EHLO"


@pytest.mark.parametrize(("family", "expected"), [
    (0x00, "PROXY family 0x0 protocol 0x0"),        # UNSPEC: real endpoints
    (0x12, "PROXY family 0x1 protocol 0x2"),        # UDP over IPv4 on a TCP listener: real endpoints
    (0x31, "PROXY family 0x3 protocol 0x1"),        # AF_UNIX: real endpoints
])
def test_v2_families_we_do_not_use_fall_back_to_the_real_peer(family: int, expected: str) -> None:
    block = bytes(216)
    header = parse_header(V2_SIGNATURE + bytes([0x21, family]) + len(block).to_bytes(2, "big") + block)
    assert header is not None and header.client is None and header.note == expected


@pytest.mark.parametrize(("data", "reason"), [
    (V2_SIGNATURE[:5] + b"X" + V2_SIGNATURE[6:] + b"\x21\x11\x00\x0c" + bytes(12), "v2: bad signature"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "v2: version 1 (only 2 exists)"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "v2: unknown command 0x2"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "v2: unknown address family or protocol byte 0x41"),
    (V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "v2: unknown address family or protocol byte 0x13"),
    (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "v2: family 0x1 needs 12 address bytes, the header has 8"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "v2: family 0x2 needs 36 address bytes, the header has 12"),
    (V2_SIGNATURE + b"\x21\x11" + (V2_MAX_BLOCK + 1).to_bytes(2, "big"), "v2: a 1025-byte address block"),
])
def test_v2_malformed_headers_are_refused_with_their_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError) as refused:
        parse_header(data)
    assert refused.value.reason.startswith(reason)


def test_v2_truncated_header_waits_for_the_rest() -> None:
    whole = encode_v2(("192.0.2.7", 1000), ("192.0.2.8", 25))
    for cut in range(1, len(whole)):
        assert parse_header(whole[:cut]) is None, cut
    assert parse_header(whole) is not None


# ------------------------------------------------------------------ properties

addresses4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2 ** 32 - 1))
addresses6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2 ** 128 - 1)).filter(
    lambda text: ipaddress.IPv6Address(text).ipv4_mapped is None)
ports = st.integers(0, 65535)


@settings(max_examples=300)
@given(st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)), ports, ports,
       st.sampled_from(["v1", "v2"]), st.binary(max_size=64))
def test_round_trip_then_the_client_protocol(hosts: tuple[str, str], source_port: int, destination_port: int,
                                             version: str, rest: bytes) -> None:
    client, server = (hosts[0], source_port), (hosts[1], destination_port)
    header_bytes = encode_v1(client, server) if version == "v1" else encode_v2(client, server)
    header = parse_header(header_bytes + rest)
    assert header is not None
    assert header.client == client and header.server == server and header.length == len(header_bytes)


@settings(max_examples=300)
@given(st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)), ports, ports,
       st.sampled_from(["v1", "v2"]), st.data())
def test_every_truncation_of_a_valid_header_is_incomplete(hosts: tuple[str, str], source_port: int,
                                                          destination_port: int, version: str,
                                                          data: st.DataObject) -> None:
    client, server = (hosts[0], source_port), (hosts[1], destination_port)
    header_bytes = encode_v1(client, server) if version == "v1" else encode_v2(client, server)
    cut = data.draw(st.integers(0, len(header_bytes) - 1))
    assert parse_header(header_bytes[:cut]) is None


@settings(max_examples=1000)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_and_never_claim_beyond_the_limits(data: bytes) -> None:
    try:
        header = parse_header(data)
    except ProxyHeaderError as error:
        assert error.reason
        return
    if header is not None:
        assert header.length <= len(data)
        assert header.length <= (V1_MAX_LINE if header.version == 1 else 16 + V2_MAX_BLOCK)


@settings(max_examples=500)
@given(st.sampled_from([b"PROXY ", V2_SIGNATURE]), st.binary(max_size=1200))
def test_hostile_bodies_after_a_valid_start(start: bytes, body: bytes) -> None:
    """A valid beginning, then anything: a header, a reasoned refusal, or a wait bounded by the limits."""
    data = start + body
    try:
        header = parse_header(data)
    except ProxyHeaderError as error:
        assert error.reason
        return
    if header is None:   # waiting only while within the limits: oversize input is refused, never buffered
        assert len(data) < V1_MAX_LINE if start == b"PROXY " else len(data) < 16 + V2_MAX_BLOCK
    else:
        assert 0 < header.length <= len(data)
        if header.client is not None:
            ipaddress.ip_address(header.client[0])
            assert 0 <= header.client[1] <= 65535

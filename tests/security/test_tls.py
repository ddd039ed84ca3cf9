"""Real TLS handshakes on loopback between the gateway's server and client contexts."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import UserError
from gateway.security.pki import IssuedCertificate, TestPKI
from gateway.security.tls import client_context, peer_certificate_info, server_context

# A guard against a hung handshake, not a timing assertion.
GUARD_SECONDS = 30


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    authority = TestPKI(tmp_path_factory.mktemp("tls") / "pki")
    authority.init()
    authority.issue_server("mx", ["localhost", "mx.hopital.test"], ["127.0.0.1"])
    authority.issue_client("labo", "Laboratoire demo", "resultats@labo.test")
    authority.issue_client("revoked-app", "Revoked app", "revoked@labo.test")
    authority.revoke("revoked-app", "keyCompromise")
    return authority


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    authority = TestPKI(tmp_path_factory.mktemp("tls-other") / "pki")
    authority.init()
    authority.issue_client("stranger", "Stranger", "someone@elsewhere.test")
    return authority


@dataclass
class Listener:
    """A loopback TLS server that answers each handshake with what it saw of the client's certificate."""

    port: int
    seen: list[dict[str, Any] | None] = field(default_factory=list)


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[asyncio.Server] = []

    async def start(context: ssl.SSLContext) -> Listener:
        listener = Listener(port=0)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            info = peer_certificate_info(writer.get_extra_info("ssl_object"))
            listener.seen.append(dict(info) if info else None)
            writer.write(b"hello " + (info["common_name"] or "").encode() if info else b"hello anonymous")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        servers.append(server)
        listener.port = server.sockets[0].getsockname()[1]
        return listener

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def exchange(port: int, context: ssl.SSLContext, server_hostname: str = "localhost") -> bytes:
    """Connect, then read the server's greeting; TLS 1.3 reports a refused client certificate on that read."""
    async def talk() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname)
        try:
            return await reader.read(100)
        finally:
            writer.close()

    return await asyncio.wait_for(talk(), GUARD_SECONDS)


def gateway_server(pki: TestPKI, **options: Any) -> ssl.SSLContext:
    issued = pki.load("mx")
    return server_context(issued.chain_path, issued.key_path, **options)


def client_with(pki: TestPKI, identity: IssuedCertificate | None = None, **options: Any) -> ssl.SSLContext:
    if identity is None:
        return client_context(pki.ca_bundle_path, **options)
    return client_context(pki.ca_bundle_path, cert_chain=identity.chain_path, key=identity.key_path, **options)


async def test_handshake_with_the_right_ca(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki))
    assert await exchange(listener.port, client_with(pki)) == b"hello anonymous"
    assert listener.seen == [None]


async def test_handshake_by_other_dns_name_in_the_san(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki))
    assert await exchange(listener.port, client_with(pki), server_hostname="mx.hopital.test") == b"hello anonymous"


async def test_wrong_ca_is_refused(pki: TestPKI, other_pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki))
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await exchange(listener.port, client_with(other_pki))
    assert listener.seen == []


async def test_hostname_mismatch_is_refused(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki))
    with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
        await exchange(listener.port, client_with(pki), server_hostname="mx.elsewhere.test")
    assert listener.seen == []


def tls_1_1_client(pki: TestPKI) -> ssl.SSLContext:
    """A client that speaks only TLS 1.1; security level 0 lets this OpenSSL still offer it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca_bundle_path)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_below_1_2_is_refused(pki: TestPKI, serve: Any) -> None:
    issued = pki.load("mx")
    # Control: a server that still allows TLS 1.1 accepts this client, so the refusal below is the gateway's.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.load_cert_chain(issued.chain_path, issued.key_path)
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    control = await serve(permissive)
    assert await exchange(control.port, tls_1_1_client(pki)) == b"hello anonymous"

    context = gateway_server(pki)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    listener = await serve(context)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await exchange(listener.port, tls_1_1_client(pki))
    assert listener.seen == []
    assert client_with(pki).minimum_version == ssl.TLSVersion.TLSv1_2


async def test_negotiates_tls_1_2_when_the_client_caps_there(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki))
    capped = client_with(pki)
    capped.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await exchange(listener.port, capped) == b"hello anonymous"


async def test_required_client_certificate_missing_is_refused(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki, client_ca=pki.ca_bundle_path, require_client_cert=True))
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        reply = await exchange(listener.port, client_with(pki))
        # TLS 1.3: the client may finish first and learn of the refusal as an EOF or an alert on read.
        assert reply == b"", reply
        raise ConnectionResetError("server closed the connection without a greeting")
    assert listener.seen == []


async def test_required_client_certificate_presented_is_seen(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki, client_ca=pki.ca_bundle_path, require_client_cert=True))
    labo = pki.load("labo")
    assert await exchange(listener.port, client_with(pki, labo)) == b"hello Laboratoire demo"
    (seen,) = listener.seen
    assert seen is not None
    assert seen["emails"] == ["resultats@labo.test"]
    assert seen["fingerprint_sha256"] == labo.fingerprint_sha256
    assert seen["serial"] == labo.serial_hex
    assert "TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS" in seen["issuer"]


async def test_server_certificate_doubles_as_client_certificate(pki: TestPKI, serve: Any) -> None:
    # Between operators the gateway presents its server certificate as its client certificate.
    listener = await serve(gateway_server(pki, client_ca=pki.ca_bundle_path, require_client_cert=True))
    assert await exchange(listener.port, client_with(pki, pki.load("mx"))) == b"hello localhost"
    assert listener.seen[0] is not None and listener.seen[0]["dns_names"] == ["localhost", "mx.hopital.test"]


async def test_optional_client_certificate(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki, client_ca=pki.ca_bundle_path))
    assert await exchange(listener.port, client_with(pki)) == b"hello anonymous"
    assert await exchange(listener.port, client_with(pki, pki.load("labo"))) == b"hello Laboratoire demo"
    assert [entry["common_name"] if entry else None for entry in listener.seen] == [None, "Laboratoire demo"]


async def test_client_certificate_from_another_pki_is_refused(pki: TestPKI, other_pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki, client_ca=pki.ca_bundle_path))
    stranger = other_pki.load("stranger")
    stranger_client = client_context(pki.ca_bundle_path, cert_chain=stranger.chain_path, key=stranger.key_path)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        if await exchange(listener.port, stranger_client) == b"":
            raise ConnectionResetError("server closed the connection without a greeting")
    assert listener.seen == []


async def test_revoked_client_certificate_is_refused_with_crl(pki: TestPKI, serve: Any) -> None:
    listener = await serve(gateway_server(pki, client_ca=pki.ca_bundle_path, require_client_cert=True,
                                          crls=pki.crl_paths))
    assert await exchange(listener.port, client_with(pki, pki.load("labo"))) == b"hello Laboratoire demo"
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        if await exchange(listener.port, client_with(pki, pki.load("revoked-app"))) == b"":
            raise ConnectionResetError("server closed the connection without a greeting")
    assert len(listener.seen) == 1


async def test_revoked_server_certificate_is_refused_by_client_with_crl(tmp_path: Path, serve: Any) -> None:
    authority = TestPKI(tmp_path / "pki")
    authority.init()
    issued = authority.issue_server("mx", ["localhost"], [])
    listener = await serve(server_context(issued.chain_path, issued.key_path))
    checking = client_context(authority.ca_bundle_path, crls=authority.intermediate_crl_path)
    assert await exchange(listener.port, checking) == b"hello anonymous"
    authority.revoke("mx", "keyCompromise")
    after = client_context(authority.ca_bundle_path, crls=authority.crl_paths)
    with pytest.raises(ssl.SSLCertVerificationError, match="revoked"):
        await exchange(listener.port, after)


def test_contexts_refuse_bad_inputs(pki: TestPKI, tmp_path: Path) -> None:
    issued = pki.load("mx")
    with pytest.raises(UserError) as missing:
        server_context(tmp_path / "absent.pem", issued.key_path)
    assert missing.value.field == "cert_chain"
    with pytest.raises(UserError) as no_ca:
        server_context(issued.chain_path, issued.key_path, require_client_cert=True)
    assert no_ca.value.field == "client_ca"
    with pytest.raises(UserError, match="cannot use"):
        server_context(issued.chain_path, pki.load("labo").key_path)
    with pytest.raises(UserError) as bad_crl:
        client_context(pki.ca_bundle_path, crls=[tmp_path / "none.crl.pem"])
    assert bad_crl.value.field == "crl"


def test_peer_certificate_info_without_tls() -> None:
    assert peer_certificate_info(None) is None

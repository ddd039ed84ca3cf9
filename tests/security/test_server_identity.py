"""An externally issued server certificate (tls.server_certificate_file, tls.server_key_file, tls.server_chain_file):
every fault is refused by `gateway config check` and by `gateway serve` at start, with a message naming the key."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from gateway.config import ConfigError, load_settings
from gateway.errors import UserError
from gateway.security.server_identity import load_external_identity
from tests.harness import GatewayProcess, run_cli
from tests.security.external_ca import NOW, ExternalCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ExternalCA:
    return ExternalCA(tmp_path_factory.mktemp("igc-sante"))


def _config(data_dir: Path, cert: Path | str, key: Path | str, chain: Path | str = "") -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    toml = data_dir / "gateway.toml"
    toml.write_text(f'hostname = "localhost"\n[tls]\nserver_certificate_file = "{cert}"\nserver_key_file = "{key}"\n'
                    f'server_chain_file = "{chain}"\n')
    return toml


def _check(data_dir: Path) -> tuple[int, str]:
    result = run_cli("config", "check", data_dir=data_dir, env={k: v for k, v in os.environ.items()
                                                                  if not k.startswith("GATEWAY_")})
    return result.returncode, result.stdout + result.stderr


def test_a_good_certificate_with_its_chain_passes(ca: ExternalCA, tmp_path: Path) -> None:
    cert, key, certificate = ca.issue("good")
    _config(tmp_path, cert, key, ca.intermediate_file)
    code, output = _check(tmp_path)
    assert code == 0, output
    assert "configuration is valid" in output
    settings = load_settings(data_dir=tmp_path, environ={})
    identity = load_external_identity(settings.tls, "localhost", work_dir=tmp_path / "run")
    assert identity.certificate == certificate
    assert identity.chain_path.read_bytes().count(b"BEGIN CERTIFICATE") == 2    # leaf, then the intermediate
    # A wildcard covers one leftmost label (RFC 6125 6.4.3), and the hostname may be an IP address.
    wild_cert, wild_key, _ = ca.issue("wild", dns=("*.mssante.example",), ips=("192.0.2.7",))
    tls = settings.tls.model_copy(update={"server_certificate_file": str(wild_cert), "server_key_file": str(wild_key),
                                          "server_chain_file": ""})
    assert load_external_identity(tls, "mx.mssante.example", work_dir=None).certificate is not None
    assert load_external_identity(tls, "192.0.2.7", work_dir=None).certificate is not None
    with pytest.raises(UserError, match="does not name"):
        load_external_identity(tls, "a.mx.mssante.example", work_dir=None)


def _case(ca: ExternalCA, tmp: Path, case: str) -> tuple[Path | str, Path | str, Path | str]:
    """(certificate, key, chain) files showing one fault."""
    if case == "missing certificate":
        _cert, key, _ = ca.issue("c1")
        return tmp / "nowhere.pem", key, ""
    if case == "missing key":
        cert, _key, _ = ca.issue("c2")
        return cert, tmp / "nowhere.key", ""
    if case == "certificate is a directory":
        _cert, key, _ = ca.issue("c3")
        return tmp, key, ""
    if case == "key readable by others":
        cert, key, _ = ca.issue("c4", key_mode=0o644)
        return cert, key, ""
    if case == "key of another certificate":
        cert, _key, _ = ca.issue("c5")
        _other, other_key, _ = ca.issue("c5-other")
        return cert, other_key, ""
    if case == "expired":
        cert, key, _ = ca.issue("c6", not_before=NOW - dt.timedelta(days=400), not_after=NOW - dt.timedelta(days=1))
        return cert, key, ""
    if case == "not yet valid":
        cert, key, _ = ca.issue("c7", not_before=NOW + dt.timedelta(days=2))
        return cert, key, ""
    if case == "no name matching hostname":
        cert, key, _ = ca.issue("c8", dns=("mx.autre-operateur.example",), ips=())
        return cert, key, ""
    if case == "not a certificate":
        _cert, key, _ = ca.issue("c9")
        return key, key, ""          # a key file where the certificate should be
    if case == "chain of another CA":
        cert, key, _ = ca.issue("c10")
        return cert, key, ca.root_file
    raise AssertionError(case)


CASES = {
    "missing certificate": ("tls.server_certificate_file", "does not exist"),
    "missing key": ("tls.server_key_file", "does not exist"),
    "certificate is a directory": ("tls.server_certificate_file", "is a directory"),
    "key readable by others": ("tls.server_key_file", "permissions 0644 are too open"),
    "key of another certificate": ("tls.server_key_file", "is not the key of the certificate"),
    "expired": ("tls.server_certificate_file", "expired on"),
    "not yet valid": ("tls.server_certificate_file", "is not valid yet"),
    "no name matching hostname": ("tls.server_certificate_file", "does not name this gateway's hostname 'localhost'"),
    "not a certificate": ("tls.server_certificate_file", "holds no PEM certificate"),
    "chain of another CA": ("tls.server_chain_file", "does not start with the issuer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_fault_is_named_by_config_check(ca: ExternalCA, tmp_path: Path, case: str) -> None:
    key_name, message = CASES[case]
    _config(tmp_path / "data", *_case(ca, tmp_path, case))
    code, output = _check(tmp_path / "data")
    assert code == 1, output
    assert f"{key_name}: " in output and message in output, output
    assert "Traceback" not in output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: no unreadable file to show")
def test_an_unreadable_certificate_is_named(ca: ExternalCA, tmp_path: Path) -> None:
    cert, key, _ = ca.issue("unreadable")
    cert.chmod(0)
    _config(tmp_path / "data", cert, key)
    code, output = _check(tmp_path / "data")
    assert code == 1 and "tls.server_certificate_file: " in output and "cannot be read" in output, output


def test_certificate_and_key_go_together(tmp_path: Path, ca: ExternalCA) -> None:
    cert, _key, _ = ca.issue("alone")
    with pytest.raises(ConfigError, match="tls.server_key_file is empty"):
        load_settings(data_dir=tmp_path, environ={"GATEWAY_TLS_SERVER_CERTIFICATE_FILE": str(cert)})


def test_serve_refuses_to_start_with_a_bad_certificate(ca: ExternalCA, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw")
    gateway.init_demo()
    cert, key, _ = ca.issue("expired-at-start", not_before=NOW - dt.timedelta(days=400),
                            not_after=NOW - dt.timedelta(days=1))
    _config(gateway.data_dir, cert, key)
    with pytest.raises(AssertionError, match=r"exited 1") as refused:
        gateway.start()
    assert "tls.server_certificate_file: " in str(refused.value) and "expired on" in str(refused.value)


async def _client_certificate_seen(client: ssl.SSLContext, peer_chain: Path, peer_key: Path, trusted: Path) -> x509.Certificate:
    """The certificate ``client`` presents to an MX that requires one (verified to ``trusted``)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(peer_chain, peer_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(trusted))
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
        der = await asyncio.wait_for(seen, 30)
        writer.close()
    finally:
        listener.close()
        await listener.wait_closed()
    return x509.load_der_x509_certificate(der)


async def test_outbound_smtp_presents_the_external_certificate_and_its_renewal_after_sighup(ca: ExternalCA,
                                                                                              tmp_path: Path) -> None:
    """Outbound SMTP's client certificate is the operator's too, and `_reload_trust` (SIGHUP) gives the
    outbound worker the renewed one; a renewal that fails its checks keeps the running context."""
    from gateway.app import Gateway, open_services
    from gateway.queue.outbound import OutboundWorker, outbound_tls_context

    data = tmp_path / "data"
    cert, key, first = ca.issue("outbound")
    _config(data, cert, key, ca.intermediate_file)
    settings = load_settings(data_dir=data, environ={})
    gateway = Gateway(settings, reread_settings=lambda: load_settings(data_dir=data, environ={}))
    async with open_services(settings) as services:
        # The other operator's MX: a certificate of the test PKI (which outbound trusts) for "localhost".
        peer = services.pki.ensure_gateway_server_cert("localhost", [], ["127.0.0.1"])
        worker = OutboundWorker(services.db, settings, services.generated, tls_context=outbound_tls_context(
            services.pki, settings, identity=services.server_certificate.paths()))
        services.queue.outbound = worker
        assert await _client_certificate_seen(worker.tls_context, peer.chain_path, peer.key_path, ca.root_file) == first

        _cert, _key, renewed = ca.issue("outbound")
        gateway._reload_trust(services)
        assert await _client_certificate_seen(worker.tls_context, peer.chain_path, peer.key_path, ca.root_file) == renewed

        ca.issue("outbound", not_before=NOW - dt.timedelta(days=400), not_after=NOW - dt.timedelta(days=1))
        gateway._reload_trust(services)
        assert await _client_certificate_seen(worker.tls_context, peer.chain_path, peer.key_path, ca.root_file) == renewed

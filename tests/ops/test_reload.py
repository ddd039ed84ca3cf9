"""SIGHUP through the real ``gateway serve``: a renewed server certificate is what a new handshake shows, a
revoked client certificate is refused at the next handshake, another operator's CA added to ``pki.trust_anchors``
in the configuration file is trusted from then on (which only SIGHUP can tell the gateway), a configuration that
does not load keeps the running one, and an IMAP session opened before all of it keeps working."""

from __future__ import annotations

import datetime as dt
import imaplib
import json
import signal
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from tests.harness import GatewayProcess, run_cli, wait_until

REFUSED_AT_HANDSHAKE = (ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected, imaplib.IMAP4.abort, OSError)


def _served_serial(gateway: GatewayProcess) -> int:
    """The serial number of the certificate a new IMAPS handshake shows."""
    context = ssl.create_default_context(cafile=gateway.ca_file)
    with socket.create_connection(("127.0.0.1", gateway.ports["imaps_port"]), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _sighup(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    reloads = gateway.log_text().count("SIGHUP: reloaded")
    gateway.process.send_signal(signal.SIGHUP)
    wait_until(lambda: True if gateway.log_text().count("SIGHUP: reloaded") > reloads else None, timeout=30,
               what="the gateway logged the reload")


def _relay_handshake(gateway: GatewayProcess, cert: str, key: str) -> int:
    """EHLO's code after STARTTLS on the relay door, presenting ``cert`` (another operator's)."""
    context = ssl.create_default_context(cafile=gateway.ca_file)
    context.load_cert_chain(cert, key)
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_relay_port"], timeout=30) as client:
        client.starttls(context=context)
        return client.ehlo()[0]


def _lab_imaps(gateway: GatewayProcess) -> imaplib.IMAP4_SSL:
    lab = gateway.account("APP")
    context = ssl.create_default_context(cafile=gateway.ca_file)
    context.load_cert_chain(lab["client_certificate"], lab["client_key"])
    return imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=context, timeout=30)


def test_sighup_reloads_certificates_crls_and_trust_list_keeping_sessions(tmp_path: Path) -> None:
    other = tmp_path / "other-operator"
    run_cli("certs", "init", data_dir=other, check=True)
    peer = json.loads(run_cli("certs", "issue", "client", "--name", "mx-other", "--cn", "mx.other.test", "--json",
                              data_dir=other, check=True).stdout)
    gateway = GatewayProcess(tmp_path / "gw")
    gateway.start()
    try:
        doctor = gateway.account("PER")
        session = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"],
                                    ssl_context=ssl.create_default_context(cafile=gateway.ca_file), timeout=30)
        assert session.login(doctor["address"], doctor["password"])[0] == "OK"
        before = _served_serial(gateway)
        _lab_imaps(gateway).logout()                     # the lab's certificate is accepted before

        # A renewed server certificate (same names, new key and serial), as an operator renews it.
        current = json.loads(gateway.cli("certs", "show", "gateway", "--json", check=True).stdout)
        names = [arg for name in current["dns_names"] for arg in ("--dns", name)]
        names += [arg for ip in current["ip_addresses"] for arg in ("--ip", ip)]
        gateway.cli("certs", "issue", "server", "--name", "gateway", *names, "--replace", check=True)
        # A new CRL revoking the lab's client certificate.
        gateway.cli("certs", "revoke", "demo-app-labo", "--reason", "keyCompromise", check=True)
        # Another operator's CA and CRLs added to the trust list in the configuration file.
        anchors = [str(other / "pki" / "ca" / "chain.pem"), str(other / "pki" / "crl" / "intermediate.crl.pem"),
                   str(other / "pki" / "crl" / "root.crl.pem")]
        with pytest.raises(REFUSED_AT_HANDSHAKE):
            _relay_handshake(gateway, peer["cert_path"], peer["key_path"])      # not trusted yet
        (gateway.data_dir / "gateway.toml").write_text(f"[pki]\ntrust_anchors = {json.dumps(anchors)}\n")
        with pytest.raises(REFUSED_AT_HANDSHAKE):
            _relay_handshake(gateway, peer["cert_path"], peer["key_path"])      # the file alone changes nothing

        _sighup(gateway)

        assert _served_serial(gateway) != before
        with pytest.raises(REFUSED_AT_HANDSHAKE):
            _lab_imaps(gateway).authenticate("EXTERNAL", lambda _: b"")
        assert _relay_handshake(gateway, peer["cert_path"], peer["key_path"]) == 250
        assert session.noop()[0] == "OK"                 # the session from before is still served
        assert session.select("INBOX", readonly=True)[0] in ("OK", "NO")

        # A configuration that does not load is refused and the running one kept; a port change waits for a restart.
        (gateway.data_dir / "gateway.toml").write_text('[imap]\nmax_connections = "many"\n')
        _sighup(gateway)
        assert "configuration not reloaded" in gateway.log_text()
        assert _relay_handshake(gateway, peer["cert_path"], peer["key_path"]) == 250    # anchors kept
        (gateway.data_dir / "gateway.toml").write_text(
            f"[pki]\ntrust_anchors = {json.dumps(anchors)}\n[imap]\nmax_connections = 10\n")
        _sighup(gateway)
        assert "apply at the next restart: imap.max_connections" in gateway.log_text()
        assert session.noop()[0] == "OK"
        session.logout()
    finally:
        gateway.stop()


def _served_certificate(gateway: GatewayProcess, door: str, cafile: Path) -> x509.Certificate:
    """The certificate a new handshake on ``door`` shows, verified against ``cafile`` only (the external root)
    for the name ``localhost``: the listener sends the intermediate with it."""
    context = ssl.create_default_context(cafile=str(cafile))
    port = gateway.ports[door]
    if door in ("imaps_port", "http_port", "smtp_submissions_port"):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
    elif door == "imap_port":
        with imaplib.IMAP4("127.0.0.1", port, timeout=30) as client:
            client.starttls(ssl_context=context)
            der = client.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    else:
        # smtplib checks the certificate against the host it connected to: "localhost", as the certificate says.
        with smtplib.SMTP("localhost", port, local_hostname="client.test", timeout=30) as client:
            client.starttls(context=context)
            der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return x509.load_der_x509_certificate(der)


DOORS = ("smtp_submission_port", "smtp_submissions_port", "smtp_relay_port", "imap_port", "imaps_port", "http_port")


def test_an_external_server_certificate_is_served_everywhere_and_renewed_by_sighup(tmp_path: Path) -> None:
    """tls.server_certificate_file (IGC-Santé in production, here a CA made in the test): every listener shows
    it with its chain; a renewed file is shown after SIGHUP with existing sessions kept; a renewal that does
    not pass the checks (expired) keeps the certificate being served, and the log names the key."""
    from tests.security.external_ca import NOW, ExternalCA

    ca = ExternalCA(tmp_path / "igc-sante")
    cert, key, first = ca.issue("gateway")
    gateway = GatewayProcess(tmp_path / "gw")
    gateway.init_demo()
    (gateway.data_dir / "gateway.toml").write_text(
        f'[tls]\nserver_certificate_file = "{cert}"\nserver_key_file = "{key}"\n'
        f'server_chain_file = "{ca.intermediate_file}"\n')
    gateway.start()
    try:
        for door in DOORS:
            assert _served_certificate(gateway, door, ca.root_file) == first, door
        # openssl s_client sees it too, verified to the external root through the intermediate the server sends.
        shown = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.ports['smtp_submission_port']}",
                                "-starttls", "smtp", "-CAfile", str(ca.root_file), "-verify_hostname", "localhost",
                                "-verify_return_error", "-showcerts"],
                               input="QUIT\n", capture_output=True, text=True, timeout=60)
        assert "Verify return code: 0 (ok)" in shown.stdout, shown.stdout + shown.stderr
        assert "AC IGC-SANTE ELEMENTAIRE SERVEURS TEST" in shown.stdout

        doctor = gateway.account("PER")
        session = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"],
                                    ssl_context=ssl.create_default_context(cafile=str(ca.root_file)), timeout=30)
        assert session.login(doctor["address"], doctor["password"])[0] == "OK"

        # The operator installs the renewed certificate and key (new serial, new key) and reloads.
        _cert, _key, renewed = ca.issue("gateway")
        assert renewed.serial_number != first.serial_number
        _sighup(gateway)
        for door in DOORS:
            assert _served_certificate(gateway, door, ca.root_file) == renewed, door
        assert session.noop()[0] == "OK"

        # A renewal that does not pass the checks is not served: the running certificate stays.
        ca.issue("gateway", not_before=NOW - dt.timedelta(days=400), not_after=NOW - dt.timedelta(days=1))
        _sighup(gateway)
        assert _served_certificate(gateway, "imaps_port", ca.root_file) == renewed
        assert "tls.server_certificate_file: " in gateway.log_text() and "expired on" in gateway.log_text()
        assert session.noop()[0] == "OK"

        # New paths in the configuration file (the chain now inside the certificate file) are taken by SIGHUP.
        other_cert, other_key, other = ca.issue("gateway-2026")
        other_cert.write_bytes(other_cert.read_bytes() + ca.intermediate_file.read_bytes())
        (gateway.data_dir / "gateway.toml").write_text(
            f'[tls]\nserver_certificate_file = "{other_cert}"\nserver_key_file = "{other_key}"\n')
        _sighup(gateway)
        for door in DOORS:
            assert _served_certificate(gateway, door, ca.root_file) == other, door
        assert "apply at the next restart" not in gateway.log_text()
        assert session.noop()[0] == "OK"
        session.logout()
    finally:
        gateway.stop()

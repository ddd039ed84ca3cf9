"""Real command-line clients submit to the gateway: swaks, msmtp and curl (Debian packages;
the test script installs them). Each message must arrive in the recipient's mailbox."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.smtp.gateway_thread import GatewayThread


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install -y {binary})")
    return path


def _run(command: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=60)
    if b"requires Net::SSLeay" in result.stderr:
        pytest.skip("swaks has no TLS support here (apt-get install -y libnet-ssleay-perl libio-socket-ssl-perl)")
    assert result.returncode == 0, f"{command[0]} failed ({result.returncode}):\n{result.stdout.decode()}\n{result.stderr.decode()}"
    return result


def _arrived(gw: GatewayThread, address: str, marker: str) -> bytes:
    gw.wait_delivered()
    found = [m for m in gw.inbox(address) if marker.encode() in m]
    assert len(found) == 1, f"{marker} delivered {len(found)} times"
    return found[0]


def _message(sender: str, to: str, marker: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {marker}\r\nMessage-ID: <{marker}@client.test>\r\n\r\n"
            f"Bonjour, {marker}.\r\n").encode()


@pytest.mark.parametrize("tls_flag, port_kind", [("--tls", "submission"), ("--tls-on-connect", "submissions")])
def test_swaks(gw: GatewayThread, tls_flag: str, port_kind: str) -> None:
    swaks = _need("swaks")
    doctor, pharmacist = gw.account("PER", 0), gw.account("PER", 1)
    marker = f"swaks-{uuid.uuid4().hex[:8]}"
    result = _run([swaks, "--server", "127.0.0.1", "--port", str(gw.ports[port_kind]), tls_flag,
                   "--tls-verify", "--tls-ca-path", gw.ca_file, "--tls-sni", "localhost",
                   "--auth", "PLAIN", f"--auth-user={doctor.address}", f"--auth-password={doctor.password}",
                   "--from", doctor.address, "--to", pharmacist.address, "--header", f"Subject: {marker}",
                   "--body", "Bonjour depuis swaks."])
    assert b"<~  250 2.0.0 OK queued as" in result.stdout
    _arrived(gw, pharmacist.address, marker)


def test_swaks_is_refused_before_tls(gw: GatewayThread) -> None:
    swaks = _need("swaks")
    doctor = gw.account("PER")
    result = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(gw.ports["submission"]),
                             "--auth", "PLAIN", f"--auth-user={doctor.address}", f"--auth-password={doctor.password}",
                             "--from", doctor.address, "--to", doctor.address], capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"Host did not advertise authentication" in result.stdout + result.stderr


@pytest.mark.parametrize("starttls", ["on", "off"])
def test_msmtp(gw: GatewayThread, tmp_path: Path, starttls: str) -> None:
    msmtp = _need("msmtp")
    nurse, doctor = gw.account("PER", 2), gw.account("PER", 0)
    marker = f"msmtp-{uuid.uuid4().hex[:8]}"
    port = gw.ports["submission" if starttls == "on" else "submissions"]
    config = tmp_path / "msmtprc"
    config.write_text(f"account test\nhost 127.0.0.1\nport {port}\ntls on\ntls_starttls {starttls}\n"
                      f"tls_trust_file {gw.ca_file}\nauth plain\nuser {nurse.address}\npassword {nurse.password}\n"
                      f"from {nurse.address}\naccount default : test\n")
    config.chmod(0o600)
    _run([msmtp, "-C", str(config), doctor.address], stdin=_message(nurse.address, doctor.address, marker))
    _arrived(gw, doctor.address, marker)


@pytest.mark.parametrize("scheme, port_kind", [("smtp", "submission"), ("smtps", "submissions")])
def test_curl(gw: GatewayThread, tmp_path: Path, scheme: str, port_kind: str) -> None:
    curl = _need("curl")
    doctor, nurse = gw.account("PER", 0), gw.account("PER", 2)
    marker = f"curl-{uuid.uuid4().hex[:8]}"
    mail = tmp_path / "mail.eml"
    mail.write_bytes(_message(doctor.address, nurse.address, marker))
    _run([curl, "--silent", "--show-error", "--url", f"{scheme}://127.0.0.1:{gw.ports[port_kind]}",
          "--ssl-reqd", "--cacert", gw.ca_file, "--user", f"{doctor.address}:{doctor.password}",
          "--mail-from", doctor.address, "--mail-rcpt", nurse.address, "--upload-file", str(mail)])
    _arrived(gw, nurse.address, marker)

"""DKIM: keys, signing, and verification through a real DNS server (dnsmasq serving the TXT record)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import DkimSettings, OutboundSettings
from gateway.security.dkim import DkimKeys, DkimSigner, verify_dkim
from tests.dnsmasq import Dnsmasq, DnsZone

DOMAIN = "signed.test"
SELECTOR = "mss1"
MESSAGE = (b"From: Dr Martin <martin@signed.test>\r\nTo: <patient@other.test>\r\nSubject: Compte rendu\r\n"
           b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <cr-1@signed.test>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nBonjour,\r\nvoici le compte rendu.  \r\n\r\n")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> DkimKeys:
    store = DkimKeys(tmp_path_factory.mktemp("dkim"))
    store.generate(DOMAIN, SELECTOR)
    return store


@pytest.fixture(scope="module")
def dns_settings(keys: DkimKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutboundSettings]:
    key = keys.load(DOMAIN, SELECTOR)
    assert key is not None
    zone = DnsZone(zones=["test"], txt=[(key.dns_name, key.txt_record),
                                        (f"broken._domainkey.{DOMAIN}", "v=DKIM1; k=rsa; p=")])
    server = Dnsmasq(tmp_path_factory.mktemp("dns"), zone).start()
    yield OutboundSettings(nameserver="127.0.0.1", nameserver_port=server.port, dns_timeout_seconds=2)
    server.stop()


def sign(keys: DkimKeys, message: bytes = MESSAGE) -> bytes:
    signature = DkimSigner(keys, DkimSettings(selector=SELECTOR)).signature_for(message)
    assert signature is not None
    return signature.encode() + message


def test_key_file_is_private_and_record_is_publishable(keys: DkimKeys) -> None:
    key = keys.load(DOMAIN, SELECTOR)
    assert key is not None
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert key.txt_record.startswith("v=DKIM1; k=rsa; p=MII")
    assert key.zone_line().startswith(f"{SELECTOR}._domainkey.{DOMAIN}. IN TXT (")


def test_signature_is_relaxed_sha256_over_the_expected_fields(keys: DkimKeys) -> None:
    header = sign(keys).split(b"\r\n\r\n", 1)[0].decode()
    unfolded = " ".join(header.split())
    assert "a=rsa-sha256" in unfolded and "c=relaxed/relaxed" in unfolded
    assert f"d={DOMAIN}" in unfolded and f"s={SELECTOR}" in unfolded
    signed = unfolded.split(" h=", 1)[1].split(";", 1)[0].replace(" ", "").split(":")
    for name in ("from", "to", "subject", "date", "message-id", "mime-version", "content-type"):
        assert name in signed
    assert signed.count("from") == 2                         # over-signed: a second From breaks it


def test_no_key_no_signature(keys: DkimKeys) -> None:
    other = MESSAGE.replace(b"martin@signed.test", b"someone@elsewhere.test")
    assert DkimSigner(keys, DkimSettings(selector=SELECTOR)).signature_for(other) is None


async def test_sign_then_verify_through_dns(keys: DkimKeys, dns_settings: OutboundSettings) -> None:
    result = await verify_dkim(sign(keys), settings=dns_settings)
    assert result.startswith(f"dkim=pass header.d={DOMAIN} header.s={SELECTOR}")


async def test_tampered_body_fails(keys: DkimKeys, dns_settings: OutboundSettings) -> None:
    tampered = sign(keys).replace(b"voici le compte rendu", b"voici un autre texte")
    result = await verify_dkim(tampered, settings=dns_settings)
    assert result.startswith("dkim=fail (body hash mismatch")
    assert f"header.d={DOMAIN}" in result


async def test_tampered_subject_fails(keys: DkimKeys, dns_settings: OutboundSettings) -> None:
    tampered = sign(keys).replace(b"Subject: Compte rendu", b"Subject: Facture")
    assert (await verify_dkim(tampered, settings=dns_settings)).startswith("dkim=fail")


async def test_unsigned_message_is_none(dns_settings: OutboundSettings) -> None:
    assert await verify_dkim(MESSAGE, settings=dns_settings) == "dkim=none"


async def test_missing_key_is_permerror(keys: DkimKeys, dns_settings: OutboundSettings) -> None:
    signed = sign(keys).replace(f"s={SELECTOR}".encode(), b"s=absent", 1)
    assert (await verify_dkim(signed, settings=dns_settings)).startswith("dkim=permerror")


def test_cli_keygen_prints_record_and_refuses_to_overwrite(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "data"), "dkim", "keygen", "ours.test",
               "--selector", "s2026"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert 's2026._domainkey.ours.test. IN TXT ( "v=DKIM1; k=rsa; p=' in first.stdout
    key_path = tmp_path / "data" / "dkim" / "ours.test" / "s2026.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = subprocess.run(command[:-1] + ["not a label"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "selector" in bad.stderr

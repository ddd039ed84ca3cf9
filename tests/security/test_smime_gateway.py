"""S/MIME through the real gateway: messages signed/encrypted by ``openssl cms`` arrive verified and
decrypted (Authentication-Results, RFC 8601 + RFC 7281), hostile ones get the right verdict, and what
the gateway signs and encrypts for its users verifies and decrypts with ``openssl cms``; a recipient
that must be encrypted to but has no usable certificate is refused at RCPT."""

from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import re
import secrets
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from gateway.app import open_services
from gateway.config import load_settings
from gateway.security.pki import TestPKI
from gateway.security.smime_policy import InboundResult
from gateway.storage.models import Mailbox
from tests.harness import GatewayProcess, run_cli, wait_until
from tests.security.smime_pki import NOW, Issued, make_ca, make_leaf

PATIENCE = 60.0  # a bound on a hang, not a timing assertion


class World:
    """The gateway, its test PKI, and certificates of some demo mailboxes written to files."""

    def __init__(self, gateway: GatewayProcess, files: Path) -> None:
        self.gateway = gateway
        self.files = files
        self.issued: dict[str, tuple[Path, Path]] = {}
        self.pki = TestPKI.from_settings(load_settings(data_dir=gateway.data_dir, environ=gateway.env))
        self.claire, self.marc, self.sophie = (gateway.account("PER", i) for i in range(3))
        self.patient, self.other_patient = gateway.account("PAT", 0), gateway.account("PAT", 1)
        self.secretariat = gateway.account("ORG")
        self.marc_files: tuple[Path, Path] = (Path(), Path())          # no certificate: what reaches it is never re-encrypted

    def issue(self, address: str, key_type: str = "ec") -> tuple[Path, Path]:
        name = f"smime-{address}-{key_type}-{secrets.token_hex(3)}"
        issued = self.pki.issue_smime(address, address.split("@")[0], key_type, name=name)
        self.issued[address] = (issued.cert_path, issued.key_path)
        return issued.cert_path, issued.key_path

    def intermediate(self) -> Issued:
        key = serialization.load_pem_private_key(self.pki.intermediate_key_path.read_bytes(), None)
        certificate = x509.load_pem_x509_certificate(self.pki.intermediate_cert_path.read_bytes())
        return Issued(certificate, key)  # type: ignore[arg-type]

    def cli(self, *args: str) -> str:
        result = self.gateway.cli(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


def openssl(*arguments: str | Path, data: bytes | None = None) -> bytes:
    completed = subprocess.run(["openssl", "cms", *map(str, arguments)], input=data, capture_output=True, check=False)
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    return completed.stdout


def entity(marker: str) -> bytes:
    return (f"Content-Type: text/plain; charset=utf-8\r\n\r\nResultat de biologie {marker}: "
            "hemoglobine 14.2 g/dL\r\n").encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("smime-gateway") / "data",
                             extra_env={"GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"})
    gateway.start()
    current = World(gateway, tmp_path_factory.mktemp("smime-files"))
    patient_cert, patient_key = current.issue(current.patient["address"])
    current.cli("smime", "cert", "import", current.patient["address"], str(patient_cert), "--key", str(patient_key),
                "--hold-key")
    claire_cert, claire_key = current.issue(current.claire["address"])
    current.cli("smime", "cert", "import", current.claire["address"], str(claire_cert), "--key", str(claire_key),
                "--hold-key")
    marc_cert, marc_key = current.issue(current.marc["address"], "rsa")
    current.marc_files = (marc_cert, marc_key)
    current.cli("smime", "cert", "import", current.marc["address"], str(marc_cert))   # published, key not held
    yield current
    gateway.stop()


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def submit(world: World, account: dict[str, str], raw: bytes, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", world.gateway.ports["smtp_submission_port"], timeout=30) as smtp:
        smtp.starttls(context=_tls(world.gateway))
        smtp.login(account["address"], account["password"])
        # RFC 5321 2.3.8: on the wire every line ends with CRLF (openssl writes LF; the gateway refuses bare LF).
        smtp.sendmail(account["address"], recipients, re.sub(rb"\r?\n", b"\r\n", raw))


def arrived(world: World, account: dict[str, str], marker: str) -> email.message.Message:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        with imaplib.IMAP4("127.0.0.1", world.gateway.ports["imap_port"], timeout=30) as imap:
            imap.starttls(ssl_context=_tls(world.gateway))
            imap.login(account["address"], account["password"])
            if imap.select("INBOX", readonly=True)[0] == "OK":
                _, found = imap.uid("SEARCH", "SUBJECT", marker)
                if found[0]:
                    _, data = imap.uid("FETCH", found[0].split()[-1], "(BODY.PEEK[])")
                    raw = next(part[1] for part in data if isinstance(part, tuple))
                    return email.message_from_bytes(raw, policy=email.policy.compat32)
        time.sleep(0.2)
    raise AssertionError(f"{marker} never reached {account['address']}:\n{world.gateway.log_text()[-3000:]}")


def smime_result(message: email.message.Message, hostname: str = "localhost") -> str:
    fields = [" ".join(str(v).split()) for v in message.get_all("Authentication-Results", [])]
    ours = [f for f in fields if f.startswith(f"{hostname};") and "smime=" in f]
    assert len(ours) == 1, fields
    return ours[0]


def headers(sender: str, recipient: str, subject: str) -> list[str]:
    return ["-from", sender, "-to", recipient, "-subject", subject]


def decrypted_copy(world: World, address: str, marker: bytes) -> InboundResult:
    async def find() -> InboundResult:
        settings = load_settings(data_dir=world.gateway.data_dir, environ=world.gateway.env)
        async with open_services(settings, migrate=False) as services:
            async with services.db.session() as session:
                mailbox_id = await session.scalar(select(Mailbox.id).where(Mailbox.address == address))
                rows = (await session.scalars(select(InboundResult).where(InboundResult.mailbox_id == mailbox_id))).all()
            for row in rows:
                copy = await services.smime.decrypted_copy(f"{row.queue_id}:0", mailbox_id)
                if copy is not None and marker in copy.content:
                    return row
        raise AssertionError(f"no decrypted copy holding {marker!r} for {address}")

    return asyncio.run(find())


# --------------------------------------------------------------------------- inbound


def test_openssl_signed_and_encrypted_for_a_patient_is_verified_and_decrypted(world: World) -> None:
    marker = "IN" + secrets.token_hex(6)
    sender, patient = world.sophie["address"], world.patient["address"]
    cert, key = world.issue(sender)
    signed = openssl("-sign", "-signer", cert, "-inkey", key, "-certfile", world.pki.intermediate_cert_path,
                     *headers(sender, patient, f"Compte rendu {marker}"), data=entity(marker))
    patient_cert = world.issued[patient][0]
    sealed = openssl("-encrypt", "-aes256", *headers(sender, patient, f"Compte rendu {marker}"),
                     "-recip", patient_cert, data=signed)
    submit(world, world.sophie, sealed, [patient])

    delivered = arrived(world, world.patient, marker)
    assert delivered.get_content_type() == "application/pkcs7-mime"          # kept as received
    result = smime_result(delivered)
    assert "smime=pass" in result and f"header.from={sender}" in result and f"body.smime-identifier={sender}" in result
    row = decrypted_copy(world, patient, marker.encode())
    assert row.status == "pass" and row.encrypted and row.signer == sender


def _signed_by(world: World, issued_cert: Path, issued_key: Path, sender: str, to: str, marker: str,
               *extra: str | Path) -> bytes:
    return openssl("-sign", "-signer", issued_cert, "-inkey", issued_key, *extra,
                   *headers(sender, to, f"Hostile {marker}"), data=entity(marker))


def _write(issued: Issued, directory: Path, stem: str) -> tuple[Path, Path]:
    return issued.write(directory, stem)


@pytest.mark.parametrize("case,expected", [
    ("untrusted-ca", "smime=fail"),
    ("expired", "smime=fail"),
    ("revoked", "smime=fail"),
    ("from-mismatch", "smime=policy"),
    ("tampered", "smime=fail"),
    ("unknown-key", "smime=neutral"),
    ("malformed", "smime=permerror"),
])
def test_hostile_inbound_gets_the_right_verdict(world: World, case: str, expected: str) -> None:
    marker = case.upper() + secrets.token_hex(5)
    sender, to = world.sophie["address"], world.secretariat["address"]
    raw = _hostile(world, case, sender, to, marker)
    submit(world, world.sophie, raw, [to])
    result = smime_result(arrived(world, world.secretariat, marker))
    assert expected in result, result


def _hostile(world: World, case: str, sender: str, to: str, marker: str) -> bytes:
    directory = world.files
    if case == "untrusted-ca":
        cert, key = _write(make_leaf(make_ca("Rogue CA"), sender), directory, f"rogue-{marker}")
        return _signed_by(world, cert, key, sender, to, marker)
    if case == "expired":
        leaf = make_leaf(world.intermediate(), sender, not_before=NOW - timedelta(days=400),
                         not_after=NOW - timedelta(days=1))
        cert, key = _write(leaf, directory, f"expired-{marker}")
        return _signed_by(world, cert, key, sender, to, marker, "-certfile", world.pki.intermediate_cert_path)
    if case == "revoked":
        issued = world.pki.issue_smime(sender, "Sophie", "ec", name=f"revoked-{marker}")
        world.cli("certs", "revoke", f"revoked-{marker}", "--reason", "keyCompromise")
        return _signed_by(world, issued.cert_path, issued.key_path, sender, to, marker,
                          "-certfile", world.pki.intermediate_cert_path)
    if case == "from-mismatch":
        cert, key = world.issue(world.marc["address"])          # a valid certificate, of somebody else
        return _signed_by(world, cert, key, sender, to, marker, "-certfile", world.pki.intermediate_cert_path)
    if case == "tampered":
        cert, key = world.issue(sender)
        signed = _signed_by(world, cert, key, sender, to, marker, "-certfile", world.pki.intermediate_cert_path)
        return signed.replace(b"14.2 g/dL", b"41.2 g/dL")
    if case == "unknown-key":
        cert, _key = _write(make_leaf(world.intermediate(), "stranger@elsewhere.example"), directory, f"stranger-{marker}")
        return openssl("-encrypt", "-aes256", *headers(sender, to, f"Hostile {marker}"), "-recip", cert,
                       data=entity(marker))
    assert case == "malformed"
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: Hostile {marker}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: application/pkcs7-mime; smime-type=signed-data; name=smime.p7m\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG\r\n").encode()


# --------------------------------------------------------------------------- outbound


def _plain(sender: str, recipients: list[str], marker: str) -> bytes:
    return (f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: Sortant {marker}\r\n"
            f"Message-ID: <{marker}@demo.test>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\nLettre de liaison {marker}\r\n").encode()


def test_gateway_signs_and_encrypts_and_openssl_decrypts_and_verifies(world: World) -> None:
    marker = "OUT" + secrets.token_hex(6)
    sender, to = world.claire["address"], world.marc["address"]
    submit(world, world.claire, _plain(sender, [to], marker), [to])

    delivered = arrived(world, world.marc, marker)
    assert delivered.get_content_type() == "application/pkcs7-mime"
    result = smime_result(delivered)
    assert "smime=neutral" in result                                # we hold no key of marc's: flagged, as is
    # ... and the field says what happened: we encrypted it for marc, it is not someone else's mail.
    assert "encrypted by this gateway at submission to the recipient's certificate" in result
    assert "other recipients" not in result
    marc_cert, marc_key = world.marc_files
    decrypted = openssl("-decrypt", "-recip", marc_cert, "-inkey", marc_key,
                        data=delivered.as_bytes())
    verified = openssl("-verify", "-CAfile", world.pki.ca_bundle_path, "-purpose", "smimesign", data=decrypted)
    assert f"Lettre de liaison {marker}".encode() in verified


def test_mixed_recipients_get_an_encrypted_and_a_signed_copy(world: World) -> None:
    marker = "MIX" + secrets.token_hex(6)
    sender, with_cert, without = world.claire["address"], world.marc["address"], world.sophie["address"]
    submit(world, world.claire, _plain(sender, [with_cert, without], marker), [with_cert, without])

    assert arrived(world, world.marc, marker).get_content_type() == "application/pkcs7-mime"
    signed = arrived(world, world.sophie, marker)
    assert signed.get_content_type() == "multipart/signed"
    assert "smime=pass" in smime_result(signed)
    verified = openssl("-verify", "-CAfile", world.pki.ca_bundle_path, data=signed.as_bytes())
    assert f"Lettre de liaison {marker}".encode() in verified


def test_encrypt_always_without_certificate_is_refused_at_rcpt(world: World) -> None:
    target = world.other_patient["address"]
    world.cli("smime", "policy", "set", target, "encrypt=always")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        submit(world, world.claire, _plain(world.claire["address"], [target], "REFUSED"), [target])
    code, text = refused.value.recipients[target]
    assert code == 550 and text.startswith(b"5.7.1") and b"encryption is required" in text
    assert b"no S/MIME certificate" in text


def test_encrypt_always_with_revoked_certificate_is_refused(world: World) -> None:
    target = world.sophie["address"]
    cert, _key = world.issue(target)
    listed = world.cli("smime", "cert", "import", target, str(cert), "--json")
    fingerprint = listed.split('"fingerprint": "')[1][:16]
    world.cli("smime", "cert", "revoke", fingerprint, "--reason", "keyCompromise")
    world.cli("smime", "policy", "set", target, "encrypt=always")
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            submit(world, world.claire, _plain(world.claire["address"], [target], "REVOKED"), [target])
        assert b"revoked" in refused.value.recipients[target][1]
    finally:
        world.cli("smime", "policy", "set", target, "encrypt=inherit")


# --------------------------------------------------------------------------- retention (last: it purges every finished message)


def test_the_queue_purge_removes_the_verdict_and_the_decrypted_copy_with_the_message(world: World) -> None:
    """An encrypted message decrypted for the patient leaves a verdict row and a plaintext blob (for the DMP
    bridge). Once the message is purged (`gateway queue purge`, windows at 0 h: past filing), both go with it,
    and the purge's summary counts the row."""
    marker = "PURGE" + secrets.token_hex(6)
    sender, patient = world.sophie["address"], world.patient["address"]
    cert, key = world.issued.get(sender) or world.issue(sender)
    signed = openssl("-sign", "-signer", cert, "-inkey", key, "-certfile", world.pki.intermediate_cert_path,
                     *headers(sender, patient, f"Compte rendu {marker}"), data=entity(marker))
    sealed = openssl("-encrypt", "-aes256", *headers(sender, patient, f"Compte rendu {marker}"),
                     "-recip", world.issued[patient][0], data=signed)
    submit(world, world.sophie, sealed, [patient])
    arrived(world, world.patient, marker)
    row = decrypted_copy(world, patient, marker.encode())
    assert row.decrypted_blob_id is not None
    blob = world.gateway.data_dir / "blobs" / row.decrypted_blob_id[:2] / row.decrypted_blob_id[2:4] / row.decrypted_blob_id
    assert blob.exists()

    env = world.gateway.env | {"GATEWAY_OUTBOUND_FINISHED_LISTED_HOURS": "0",
                               "GATEWAY_RETENTION_FILING_JOBS_KEPT_HOURS": "0"}
    passes: list[str] = []

    def purged() -> bool | None:
        """The message is gone once its filing job has finished and a purge pass has run."""
        passes.append(run_cli("queue", "purge", data_dir=world.gateway.data_dir, env=env, check=True).stdout)
        return True if world.gateway.cli("queue", "show", row.queue_id).returncode != 0 else None

    wait_until(purged, timeout=PATIENCE, what=f"the queue purge removed {row.queue_id}")
    assert any("smime_inbound_results" in summary for summary in passes), passes

    async def remaining() -> int:
        settings = load_settings(data_dir=world.gateway.data_dir, environ=world.gateway.env)
        async with open_services(settings, migrate=False) as services, services.db.session() as session:
            return len((await session.scalars(select(InboundResult).where(InboundResult.queue_id == row.queue_id))).all())

    assert asyncio.run(remaining()) == 0
    assert not blob.exists()

"""GnuPG's gpgsm against the real gateway, both ways, over SMTP submission and IMAP.

* A mailbox whose RSA certificate the gateway's test PKI issued (``gateway certs issue smime``)
  signs with gpgsm (detached, multipart/signed); the message submitted with smtplib arrives with
  ``Authentication-Results: ...; smime=pass``.
* The gateway signs (sender's held RSA key, ``sign=always``) and encrypts (``encrypt=always``, the
  recipient's RSA certificate imported with ``gateway smime cert import``, AES-256-CBC, RSA
  PKCS#1 v1.5 key transport: what gpgsm 2.2 reads); the message fetched over IMAP is decrypted and
  its signature verified by gpgsm holding the recipient's key.

gpgsm runs in a throwaway GNUPGHOME trusting the gateway's root CA (trustlist.txt); its agent is
stopped at teardown. See test_smime_gpgsm.py for what gpgsm 2.2 cannot do (OAEP, GCM, ECDH).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import cms  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.security import smime
from tests.harness import GatewayProcess
from tests.security.test_smime_gateway import World, arrived, smime_result, submit
from tests.security.test_smime_gpgsm import PASSPHRASE, Gpgsm, import_p12

pytestmark = pytest.mark.skipif(shutil.which("gpgsm") is None, reason="gpgsm is not installed")


@dataclass(frozen=True)
class Issued:
    """A certificate issued by ``gateway certs issue smime``, with its files."""

    address: str
    cert_path: Path
    key_path: Path
    fingerprint_sha256: str


class GpgsmWorld:
    def __init__(self, world: World, gpgsm: Gpgsm) -> None:
        self.world = world
        self.gpgsm = gpgsm

    def issue_rsa(self, address: str, *options: str) -> Issued:
        """``gateway certs issue smime`` (RSA by default; issued and registered to the mailbox in one step),
        then into gpgsm as PKCS#12 (key and chain)."""
        name = f"gpgsm-{address.split('@')[0]}-{secrets.token_hex(3)}"
        details = json.loads(self.world.cli("certs", "issue", "smime", "--email", address, "--cn", address.split("@")[0],
                                            "--name", name, *options, "--json"))
        assert details["key"] == "rsa 3072" and details["registered"] is True and details["published"] is True
        assert details["key_held"] is ("--hold-key" in options)
        issued = Issued(address, Path(details["cert_path"]), Path(details["key_path"]), details["fingerprint_sha256"])
        import_p12(self.gpgsm, lambda: self._p12(issued))
        return issued

    def _p12(self, issued: Issued) -> Path:
        """PKCS#12 with the legacy 3DES/SHA-1 protection that gpgsm 2.2 still reads."""
        key = serialization.load_pem_private_key(issued.key_path.read_bytes(), None)
        certificate = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
        intermediate = x509.load_pem_x509_certificate(self.world.pki.intermediate_cert_path.read_bytes())
        encryption = (serialization.PrivateFormat.PKCS12.encryption_builder()
                      .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
                      .hmac_hash(hashes.SHA1()).build(PASSPHRASE.encode()))
        path = self.gpgsm.home / f"{issued.cert_path.stem}.p12"
        path.write_bytes(pkcs12.serialize_key_and_certificates(
            b"leaf", key, certificate, [intermediate], encryption))  # type: ignore[arg-type]
        return path


def _gpgsm_home(directory: Path, world: World) -> Gpgsm:
    home = directory / "gnupg"
    home.mkdir(mode=0o700)
    root = x509.load_pem_x509_certificate(world.pki.root_cert_path.read_bytes())
    # gpgsm's trustlist.txt: SHA-1 fingerprints of trusted roots, "S" = for S/MIME.
    (home / "trustlist.txt").write_text(f"{root.fingerprint(hashes.SHA1()).hex(':').upper()} S relax\n")
    (home / "gpgsm.conf").write_text("disable-crl-checks\ndisable-policy-checks\n")
    (home / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
    tool = Gpgsm(home)
    for path in (world.pki.root_cert_path, world.pki.intermediate_cert_path):
        tool.run("--import", path)
    return tool


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgsmWorld]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("smime-gpgsm") / "data",
                             extra_env={"GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"})
    gateway.start()
    directory = tmp_path_factory.mktemp("gpgsm")
    gpgsm: Gpgsm | None = None
    try:
        world = World(gateway, directory)
        gpgsm = _gpgsm_home(directory, world)
        yield GpgsmWorld(world, gpgsm)
    finally:
        if gpgsm is not None:  # stop the gpg-agent this home started, and only that one
            subprocess.run(["gpgconf", "--homedir", str(gpgsm.home), "--kill", "all"], capture_output=True, check=False)
        gateway.stop()


def _entity(marker: str) -> bytes:
    return (f"Content-Type: text/plain; charset=utf-8\r\n\r\nCompte rendu opératoire {marker}: "
            "suites simples.\r\n").encode()


def _detached(sender: str, to: str, subject: str, entity: bytes, signature: bytes) -> bytes:
    boundary = b"gpgsm-" + secrets.token_hex(6).encode()
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{secrets.token_hex(8)}@demo.test>\r\n"
            "MIME-Version: 1.0\r\n".encode()
            + b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="'
            + boundary + b'"\r\n\r\n--' + boundary + b"\r\n" + entity + b"\r\n--" + boundary + b"\r\n"
            b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=smime.p7s\r\n\r\n"
            + base64.encodebytes(signature).replace(b"\n", b"\r\n") + b"--" + boundary + b"--\r\n")


def test_gpgsm_signed_submission_arrives_with_smime_pass(setup: GpgsmWorld, tmp_path: Path) -> None:
    world = setup.world
    sender, to = world.sophie["address"], world.secretariat["address"]
    setup.issue_rsa(sender)
    marker = "GSMIN" + secrets.token_hex(5)
    entity = _entity(marker)
    (tmp_path / "entity").write_bytes(entity)
    setup.gpgsm.run("--local-user", sender, "--include-certs", "-1", "--detach-sign",
                    "--output", tmp_path / "sig.p7s", tmp_path / "entity")

    submit(world, world.sophie, _detached(sender, to, f"CR {marker}", entity, (tmp_path / "sig.p7s").read_bytes()),
           [to])

    delivered = arrived(world, world.secretariat, marker)
    assert delivered.get_content_type() == "multipart/signed"                  # delivered as signed
    result = smime_result(delivered)
    assert "smime=pass" in result and f"header.from={sender}" in result and f"body.smime-identifier={sender}" in result


def test_gateway_signed_and_encrypted_message_decrypts_and_verifies_with_gpgsm(setup: GpgsmWorld,
                                                                              tmp_path: Path) -> None:
    world = setup.world
    sender, to = world.claire["address"], world.marc["address"]
    signer = setup.issue_rsa(sender, "--hold-key")                              # the gateway signs for claire
    setup.issue_rsa(to)                                         # gpgsm holds marc's key, the gateway the certificate
    world.cli("smime", "policy", "set", sender, "sign=always", "encrypt=always")
    marker = "GSMOUT" + secrets.token_hex(5)
    letter = (f"From: {sender}\r\nTo: {to}\r\nSubject: Lettre {marker}\r\nMessage-ID: <{marker}@demo.test>\r\n"
              f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nLettre de liaison {marker}\r\n")
    try:
        submit(world, world.claire, letter.encode(), [to])
        delivered = arrived(world, world.marc, marker)
    finally:
        world.cli("smime", "policy", "set", sender, "sign=inherit", "encrypt=inherit")

    assert delivered.get_content_type() == "application/pkcs7-mime"
    assert "encrypted by this gateway at submission" in smime_result(delivered)
    enveloped = delivered.get_payload(decode=True)
    assert isinstance(enveloped, bytes)
    assert _content_cipher(enveloped) == "aes256_cbc"
    (tmp_path / "sealed.p7m").write_bytes(enveloped)
    decrypted = setup.gpgsm.run("--output", tmp_path / "inner.eml", "--decrypt", tmp_path / "sealed.p7m")
    assert b"[GNUPG:] DECRYPTION_OKAY" in decrypted.stdout

    inner = smime.parse_entity((tmp_path / "inner.eml").read_bytes())
    content, signature_part = smime.split_multipart(inner)
    (tmp_path / "content").write_bytes(content)
    (tmp_path / "sig.p7s").write_bytes(smime.decode_body(smime.parse_entity(signature_part)))
    verified = setup.gpgsm.run("--verify", tmp_path / "sig.p7s", tmp_path / "content")
    assert b"[GNUPG:] GOODSIG" in verified.stdout and b"[GNUPG:] VALIDSIG" in verified.stdout
    assert _validsig_fingerprint(verified.stdout) == _sha1_fingerprint(signer.cert_path)
    assert f"Lettre de liaison {marker}".encode() in content


def _content_cipher(enveloped_der: bytes) -> str:
    info = cms.ContentInfo.load(enveloped_der)
    assert info["content_type"].native == "enveloped_data"
    return str(info["content"]["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"].native)


def _validsig_fingerprint(status: bytes) -> str:
    line = next(line for line in status.decode().splitlines() if line.startswith("[GNUPG:] VALIDSIG "))
    return line.split()[2].upper()


def _sha1_fingerprint(cert_path: Path) -> str:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).fingerprint(hashes.SHA1()).hex().upper()

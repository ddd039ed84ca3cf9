"""Interoperability with the OpenSSL ``cms`` command, in both directions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.security import smime
from gateway.security.certpath import certificate_emails
from gateway.security.cms import ContentCipher, KeyTransport
from tests.security.smime_pki import NOW, Issued, Pki, build_pki

MESSAGE = (
    b"From: Alice <alice@clinic.example>\r\n"
    b"To: Bob <bob@hospital.example>\r\n"
    b"Subject: Compte rendu\r\n"
    b"Date: Mon, 02 Jun 2025 10:00:00 +0200\r\n"
    b"Message-ID: <cr-1@clinic.example>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"R\xc3\xa9sultats normaux.\r\n"
    b"-- \r\nDr Alice\r\n"
)
ENTITY = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHemoglobin 14.2 g/dL\r\nPlatelets 250 G/L\r\n"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return build_pki()


@pytest.fixture(scope="module")
def files(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    for stem in ("root", "intermediate", "ec_root", "alice", "bob", "carol"):
        issued: Issued = getattr(pki, stem)
        issued.write(directory, stem)
    anchors = b"".join((directory / f"{name}.crt").read_bytes() for name in ("root", "ec_root"))
    (directory / "anchors.pem").write_bytes(anchors)
    return directory


def openssl(*arguments: str | Path, data: bytes | None = None) -> bytes:
    completed = subprocess.run(["openssl", "cms", *map(str, arguments)], input=data, capture_output=True, check=False)
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    return completed.stdout


# --- ours -> openssl ---------------------------------------------------------


@pytest.mark.parametrize("signer", ["alice", "bob", "carol"])
@pytest.mark.parametrize("detached", [True, False])
@pytest.mark.parametrize("rsa_pss", [False, True])
@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha512"])
def test_openssl_verifies_our_signature(pki: Pki, files: Path, signer: str, detached: bool, rsa_pss: bool, digest: str) -> None:
    identity = getattr(pki, signer).identity()
    options = smime.OutgoingOptions(detached=detached, rsa_pss=rsa_pss, digest=digest)
    signed = smime.process_outgoing(MESSAGE, sign_with=identity, options=options)
    content = openssl("-verify", "-CAfile", files / "anchors.pem", "-purpose", "smimesign", data=signed)
    assert b"R\xc3\xa9sultats normaux." in content or b"UsOpc3VsdGF0cyBub3JtYXV4" in content


@pytest.mark.parametrize("cipher", list(ContentCipher))
@pytest.mark.parametrize("recipient,transport", [
    ("alice", KeyTransport.PKCS1V15), ("bob", KeyTransport.OAEP), ("carol", KeyTransport.PKCS1V15),
])
def test_openssl_decrypts_our_envelope(pki: Pki, files: Path, cipher: ContentCipher, recipient: str, transport: KeyTransport) -> None:
    others = [pki.alice.certificate, pki.bob.certificate, pki.carol.certificate]
    options = smime.OutgoingOptions(cipher=cipher, key_transport=transport)
    encrypted = smime.process_outgoing(MESSAGE, encrypt_to=others, options=options)
    assert b"From: Alice <alice@clinic.example>" in encrypted and b"Subject: Compte rendu" in encrypted
    plain = openssl("-decrypt", "-recip", files / f"{recipient}.crt", "-inkey", files / f"{recipient}.key", data=encrypted)
    assert plain.startswith(b"Content-Type: text/plain; charset=utf-8")
    assert b"R\xc3\xa9sultats normaux." in plain


def test_openssl_reads_signed_then_encrypted(pki: Pki, files: Path) -> None:
    sealed = smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity(), encrypt_to=[pki.bob.certificate],
                                    sender_certificate=pki.alice.certificate)
    for reader in ("bob", "alice"):
        signed = openssl("-decrypt", "-recip", files / f"{reader}.crt", "-inkey", files / f"{reader}.key", data=sealed)
        openssl("-verify", "-CAfile", files / "anchors.pem", data=signed)


# --- openssl -> ours ---------------------------------------------------------

_HEADERS = ("-from", "alice@clinic.example", "-to", "bob@hospital.example", "-subject", "Compte rendu")


def _openssl_signed(pki: Pki, files: Path, signer: str, *extra: str) -> bytes:
    chain = ["-certfile", files / "intermediate.crt"] if signer == "alice" else []
    sender = certificate_emails(getattr(pki, signer).certificate)[0]
    return openssl("-sign", "-signer", files / f"{signer}.crt", "-inkey", files / f"{signer}.key", *chain,
                   "-from", sender, "-to", "bob@hospital.example", "-subject", "Compte rendu", *extra, data=ENTITY)


@pytest.mark.parametrize("signer,extra,algorithm", [
    ("alice", (), "rsassa_pkcs1v15"),
    ("bob", ("-md", "sha512"), "rsassa_pkcs1v15"),
    ("alice", ("-keyopt", "rsa_padding_mode:pss"), "rsassa_pss"),
    ("bob", ("-keyopt", "rsa_padding_mode:pss", "-keyopt", "rsa_pss_saltlen:max"), "rsassa_pss"),
    ("carol", (), "sha256_ecdsa"),
    ("carol", ("-md", "sha384"), "sha384_ecdsa"),
    ("alice", ("-nodetach",), "rsassa_pkcs1v15"),
    ("carol", ("-nodetach",), "sha256_ecdsa"),
    ("alice", ("-keyid",), "rsassa_pkcs1v15"),  # RFC 5652 5.3: signer named by subjectKeyIdentifier
    ("carol", ("-keyid", "-nodetach"), "sha256_ecdsa"),
])
def test_we_verify_openssl_signatures(pki: Pki, files: Path, signer: str, extra: tuple[str, ...], algorithm: str) -> None:
    signed = _openssl_signed(pki, files, signer, *extra)
    result = smime.process_incoming(signed, trust_anchors=pki.anchors, now=NOW)
    assert result.status is smime.SmimeStatus.PASS, result.reasons
    assert result.summary.startswith("smime=pass header.from=")
    assert result.signature is not None and result.signature.signature_algorithm == algorithm
    assert b"Hemoglobin 14.2 g/dL" in result.content and b"Subject: Compte rendu" in result.content


@pytest.mark.parametrize("cipher_option", ["-aes128", "-aes256", "-aes-128-gcm", "-aes-256-gcm"])
@pytest.mark.parametrize("recipient,keyopt", [
    ("alice", ()), ("bob", ("-keyopt", "rsa_padding_mode:oaep")),
    ("bob", ("-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256")), ("carol", ()),
    ("alice", ("-keyid",)),  # RFC 5652 6.2.1: recipient named by subjectKeyIdentifier
])
def test_we_decrypt_openssl_envelopes(pki: Pki, files: Path, cipher_option: str, recipient: str, keyopt: tuple[str, ...]) -> None:
    encrypted = openssl("-encrypt", cipher_option, *_HEADERS, "-recip", files / f"{recipient}.crt", *keyopt, data=ENTITY)
    holder: Issued = getattr(pki, recipient)
    result = smime.process_incoming(encrypted, keys=[holder.recipient_key()], trust_anchors=pki.anchors, now=NOW)
    assert result.decryption is not None and result.decryption.decrypted, result.reasons
    assert result.status is smime.SmimeStatus.NONE
    assert b"Hemoglobin 14.2 g/dL\r\nPlatelets 250 G/L\r\n" in result.content


def test_we_decrypt_openssl_ecdh_with_sha256_kdf(pki: Pki, files: Path) -> None:
    encrypted = openssl("-encrypt", "-aes256", *_HEADERS, "-recip", files / "carol.crt",
                        "-keyopt", "ecdh_kdf_md:sha256", data=ENTITY)
    result = smime.process_incoming(encrypted, keys=[pki.carol.recipient_key()], now=NOW)
    assert result.decryption is not None and result.decryption.key_management == "ecdh:1.3.132.1.11.1"


def test_we_read_openssl_signed_then_encrypted(pki: Pki, files: Path) -> None:
    signed = _openssl_signed(pki, files, "alice")
    sealed = openssl("-encrypt", "-aes256", *_HEADERS, "-recip", files / "bob.crt", data=signed)
    result = smime.process_incoming(sealed, keys=[pki.bob.recipient_key()], trust_anchors=pki.anchors, now=NOW)
    assert result.status is smime.SmimeStatus.PASS, result.reasons
    assert b"Hemoglobin" in result.content

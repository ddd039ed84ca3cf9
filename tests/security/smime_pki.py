"""Throwaway S/MIME PKI for tests: CAs, leaves with e-mail SANs, CRLs, PEM/P12 files.

Test-only; the product's own test PKI lives in gateway/security/pki.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.security.cms import PrivateKey, RecipientKey, SigningIdentity

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def new_key(kind: str) -> PrivateKey:
    """``rsa2048``, ``rsa3072`` or ``p256``."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=int(kind.removeprefix("rsa")))


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: PrivateKey
    issuer: Issued | None = None

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Issuing CAs above this certificate, nearest first."""
        chain: list[x509.Certificate] = []
        issuer = self.issuer
        while issuer is not None:
            chain.append(issuer.certificate)
            issuer = issuer.issuer
        return tuple(chain)

    def identity(self) -> SigningIdentity:
        return SigningIdentity(self.certificate, self.key, self.chain[:-1] if self.chain else ())

    def recipient_key(self) -> RecipientKey:
        return RecipientKey(self.certificate, self.key)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.crt`` and ``<stem>.key`` (unencrypted PKCS#8 PEM)."""
        certificate_path = directory / f"{stem}.crt"
        key_path = directory / f"{stem}.key"
        certificate_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return certificate_path, key_path

    def write_p12(self, path: Path, password: bytes) -> Path:
        """PKCS#12 with the legacy 3DES/SHA-1 protection that gpgsm 2.2 can still read."""
        encryption = (serialization.PrivateFormat.PKCS12.encryption_builder()
                      .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
                      .hmac_hash(hashes.SHA1())
                      .build(password))
        path.write_bytes(pkcs12.serialize_key_and_certificates(
            b"leaf", self.key, self.certificate, list(self.chain) or None, encryption))
        return path


def _signing_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256 else hashes.SHA256()


def _builder(subject: x509.Name, issuer_name: x509.Name, public_key: object, not_before: datetime, not_after: datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))  # type: ignore[arg-type]


def make_ca(
    name: str,
    *,
    key_kind: str = "rsa2048",
    parent: Issued | None = None,
    path_length: int | None = None,
    not_before: datetime = NOW - timedelta(days=30),
    not_after: datetime = NOW + timedelta(days=3650),
) -> Issued:
    key = new_key(key_kind)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Health PKI"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name = parent.certificate.subject if parent else subject
    signer = parent.key if parent else key
    builder = (_builder(subject, issuer_name, key.public_key(), not_before, not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True))
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False)  # type: ignore[arg-type]
    return Issued(builder.sign(signer, _signing_hash(signer)), key, parent)


def make_leaf(
    ca: Issued,
    email: str,
    *,
    key_kind: str = "rsa2048",
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=365),
    email_protection: bool = True,
    subject_email: bool = True,
) -> Issued:
    key = new_key(key_kind)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, email.split("@")[0].title())]
    if subject_email:
        attributes.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    is_ec = isinstance(key, ec.EllipticCurvePrivateKey)
    usage = x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=not is_ec,
                          data_encipherment=False, key_agreement=is_ec, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    purposes = [ExtendedKeyUsageOID.EMAIL_PROTECTION if email_protection else ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (_builder(x509.Name(attributes), ca.certificate.subject, key.public_key(), not_before, not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(usage, critical=True)
               .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
               .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))  # type: ignore[arg-type]
    return Issued(builder.sign(ca.key, _signing_hash(ca.key)), key, ca)


def make_crl(
    ca: Issued,
    revoked: list[x509.Certificate],
    *,
    last_update: datetime = NOW - timedelta(hours=1),
    next_update: datetime = NOW + timedelta(days=7),
    signer: Issued | None = None,
) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.certificate.subject)
               .last_update(last_update)
               .next_update(next_update))
    for certificate in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(certificate.serial_number)
            .revocation_date(last_update)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build())
    signing_key = (signer or ca).key
    return builder.sign(signing_key, _signing_hash(signing_key))


@dataclass(frozen=True)
class Pki:
    """A small trust space: an RSA root with an intermediate, an EC root, and leaves."""

    root: Issued
    intermediate: Issued
    ec_root: Issued
    alice: Issued      # RSA 2048 under the intermediate
    bob: Issued        # RSA 3072 under the root
    carol: Issued      # EC P-256 under the EC root
    rogue_root: Issued
    mallory: Issued    # under an untrusted root

    @property
    def anchors(self) -> list[x509.Certificate]:
        return [self.root.certificate, self.ec_root.certificate]


def build_pki() -> Pki:
    root = make_ca("Test Root CA", key_kind="rsa3072")
    intermediate = make_ca("Test Issuing CA", parent=root, path_length=0)
    ec_root = make_ca("Test EC Root CA", key_kind="p256")
    rogue_root = make_ca("Rogue Root CA")
    return Pki(
        root=root,
        intermediate=intermediate,
        ec_root=ec_root,
        alice=make_leaf(intermediate, "alice@clinic.example"),
        bob=make_leaf(root, "bob@hospital.example", key_kind="rsa3072"),
        carol=make_leaf(ec_root, "carol@lab.example", key_kind="p256"),
        rogue_root=rogue_root,
        mallory=make_leaf(rogue_root, "alice@clinic.example"),
    )

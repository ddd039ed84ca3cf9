"""A CA of its own, made in the test with cryptography, standing for the IGC-Santé: it issues the gateway's
server certificate outside the gateway's test PKI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IGC-SANTE TEST"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class ExternalCA:
    """A root and an intermediate CA; ``issue`` writes a server certificate and its key under ``directory``."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca(_name("AC RACINE TEST"), self.root_key, _name("AC RACINE TEST"), self.root_key)
        self.intermediate_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = self._ca(_name("AC IGC-SANTE ELEMENTAIRE SERVEURS TEST"), self.intermediate_key,
                                     _name("AC RACINE TEST"), self.root_key)
        self.root_file = self.directory / "root.pem"
        self.root_file.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        self.intermediate_file = self.directory / "intermediate.pem"
        self.intermediate_file.write_bytes(self.intermediate.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _ca(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
            issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=30)).not_valid_after(NOW + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(issuer_key, hashes.SHA256()))

    def issue(self, name: str, *, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",),
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              key_mode: int = 0o600) -> tuple[Path, Path, x509.Certificate]:
        """(certificate file, key file, certificate) of a server certificate under the intermediate."""
        key = ec.generate_private_key(ec.SECP256R1())
        san = [*(x509.DNSName(d) for d in dns), *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips)]
        builder = (x509.CertificateBuilder().subject_name(_name(dns[0] if dns else "gateway"))
                   .issuer_name(self.intermediate.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - dt.timedelta(days=1))
                   .not_valid_after(not_after or NOW + dt.timedelta(days=365))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.intermediate_key.public_key()), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        certificate = builder.sign(self.intermediate_key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        write_atomically(cert_file, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        write_atomically(key_file, _pem_key(key), key_mode)
        return cert_file, key_file, certificate


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """As an operator installs a renewed file: written beside, then renamed over the old one."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.chmod(temporary, mode)
    temporary.replace(path)

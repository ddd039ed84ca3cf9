"""The certificate every TLS listener presents: the test PKI's, or one issued by the IGC-Santé (or any CA).

A real operator's server certificate comes from the IGC-Santé, in files the operator renews
(``tls.server_certificate_file``, ``tls.server_key_file``, optionally ``tls.server_chain_file``). When they
are set, ``ServerCertificate`` serves them to the SMTP, IMAP and HTTPS listeners and to outbound SMTP as
our client certificate, instead of the test PKI's (gateway.security.pki). They are checked when the gateway
starts, by ``gateway config check``, and at each reload (SIGHUP, or a changed file at the next handshake:
gateway.security.revocation.ReloadingContexts); each fault is a ``UserError`` naming the key:

- the file is missing or unreadable;
- the key file may be read by others (as sshd refuses an unprotected private key): mode 0600 or 0640;
- the key is encrypted or not a key, the certificate file holds no certificate;
- the key does not match the certificate;
- the certificate is expired or not yet valid (RFC 5280 4.1.2.5);
- the certificate does not name ``hostname`` in its subjectAltName (RFC 6125 6.4: clients check the name
  they connect to; RFC 6125 6.4.3: a wildcard stands for one leftmost label);
- the chain file does not hold the certificate's issuer first.

A reload that finds a fault keeps the certificate being served and logs the fault.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from gateway.config import Settings, TlsSettings
from gateway.errors import UserError, read_named_file

CERTIFICATE_KEY = "tls.server_certificate_file"
KEY_KEY = "tls.server_key_file"
CHAIN_KEY = "tls.server_chain_file"


class GatewayCertificates(Protocol):
    """What the test PKI gives (gateway.security.pki.TestPKI.ensure_gateway_server_cert)."""

    def ensure_gateway_server_cert(self, hostname: str, dns_names: Sequence[str], ips: Sequence[str]) -> "_Issued": ...


class _Issued(Protocol):
    @property
    def chain_path(self) -> Path: ...

    @property
    def key_path(self) -> Path: ...


@dataclass(frozen=True)
class ExternalIdentity:
    """An operator's certificate, checked: what a listener loads (chain leaf first, key)."""

    chain_path: Path
    key_path: Path
    certificate: x509.Certificate


def _check_key_mode(path: Path) -> None:
    """sshd's rule for private keys: nobody but the owner (and its group) may read or write them."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (the private key)", field=KEY_KEY) from None
    except OSError as error:
        raise UserError(f"{path} cannot be read: {error.strerror or error}", field=KEY_KEY) from None
    if mode & 0o007:
        raise UserError(f"{path} is accessible to others (permissions {mode:04o} are too open): a private key must "
                        f"not be; run chmod 600 {path} (or 640 with the gateway's group)", field=KEY_KEY)


def _certificates(data: bytes, path: Path, key: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UserError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", field=key) from None


def _private_key(data: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"{path} is encrypted with a passphrase: the gateway needs it unencrypted, protected by "
                        "its file mode (openssl pkey -in KEY -out KEY.clear)", field=KEY_KEY) from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserError(f"{path} holds no PEM private key the gateway can use", field=KEY_KEY) from None


def _public(value: x509.Certificate | PrivateKeyTypes) -> bytes:
    public = value.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def names_hostname(certificate: x509.Certificate, hostname: str) -> bool:
    """RFC 6125 6.4: ``hostname`` is one of the subjectAltName's DNS names (a wildcard for the leftmost label
    only, 6.4.3) or IP addresses; the subject's CN is not consulted when a subjectAltName exists (6.4.4)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    if address is not None:
        return address in san.get_values_for_type(x509.IPAddress)
    wanted = hostname.rstrip(".").lower()
    for name in san.get_values_for_type(x509.DNSName):
        name = name.rstrip(".").lower()
        if name == wanted:
            return True
        if name.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == name[2:]:
            return True
    return False


def _shown_names(certificate: x509.Certificate) -> str:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    names = [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
    return ", ".join(names) or "no DNS name"


def load_external_identity(tls: TlsSettings, hostname: str, *, work_dir: Path | None,
                           now: dt.datetime | None = None) -> ExternalIdentity:
    """Check the operator's certificate files (every fault a UserError naming its key) and return what a
    listener loads. With a chain file, the leaf and its chain are joined into ``work_dir/server-chain.pem``
    (``work_dir`` None: checked only, nothing written)."""
    cert_path = Path(tls.server_certificate_file).expanduser()
    key_path = Path(tls.server_key_file).expanduser()
    certificates = _certificates(read_named_file(cert_path, CERTIFICATE_KEY, "a PEM server certificate"),
                                 cert_path, CERTIFICATE_KEY)
    leaf = certificates[0]
    _check_key_mode(key_path)
    key = _private_key(read_named_file(key_path, KEY_KEY, "a PEM private key"), key_path)
    if _public(key) != _public(leaf):
        raise UserError(f"{key_path} is not the key of the certificate in {cert_path} "
                        f"({leaf.subject.rfc4514_string()}): the public keys differ", field=KEY_KEY)
    now = now or dt.datetime.now(dt.timezone.utc)
    if now < leaf.not_valid_before_utc:
        raise UserError(f"{cert_path} is not valid yet: from {leaf.not_valid_before_utc.isoformat()} "
                        f"(RFC 5280 4.1.2.5)", field=CERTIFICATE_KEY)
    if now > leaf.not_valid_after_utc:
        raise UserError(f"{cert_path} expired on {leaf.not_valid_after_utc.isoformat()}: install the renewed "
                        "certificate, then reload (SIGHUP)", field=CERTIFICATE_KEY)
    if not names_hostname(leaf, hostname):
        raise UserError(f"{cert_path} does not name this gateway's hostname {hostname!r} (it names "
                        f"{_shown_names(leaf)}): clients check it (RFC 6125 6.4)", field=CERTIFICATE_KEY)
    if not tls.server_chain_file:
        return ExternalIdentity(cert_path, key_path, leaf)
    chain_path = Path(tls.server_chain_file).expanduser()
    chain = _certificates(read_named_file(chain_path, CHAIN_KEY, "PEM intermediate certificates"), chain_path,
                          CHAIN_KEY)
    try:
        leaf.verify_directly_issued_by(chain[0])
    except (ValueError, TypeError, InvalidSignature):
        raise UserError(f"{chain_path} does not start with the issuer of the certificate in {cert_path} "
                        f"(issuer {leaf.issuer.rfc4514_string()}, first in the chain "
                        f"{chain[0].subject.rfc4514_string()})", field=CHAIN_KEY) from None
    if work_dir is None:
        return ExternalIdentity(cert_path, key_path, leaf)
    joined = work_dir / "server-chain.pem"
    _write_public(joined, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [*certificates, *chain]))
    return ExternalIdentity(joined, key_path, leaf)


def _write_public(path: Path, data: bytes) -> None:
    """Certificates only (no secret), written whole and renamed into place (a reload never reads half)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    temporary.replace(path)


class ServerCertificate:
    """Where the listeners' certificate comes from now: the operator's files when ``tls.*`` is set, else the
    test PKI's. ``paths()`` checks them at each call (a build of a TLS context); SIGHUP's new settings
    through ``configure``."""

    def __init__(self, settings: Settings, pki: GatewayCertificates) -> None:
        self.pki = pki
        self.settings = settings
        self._pki_paths: tuple[Path, Path] | None = None

    @property
    def external(self) -> bool:
        return bool(self.settings.tls.server_certificate_file)

    def configure(self, settings: Settings) -> None:
        """The settings as SIGHUP re-read them: the next build uses their ``tls.*`` files."""
        self.settings = settings

    def check(self) -> ExternalIdentity | None:
        """The operator's certificate checked now (UserError naming the key), None when the test PKI serves."""
        if not self.external:
            return None
        return load_external_identity(self.settings.tls, self.settings.hostname,
                                      work_dir=self.settings.data_path / "run" / "tls")

    def paths(self) -> tuple[Path, Path]:
        """(certificate chain leaf first, key) for a TLS context built now."""
        identity = self.check()
        if identity is not None:
            return identity.chain_path, identity.key_path
        if self._pki_paths is None:
            settings = self.settings
            issued = self.pki.ensure_gateway_server_cert(settings.hostname, settings.pki.server_names,
                                                         settings.pki.server_ips)
            self._pki_paths = (issued.chain_path, issued.key_path)
        return self._pki_paths

    def watched(self) -> tuple[Path, ...]:
        """The files whose change rebuilds the listeners' contexts at the next handshake."""
        tls = self.settings.tls
        if self.external:
            return tuple(Path(name).expanduser() for name in
                         (tls.server_certificate_file, tls.server_key_file, tls.server_chain_file) if name)
        return self.paths()

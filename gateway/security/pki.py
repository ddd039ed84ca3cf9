"""The test PKI: a root and an intermediate CA in the style of IGC-Santé, and what they issue.

IGC-Santé is a two-level hierarchy (``AC RACINE IGC-SANTE ELEMENTAIRE`` signs
``AC IGC-SANTE ELEMENTAIRE ORGANISATIONS``, which signs server, client and
S/MIME certificates); its test variants carry ``OU=IGC-SANTE TEST`` and a
``TEST`` prefix. We reproduce that shape so the gateway and its peers are
configured exactly as they would be against the real one.

Layout under the PKI directory (directories 0700, private keys 0600):

    ca/root.pem, ca/root.key                    self-signed root, path length 1
    ca/intermediate.pem, ca/intermediate.key    issuing CA, path length 0
    ca/chain.pem                                intermediate + root: the bundle clients trust
    issued/<name>.pem, <name>.key, <name>.chain.pem (leaf + intermediate)
    crl/intermediate.crl.pem                    leaves revoked by the intermediate
    crl/root.crl.pem                            intermediates revoked by the root
    index.json                                  serials, names, kinds, revocations
"""

from __future__ import annotations

import builtins
import fcntl
import ipaddress
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import idna
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.directory.addresses import split_address
from gateway.errors import Conflict, NotFound, UserError

if TYPE_CHECKING:
    from gateway.config import Settings

KeyType = Literal["ec", "rsa"]
CertKind = Literal["root", "intermediate", "server", "client", "smime"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_TYPES: tuple[str, ...] = ("ec", "rsa")
RSA_KEY_BITS = 3072
ROOT_CN = "TEST AC RACINE IGC-SANTE ELEMENTAIRE"
INTERMEDIATE_CN = "TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS"
PKI_OU = "IGC-SANTE TEST"
ROOT_VALIDITY = timedelta(days=20 * 365)
INTERMEDIATE_VALIDITY = timedelta(days=10 * 365)
CRL_VALIDITY = timedelta(days=30)
# Certificates start a little in the past so a peer whose clock lags still accepts them.
CLOCK_SKEW = timedelta(minutes=5)
GATEWAY_CERT_NAME = "gateway"
CA_NAMES: tuple[str, ...] = ("root", "intermediate")
INDEX_FORMAT = 1

_NAME = re.compile(r"^[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,127}$")
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5280 appendix A: ub-common-name is 64 characters.
MAX_COMMON_NAME = 64

# RFC 5280 5.3.1 reason codes, accepted in any case with or without separators.
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    flag.value.lower(): flag for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl
}


_EKU_NAMES: dict[x509.ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ----------------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    """A certificate's file name: letters, digits, ``. _ @ -``, no leading dot (no path traversal)."""
    if not _NAME.match(name or ""):
        raise UserError(f"{name!r} is not a usable name: use 1-128 letters, digits, '.', '_', '@' or '-', "
                        "not starting with a dot", field="name")
    return name


def validate_key_type(key_type: str) -> KeyType:
    if key_type not in KEY_TYPES:
        raise UserError(f"{key_type!r}: use ec (P-256) or rsa ({RSA_KEY_BITS} bits)", field="key_type")
    return cast(KeyType, key_type)


def _common_name(value: str, field: str = "common_name") -> str:
    value = value.strip()
    if not value or len(value) > MAX_COMMON_NAME:
        raise UserError(f"{value!r}: a common name has 1 to {MAX_COMMON_NAME} characters (RFC 5280 ub-common-name)",
                        field=field)
    return value


def normalise_dns_name(value: str) -> str:
    """Lower-case A-label form of a host name for a SAN dNSName (RFC 5280 4.2.1.6); ``*.`` allowed first."""
    raw = value.strip().rstrip(".").lower()
    wildcard = raw.startswith("*.")
    body = raw[2:] if wildcard else raw
    try:
        ascii_body = idna.encode(body, uts46=True).decode("ascii") if not body.isascii() else body
    except idna.IDNAError as exc:
        raise UserError(f"{value!r} is not a valid DNS name: {exc}", field="dns") from None
    if not body or len(ascii_body) > 253 or not all(_DNS_LABEL.match(label) for label in ascii_body.split(".")):
        raise UserError(f"{value!r} is not a valid DNS name (labels of letters, digits and hyphens)", field="dns")
    return f"*.{ascii_body}" if wildcard else ascii_body


def _ip_address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise UserError(f"{value!r} is not an IPv4 or IPv6 address", field="ip") from None


def _email(value: str) -> str:
    """``local@a-label-domain``: rfc822Name is an IA5String (RFC 5280 4.2.1.6), so ASCII only."""
    local, domain = split_address(value, field="email")
    return f"{local}@{domain}"


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _reason(value: str) -> x509.ReasonFlags:
    key = re.sub(r"[\s_-]", "", value).lower()
    if key not in REVOCATION_REASONS:
        choices = ", ".join(flag.value for flag in REVOCATION_REASONS.values())
        raise UserError(f"{value!r} is not a revocation reason (RFC 5280 5.3.1): use one of {choices}", field="reason")
    return REVOCATION_REASONS[key]


# ----------------------------------------------------------------------------- files


def _make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored for an existing directory


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with ``mode`` in the same directory, then rename over ``path``.

    mkstemp creates the file 0600 from the start, so a private key is never readable by others, even
    while it is being written; the rename makes readers see the old or the new file, never half of one.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _write_private_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_atomically(path, pem, 0o600)


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise NotFound(f"{path} is missing: the test PKI is incomplete (recreate it with certs init --force)") from None


def _read_private_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise NotFound(f"{path} is missing: the test PKI is incomplete (recreate it with certs init --force)") from None
    return cast(CertificateIssuerPrivateKeyTypes, key)


# ----------------------------------------------------------------------------- certificates


def new_private_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(**enabled: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    flags.update(enabled)
    return x509.KeyUsage(**flags)


def _name(common_name: str, organisation: str, *, with_ou: bool) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
                  x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)]
    if with_ou:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, PKI_OU))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _crl_distribution_point(crl_path: Path) -> x509.CRLDistributionPoints:
    # RFC 5280 4.2.1.13: where relying parties fetch the issuer's CRL (a file URI for this local PKI).
    point = x509.DistributionPoint(full_name=[x509.UniformResourceIdentifier(crl_path.as_uri())],
                                   relative_name=None, reasons=None, crl_issuer=None)
    return x509.CRLDistributionPoints([point])


def _base_builder(subject: x509.Name, issuer: x509.Name, public_key: CertificatePublicKeyTypes,
                  not_after: datetime) -> x509.CertificateBuilder:
    # RFC 5280 4.1.2.2: a positive serial of at most 20 octets, unpredictable here (random).
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _sign(builder: x509.CertificateBuilder, issuer_key: CertificateIssuerPrivateKeyTypes) -> x509.Certificate:
    return builder.sign(issuer_key, hashes.SHA256())


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # RFC 5280 4.2.1.1: the issuer's subject key identifier, so path building finds the right key.
    ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def certificate_details(cert: x509.Certificate) -> dict[str, Any]:
    """What a person or a policy check wants to know about a certificate, as plain values."""
    details: dict[str, Any] = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "key": describe_public_key(cert.public_key()),
        "dns_names": [], "ip_addresses": [], "emails": [],
        "key_usage": [], "extended_key_usage": [], "crl_distribution_points": [],
        "ca": False, "path_length": None,
    }
    for extension in cert.extensions:
        _add_extension_details(details, extension.value)
    return details


def _add_extension_details(details: dict[str, Any], value: x509.ExtensionType) -> None:
    if isinstance(value, x509.SubjectAlternativeName):
        details["dns_names"] = value.get_values_for_type(x509.DNSName)
        details["ip_addresses"] = [str(ip) for ip in value.get_values_for_type(x509.IPAddress)]
        details["emails"] = value.get_values_for_type(x509.RFC822Name)
    elif isinstance(value, x509.KeyUsage):
        details["key_usage"] = _key_usage_names(value)
    elif isinstance(value, x509.ExtendedKeyUsage):
        details["extended_key_usage"] = [_EKU_NAMES.get(oid, oid.dotted_string) for oid in value]
    elif isinstance(value, x509.CRLDistributionPoints):
        details["crl_distribution_points"] = [
            name.value for point in value for name in (point.full_name or [])
            if isinstance(name, x509.UniformResourceIdentifier)]
    elif isinstance(value, x509.BasicConstraints):
        details["ca"], details["path_length"] = value.ca, value.path_length


def _key_usage_names(usage: x509.KeyUsage) -> list[str]:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign"]
    present = [name for name in names if getattr(usage, name)]
    if usage.key_agreement:  # encipher_only/decipher_only raise unless key_agreement is set
        present += [name for name in ("encipher_only", "decipher_only") if getattr(usage, name)]
    return present


def describe_public_key(key: CertificatePublicKeyTypes) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ec {key.curve.name}"
    return type(key).__name__


# ----------------------------------------------------------------------------- the PKI


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate of the PKI with the files that hold it."""

    name: str
    kind: str
    certificate: x509.Certificate
    cert_path: Path
    key_path: Path
    chain_path: Path

    @property
    def certificate_pem(self) -> str:
        return _pem(self.certificate).decode("ascii")

    @property
    def serial_hex(self) -> str:
        return format(self.certificate.serial_number, "x")

    @property
    def fingerprint_sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class _LeafProfile:
    """What differs between server, client and S/MIME certificates."""

    kind: CertKind
    subject_cn: str
    sans: list[x509.GeneralName]
    key_usage: x509.KeyUsage
    extended_key_usage: list[x509.ObjectIdentifier]


class TestPKI:
    """Creates and runs the test PKI on disk; every change holds an exclusive lock on the directory."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, root: Path | str, organisation: str = "MSS-GATEWAY-TEST", key_type: str = "ec",
                 validity_days: int = 825) -> None:
        if validity_days < 1:
            raise UserError(f"{validity_days}: a certificate lives at least one day", field="validity_days")
        if not organisation.strip() or len(organisation) > 64:  # RFC 5280 appendix A: ub-organization-name
            raise UserError(f"{organisation!r}: an organisation name has 1 to 64 characters", field="organisation")
        self.root = Path(root).expanduser().resolve()
        self.organisation = organisation.strip()
        self.key_type: KeyType = validate_key_type(key_type)
        self.validity = timedelta(days=validity_days)

    @classmethod
    def from_settings(cls, settings: Settings) -> TestPKI:
        return cls(settings.pki_path, organisation=settings.pki.organisation, key_type=settings.pki.key_type,
                   validity_days=settings.pki.validity_days)

    # --------------------------------------------------------------- paths

    @property
    def root_cert_path(self) -> Path:
        return self.root / "ca" / "root.pem"

    @property
    def root_key_path(self) -> Path:
        return self.root / "ca" / "root.key"

    @property
    def intermediate_cert_path(self) -> Path:
        return self.root / "ca" / "intermediate.pem"

    @property
    def intermediate_key_path(self) -> Path:
        return self.root / "ca" / "intermediate.key"

    @property
    def ca_bundle_path(self) -> Path:
        """Intermediate + root: the trust bundle for clients and for verifying peers."""
        return self.root / "ca" / "chain.pem"

    @property
    def intermediate_crl_path(self) -> Path:
        return self.root / "crl" / "intermediate.crl.pem"

    @property
    def root_crl_path(self) -> Path:
        return self.root / "crl" / "root.crl.pem"

    @property
    def crl_paths(self) -> tuple[Path, Path]:
        return self.intermediate_crl_path, self.root_crl_path

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def _issued_paths(self, name: str) -> tuple[Path, Path, Path]:
        issued = self.root / "issued"
        return issued / f"{name}.pem", issued / f"{name}.key", issued / f"{name}.chain.pem"

    def _paths_of(self, name: str, kind: str) -> tuple[Path, Path, Path]:
        if kind == "root":
            return self.root_cert_path, self.root_key_path, self.root_cert_path
        if kind == "intermediate":
            return self.intermediate_cert_path, self.intermediate_key_path, self.ca_bundle_path
        return self._issued_paths(name)

    # --------------------------------------------------------------- creation

    def exists(self) -> bool:
        """True when the CAs and the index are all on disk (the index is written last by init)."""
        needed = (self.root_cert_path, self.root_key_path, self.intermediate_cert_path,
                  self.intermediate_key_path, self.ca_bundle_path, self.index_path)
        return all(path.is_file() for path in needed)

    def init(self, force: bool = False) -> None:
        """Create the root and intermediate CAs and empty CRLs; refuse to replace a PKI unless ``force``."""
        _make_private_dir(self.root)
        with self._locked():
            if self.exists() and not force:
                raise Conflict(f"a test PKI already exists in {self.root} (use --force to replace it; "
                               "certificates it issued would stop being trusted)")
            for sub in ("ca", "issued", "crl"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
                _make_private_dir(self.root / sub)
            self.index_path.unlink(missing_ok=True)
            root_cert = self._create_root()
            intermediate_cert = self._create_intermediate(root_cert)
            _write_atomically(self.ca_bundle_path, _pem(intermediate_cert, root_cert), 0o600)
            index = self._new_index([("root", "root", root_cert), ("intermediate", "intermediate", intermediate_cert)])
            self._write_crls(index)
            self._save_index(index)

    def _create_root(self) -> x509.Certificate:
        key = new_private_key(self.key_type)
        name = _name(ROOT_CN, self.organisation, with_ou=True)
        builder = (_base_builder(name, name, key.public_key(), _now() + ROOT_VALIDITY)
                   # RFC 5280 4.2.1.9: root -> intermediate -> leaf, so at most one CA below the root.
                   .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                   .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False))
        cert = _sign(builder, key)
        _write_private_key(self.root_key_path, key)
        _write_atomically(self.root_cert_path, _pem(cert), 0o600)
        return cert

    def _create_intermediate(self, root_cert: x509.Certificate) -> x509.Certificate:
        root_key = _read_private_key(self.root_key_path)
        key = new_private_key(self.key_type)
        builder = (_base_builder(_name(INTERMEDIATE_CN, self.organisation, with_ou=True), root_cert.subject,
                                 key.public_key(), min(_now() + INTERMEDIATE_VALIDITY, root_cert.not_valid_after_utc))
                   # RFC 5280 4.2.1.9: path length 0, it issues end-entity certificates only.
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
                   .add_extension(_aki(root_cert), critical=False)
                   .add_extension(_crl_distribution_point(self.root_crl_path), critical=False))
        cert = _sign(builder, root_key)
        _write_private_key(self.intermediate_key_path, key)
        _write_atomically(self.intermediate_cert_path, _pem(cert), 0o600)
        return cert

    # --------------------------------------------------------------- issuing

    def issue_server(self, name: str, dns_names: Sequence[str], ip_addresses: Sequence[str] = (), *,
                     key_type: str | None = None, replace: bool = False) -> IssuedCertificate:
        """A TLS server certificate, also the client certificate we present to other operators.

        Every name clients connect with goes in the SAN as a dNSName (RFC 6125 6.4.4: clients must not fall
        back to the CN when a SAN is present, and some, like mbsync, never read iPAddress entries).
        """
        dns = _unique(normalise_dns_name(value) for value in dns_names)
        ips = _unique(str(_ip_address(value)) for value in ip_addresses)
        if not dns:
            raise UserError("a server certificate needs at least one DNS name", field="dns")
        sans: builtins.list[x509.GeneralName] = [x509.DNSName(value) for value in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(value)) for value in ips]
        chosen = validate_key_type(key_type or self.key_type)
        usage = (_key_usage(digital_signature=True, key_encipherment=True) if chosen == "rsa"
                 else _key_usage(digital_signature=True))
        profile = _LeafProfile("server", _common_name(dns[0], field="dns"), sans, usage,
                               [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._issue(validate_name(name), profile, chosen, replace)

    def issue_client(self, name: str, common_name: str, email: str | None = None, *,
                     key_type: str | None = None, replace: bool = False) -> IssuedCertificate:
        """A TLS client certificate for an application or an operator (SASL EXTERNAL, relay)."""
        sans: builtins.list[x509.GeneralName] = [x509.RFC822Name(_email(email))] if email else []
        profile = _LeafProfile("client", _common_name(common_name), sans, _key_usage(digital_signature=True),
                               [ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._issue(validate_name(name), profile, validate_key_type(key_type or self.key_type), replace)

    def issue_smime(self, email: str, common_name: str, key_type: str | None = None, *,
                    name: str | None = None, replace: bool = False) -> IssuedCertificate:
        """An S/MIME certificate: the address in the SAN, key usages of RFC 8550 4.4.2."""
        address = _email(email)
        chosen = validate_key_type(key_type or self.key_type)
        # RFC 8550 4.4.2: RSA signs and transports keys; EC signs and agrees keys (ECDH, RFC 5753).
        usage = (_key_usage(digital_signature=True, key_encipherment=True) if chosen == "rsa"
                 else _key_usage(digital_signature=True, key_agreement=True))
        profile = _LeafProfile("smime", _common_name(common_name), [x509.RFC822Name(address)], usage,
                               [ExtendedKeyUsageOID.EMAIL_PROTECTION])
        return self._issue(validate_name(name or re.sub(r"[^A-Za-z0-9._@-]", "_", address)), profile, chosen, replace)

    def ensure_gateway_server_cert(self, hostname: str, dns_names: Sequence[str],
                                   ips: Sequence[str]) -> IssuedCertificate:
        """The gateway's own TLS certificate, (re)issued when missing, unusable or not covering every name."""
        if not self.exists():
            self._init_unless_created_meanwhile()
        wanted_dns = _unique(normalise_dns_name(v) for v in [hostname, *dns_names] if not _is_ip(v))
        wanted_ips = _unique(str(_ip_address(v)) for v in [*ips, hostname] if _is_ip(v))
        self.refresh_crls_if_stale()
        current = self._current_gateway_cert()
        if current is not None and self._covers(current.certificate, wanted_dns, wanted_ips):
            return current
        return self.issue_server(GATEWAY_CERT_NAME, wanted_dns, wanted_ips, replace=True)

    def _init_unless_created_meanwhile(self) -> None:
        try:
            self.init()
        except Conflict:
            pass  # another process (a CLI command, a second node) created it between our check and our lock

    def _current_gateway_cert(self) -> IssuedCertificate | None:
        entry = self._find_entry(self._load_index(), GATEWAY_CERT_NAME)
        if entry is None or entry["kind"] != "server" or self._state(entry) != "valid":
            return None
        if entry["key_type"] != self.key_type or not self._issued_paths(GATEWAY_CERT_NAME)[1].is_file():
            return None
        issued = self.load(GATEWAY_CERT_NAME)
        # Renew when less than a tenth of the lifetime is left, so a running gateway never serves an expired one.
        if issued.certificate.not_valid_after_utc - _now() < self.validity / 10:
            return None
        return issued

    @staticmethod
    def _covers(cert: x509.Certificate, dns: builtins.list[str], ips: builtins.list[str]) -> bool:
        details = certificate_details(cert)
        return set(dns) <= set(details["dns_names"]) and set(ips) <= set(details["ip_addresses"])

    def _issue(self, name: str, profile: _LeafProfile, key_type: KeyType, replace: bool) -> IssuedCertificate:
        if name in CA_NAMES:
            raise UserError(f"{name!r} is the name of a CA of this PKI: choose another", field="name")
        with self._locked():
            index = self._load_index()
            previous = self._find_entry(index, name)
            if previous is not None and not replace:
                raise Conflict(f"a certificate named {name!r} exists (serial {previous['serial']}): use --replace to "
                               "issue a new one and revoke the old one as superseded", field="name")
            cert = self._sign_leaf(profile, key_type, name)
            if previous is not None:
                self._mark_revoked(previous, x509.ReasonFlags.superseded)
                previous["replaced"] = True
            index["certificates"].append(self._entry(name, profile.kind, cert, key_type))
            if previous is not None:
                self._write_crls(index)
            self._save_index(index)
        return IssuedCertificate(name, profile.kind, cert, *self._issued_paths(name))

    def _sign_leaf(self, profile: _LeafProfile, key_type: KeyType, name: str) -> x509.Certificate:
        issuer_cert = _read_certificate(self.intermediate_cert_path)
        issuer_key = _read_private_key(self.intermediate_key_path)
        key = new_private_key(key_type)
        not_after = min(_now() + self.validity, issuer_cert.not_valid_after_utc)
        builder = (_base_builder(_name(profile.subject_cn, self.organisation, with_ou=False), issuer_cert.subject,
                                 key.public_key(), not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(profile.key_usage, critical=True)
                   .add_extension(x509.ExtendedKeyUsage(profile.extended_key_usage), critical=False)
                   .add_extension(_aki(issuer_cert), critical=False)
                   .add_extension(_crl_distribution_point(self.intermediate_crl_path), critical=False))
        if profile.sans:
            # RFC 5280 4.2.1.6: SAN is critical only when the subject DN is empty; ours never is.
            builder = builder.add_extension(x509.SubjectAlternativeName(profile.sans), critical=False)
        cert = _sign(builder, issuer_key)
        cert_path, key_path, chain_path = self._issued_paths(name)
        _make_private_dir(cert_path.parent)
        _write_private_key(key_path, key)
        _write_atomically(cert_path, _pem(cert), 0o600)
        _write_atomically(chain_path, _pem(cert, issuer_cert), 0o600)
        return cert

    # --------------------------------------------------------------- revocation

    def revoke(self, serial_or_name: str, reason: str = "unspecified") -> dict[str, Any]:
        """Revoke an issued certificate and rewrite the CRLs at once; returns its record."""
        flag = _reason(reason)
        with self._locked():
            index = self._load_index()
            entry = self._find_entry(index, serial_or_name)
            if entry is None:
                raise NotFound(f"no certificate named or with serial {serial_or_name!r} (see certs list)",
                               field="certificate")
            if entry["kind"] in CA_NAMES:
                raise UserError(f"{entry['name']!r} is a CA of this PKI: recreate the PKI with certs init --force "
                                "instead of revoking it", field="certificate")
            if entry["revoked_at"] is not None:
                raise Conflict(f"{entry['name']!r} (serial {entry['serial']}) was revoked on {entry['revoked_at']}",
                               field="certificate")
            self._mark_revoked(entry, flag)
            self._write_crls(index)
            self._save_index(index)
            return self._record(entry)

    def crl(self) -> str:
        """Re-sign both CRLs (fresh nextUpdate); returns the intermediate's CRL in PEM."""
        with self._locked():
            index = self._load_index()
            self._write_crls(index)
            self._save_index(index)
        return self.intermediate_crl_path.read_text("ascii")

    def refresh_crls_if_stale(self) -> None:
        """Re-sign the CRLs once half their lifetime has passed, so relying parties never hold an expired one."""
        try:
            crl = x509.load_pem_x509_crl(self.intermediate_crl_path.read_bytes())
        except (FileNotFoundError, ValueError):
            self.crl()
            return
        next_update = crl.next_update_utc
        if next_update is None or next_update - _now() < CRL_VALIDITY / 2:
            self.crl()

    @staticmethod
    def _mark_revoked(entry: dict[str, Any], reason: x509.ReasonFlags) -> None:
        if entry["revoked_at"] is None:
            entry["revoked_at"] = _now().isoformat()
            entry["reason"] = reason.value

    def _write_crls(self, index: dict[str, Any]) -> None:
        revoked_leaves = [e for e in index["certificates"] if e["revoked_at"] and e["kind"] not in CA_NAMES]
        revoked_cas = [e for e in index["certificates"] if e["revoked_at"] and e["kind"] == "intermediate"]
        self._write_crl(index, "intermediate", self.intermediate_cert_path, self.intermediate_key_path,
                        revoked_leaves, self.intermediate_crl_path)
        self._write_crl(index, "root", self.root_cert_path, self.root_key_path, revoked_cas, self.root_crl_path)

    def _write_crl(self, index: dict[str, Any], issuer: str, cert_path: Path, key_path: Path,
                   revoked: builtins.list[dict[str, Any]], target: Path) -> None:
        issuer_cert, issuer_key = _read_certificate(cert_path), _read_private_key(key_path)
        # RFC 5280 5.2.3: the CRL number increases monotonically for each issuer.
        number = index["crl_numbers"][issuer] = index["crl_numbers"].get(issuer, 0) + 1
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(issuer_cert.subject)
                   .last_update(now - CLOCK_SKEW)
                   .next_update(now + CRL_VALIDITY)
                   .add_extension(_aki(issuer_cert), critical=False)  # RFC 5280 5.2.1: MUST be present
                   .add_extension(x509.CRLNumber(number), critical=False))
        for entry in revoked:
            builder = builder.add_revoked_certificate(_revoked_certificate(entry))
        crl = builder.sign(issuer_key, hashes.SHA256())
        _make_private_dir(target.parent)
        _write_atomically(target, crl.public_bytes(serialization.Encoding.PEM), 0o600)

    # --------------------------------------------------------------- reading

    def load(self, name: str) -> IssuedCertificate:
        """The current certificate called ``name`` (``root`` and ``intermediate`` are the CAs)."""
        entry = self._find_entry(self._load_index(), validate_name(name))
        if entry is None:
            raise NotFound(f"no certificate named {name!r} in {self.root} (see certs list)", field="name")
        cert_path, key_path, chain_path = self._paths_of(entry["name"], entry["kind"])
        return IssuedCertificate(entry["name"], entry["kind"], _read_certificate(cert_path), cert_path, key_path,
                                 chain_path)

    def describe(self, name_or_serial: str) -> dict[str, Any]:
        """A certificate's record with its extensions decoded (``certs show``)."""
        entry = self._find_entry(self._load_index(), name_or_serial)
        if entry is None:
            raise NotFound(f"no certificate named or with serial {name_or_serial!r} (see certs list)",
                           field="certificate")
        record = self._record(entry)
        cert_path = Path(record["cert_path"]) if record["cert_path"] else None
        if cert_path is not None and cert_path.is_file():
            record.update(certificate_details(_read_certificate(cert_path)))
        return record

    def _record(self, entry: dict[str, Any]) -> dict[str, Any]:
        current = not entry.get("replaced")
        paths = self._paths_of(entry["name"], entry["kind"]) if current else (None, None, None)
        return {
            "name": entry["name"], "kind": entry["kind"], "subject": entry["subject"], "serial": entry["serial"],
            "key_type": entry["key_type"], "not_before": entry["not_before"], "not_after": entry["not_after"],
            "state": self._state(entry), "revoked_at": entry["revoked_at"], "reason": entry["reason"],
            "cert_path": str(paths[0]) if paths[0] else None, "key_path": str(paths[1]) if paths[1] else None,
            "chain_path": str(paths[2]) if paths[2] else None,
        }

    @staticmethod
    def _state(entry: dict[str, Any]) -> str:
        if entry["revoked_at"] is not None:
            return "revoked"
        if datetime.fromisoformat(entry["not_after"]) < _now():
            return "expired"
        return "valid"

    # --------------------------------------------------------------- index

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes between processes (a CLI command while ``serve`` renews its certificate)."""
        _make_private_dir(self.root)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _new_index(self, certificates: builtins.list[tuple[str, str, x509.Certificate]]) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT, "organisation": self.organisation, "crl_numbers": {},
            "certificates": [self._entry(name, kind, cert, self.key_type) for name, kind, cert in certificates],
        }

    @staticmethod
    def _entry(name: str, kind: str, cert: x509.Certificate, key_type: str) -> dict[str, Any]:
        return {
            "name": name, "kind": kind, "serial": format(cert.serial_number, "x"),
            "subject": cert.subject.rfc4514_string(), "key_type": key_type,
            "not_before": cert.not_valid_before_utc.isoformat(), "not_after": cert.not_valid_after_utc.isoformat(),
            "revoked_at": None, "reason": None, "replaced": False,
        }

    def _load_index(self) -> dict[str, Any]:
        if not self.exists():
            raise NotFound(f"no test PKI in {self.root}: create it with `gateway certs init`")
        try:
            index = json.loads(self.index_path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.index_path} is unreadable ({exc}): recreate the PKI with certs init --force") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise UserError(f"{self.index_path} is not a format {INDEX_FORMAT} PKI index")
        return index

    def _save_index(self, index: dict[str, Any]) -> None:
        data = json.dumps(index, indent=2, ensure_ascii=False).encode("utf-8")
        _write_atomically(self.index_path, data, 0o600)

    @staticmethod
    def _find_entry(index: dict[str, Any], name_or_serial: str) -> dict[str, Any] | None:
        """The current (not replaced) certificate of that name, else the one with that serial."""
        entries: builtins.list[dict[str, Any]] = index["certificates"]
        for entry in entries[::-1]:
            if entry["name"] == name_or_serial and not entry.get("replaced"):
                return entry
        serial = name_or_serial.replace(":", "").lower().lstrip("0")
        for entry in entries:
            if serial and entry["serial"].lstrip("0") == serial:
                return entry
        return None

    # Named as the brief asks; inside this class body ``list`` is this method, hence ``builtins.list`` above.
    def list(self) -> builtins.list[dict[str, Any]]:
        """Every certificate the PKI has issued, replaced ones included, oldest first."""
        return [self._record(entry) for entry in self._load_index()["certificates"]]


def _revoked_certificate(entry: dict[str, Any]) -> x509.RevokedCertificate:
    builder = (x509.RevokedCertificateBuilder()
               .serial_number(int(entry["serial"], 16))
               .revocation_date(datetime.fromisoformat(entry["revoked_at"])))
    reason = x509.ReasonFlags(entry["reason"])
    if reason is not x509.ReasonFlags.unspecified:
        # RFC 5280 5.3.1: the unspecified reason code SHOULD be absent rather than present.
        builder = builder.add_extension(x509.CRLReason(reason), critical=False)
    return builder.build()

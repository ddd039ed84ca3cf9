"""TLS contexts for the gateway's listeners and its outbound connections.

MSSanté requires TLS 1.2 or newer on every hop (Ref#2 ECO.1.1.1) and mutual
authentication between operators with certificates from the health PKI. The
server side can ask for a client certificate optionally (submission, where a
presented certificate enables SASL EXTERNAL, RFC 4422 appendix A) or require
one (the inter-operator relay).
"""

from __future__ import annotations

import asyncio.sslproto
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.errors import UserError

# TLS 1.2 suites with forward secrecy and AEAD only (the Mozilla "intermediate" choice); TLS 1.3
# suites are all AEAD with forward secrecy and are configured apart by OpenSSL.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"
PathLike = Path | str

# asyncio gives every TLS connection a receive buffer of SSLProtocol.max_size octets, allocated and zeroed
# at once: 256 KiB, which was 40% of an idle IMAP connection's memory. A socket read into it brings whole
# TLS records of at most 16 KiB each (RFC 8446 5.1), so 64 KiB still takes several per read.
TLS_RECEIVE_BUFFER = 64 * 1024
asyncio.sslproto.SSLProtocol.max_size = TLS_RECEIVE_BUFFER


class PeerCertificate(TypedDict):
    """The parts of a peer's certificate that authentication and relay policy look at."""

    subject: str
    common_name: str | None
    issuer: str
    serial: str
    emails: list[str]
    dns_names: list[str]
    fingerprint_sha256: str
    not_after: str


def _readable_file(path: PathLike, field: str) -> str:
    resolved = Path(path)
    if not resolved.is_file():
        raise UserError(f"{resolved} does not exist or is not a file", field=field)
    return str(resolved)


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    # CRIME (compression) and client-initiated renegotiation have no use here and only add attack surface.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # RFC 5280 conformance checks on every certificate in the chain, as the health PKI's certificates are.
    context.verify_flags |= ssl.VERIFY_X509_STRICT


def _load_crls(context: ssl.SSLContext, crls: PathLike | Iterable[PathLike]) -> None:
    """Check the peer's certificate against its issuer's CRL (RFC 5280 6.3); no CRL for it then fails."""
    listed = [crls] if isinstance(crls, (str, Path)) else list(crls)
    paths = [_readable_file(path, "crl") for path in listed]
    for path in paths:
        # OpenSSL's file lookup reads CRLs as well as certificates from a PEM file.
        context.load_verify_locations(cafile=path)
    if paths:
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _load_anchors(context: ssl.SSLContext, anchors: Iterable[PathLike]) -> None:
    """Further trust anchors (another CA's certificates, with its CRLs when revocation is checked)."""
    for path in anchors:
        context.load_verify_locations(cafile=_readable_file(path, "trust_anchors"))


def _load_identity(context: ssl.SSLContext, cert_chain: PathLike, key: PathLike | None) -> None:
    chain_path = _readable_file(cert_chain, "cert_chain")
    key_path = _readable_file(key, "key") if key is not None else None
    try:
        context.load_cert_chain(chain_path, key_path)
    except ssl.SSLError as exc:
        raise UserError(f"cannot use {chain_path} with key {key_path or chain_path}: {exc.reason or exc}",
                        field="cert_chain") from None


def server_context(cert_chain: PathLike, key: PathLike, *, client_ca: PathLike | None = None,
                   require_client_cert: bool = False, crls: PathLike | Iterable[PathLike] = (),
                   extra_anchors: Iterable[PathLike] = ()) -> ssl.SSLContext:
    """A listener's context: our chain (leaf first) and key, TLS 1.2+.

    With ``client_ca`` a client certificate is verified against that bundle: optional by default
    (submission: a certificate, when presented, must verify, and then allows SASL EXTERNAL), required with
    ``require_client_cert`` (inter-operator relay). ``crls`` adds revocation checks of client certificates;
    ``extra_anchors`` are further PEM files (other CAs and their CRLs) client certificates may chain to.
    """
    if require_client_cert and client_ca is None:
        raise UserError("requiring client certificates needs the CA bundle that issues them", field="client_ca")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    _load_identity(context, cert_chain, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=_readable_file(client_ca, "client_ca"))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        _load_anchors(context, extra_anchors)
        _load_crls(context, crls)
    return context


def client_context(ca_bundle: PathLike, *, cert_chain: PathLike | None = None, key: PathLike | None = None,
                   check_hostname: bool = True, crls: PathLike | Iterable[PathLike] = (),
                   extra_anchors: Iterable[PathLike] = ()) -> ssl.SSLContext:
    """An outbound context: the server must present a chain to ``ca_bundle`` (never the system store:
    only the health PKI is trusted, Ref#2 ECO.1.1.10) and, by default, match the host name (RFC 6125).
    ``cert_chain``/``key`` is our client certificate for operators that require one; ``extra_anchors`` are
    further PEM files (other CAs and their CRLs) a server may chain to."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    context.load_verify_locations(cafile=_readable_file(ca_bundle, "ca_bundle"))
    _load_anchors(context, extra_anchors)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if cert_chain is not None:
        _load_identity(context, cert_chain, key)
    elif key is not None:
        raise UserError("a key without its certificate chain", field="cert_chain")
    _load_crls(context, crls)
    return context


def peer_certificate_info(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    """What the peer's certificate says, or None when it presented none (or TLS is not up).

    The certificate was verified during the handshake whenever the context asked for verification.
    """
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    return describe_certificate(x509.load_der_x509_certificate(der))


def describe_certificate(cert: x509.Certificate) -> PeerCertificate:
    common_names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        emails, dns_names = san.get_values_for_type(x509.RFC822Name), san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        emails, dns_names = [], []
    return PeerCertificate(
        subject=cert.subject.rfc4514_string(),
        common_name=str(common_names[0].value) if common_names else None,
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        emails=emails,
        dns_names=dns_names,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_after=cert.not_valid_after_utc.isoformat(),
    )

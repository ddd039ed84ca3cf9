"""Certificate path validation for S/MIME (RFC 5280 6.1, RFC 8550 4).

Why not ``cryptography.x509.verification``: its ClientVerifier applies the
CA/Browser-forum web-PKI profile, has no revocation checking, and reports a
failure as one opaque message. Here every failure names the certificate
(subject and serial), the trust anchor the path led to (or "no anchor") and the
rule that failed, so an administrator can act on it (nhin-d#202).

The walk: build candidate paths from the end-entity certificate up to a
configured trust anchor through the intermediates offered (those carried in
the message plus any the caller knows), checking each issuer's signature; then
check every certificate of a complete path against the rules below, anchor
first. Revocation uses the CRLs the caller provides (no network).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

MAX_PATH_LENGTH = 8

# RFC 5280 6.1.4(o): extensions this validator processes; any other critical one fails the path.
_UNDERSTOOD_EXTENSIONS = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.NAME_CONSTRAINTS,
    # RFC 5280 6.1: with initial-any-policy and no explicit-policy requirement the
    # policy tree never fails a path, so a critical certificatePolicies is accepted.
    ExtensionOID.CERTIFICATE_POLICIES,
})


class Purpose(Enum):
    """What the end-entity certificate is being used for (RFC 8550 4.4.2)."""

    SIGNING = "signing"
    ENCRYPTION = "encryption"


class PathRule(StrEnum):
    """The rule a path broke; stable codes for logs, results and tests."""

    NO_ANCHOR = "no-trust-anchor"
    ISSUER_SIGNATURE = "issuer-signature"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    NOT_A_CA = "issuer-not-a-ca"
    PATH_LENGTH = "path-length-exceeded"
    CA_KEY_USAGE = "issuer-key-usage"
    KEY_USAGE = "key-usage"
    EXTENDED_KEY_USAGE = "extended-key-usage"
    NAME_CONSTRAINTS = "name-constraints"
    UNKNOWN_CRITICAL_EXTENSION = "unknown-critical-extension"
    REVOKED = "revoked"
    REVOCATION_UNKNOWN = "revocation-unknown"
    PATH_TOO_LONG = "path-too-long"


def describe_certificate(certificate: x509.Certificate) -> str:
    """``CN=Alice,O=Clinic (serial 0x1f2e)``: how failures name a certificate."""
    try:
        subject = certificate.subject.rfc4514_string() or "<empty subject>"
    except ValueError:
        subject = "<unparseable subject>"
    return f"{subject} (serial {certificate.serial_number:#x})"


@dataclass(frozen=True)
class PathFailure:
    """One broken rule, naming the certificate and the anchor involved."""

    rule: PathRule
    certificate: x509.Certificate
    anchor: x509.Certificate | None
    detail: str

    def __str__(self) -> str:
        anchor = describe_certificate(self.anchor) if self.anchor is not None else "no anchor"
        return f"{self.rule}: {describe_certificate(self.certificate)} [anchor: {anchor}]: {self.detail}"


@dataclass(frozen=True)
class PathResult:
    """The outcome of validating one certificate to the trust anchors."""

    valid: bool
    chain: tuple[x509.Certificate, ...]
    anchor: x509.Certificate | None
    failures: tuple[PathFailure, ...]
    revocation_checked: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def reason(self) -> str:
        return str(self.failures[0]) if self.failures else "ok"


# ---------------------------------------------------------------------------
# E-mail addresses in certificates (RFC 8550 3)
# ---------------------------------------------------------------------------


def certificate_emails(certificate: x509.Certificate) -> tuple[str, ...]:
    """Addresses bound to a certificate: SAN rfc822Name, else subject emailAddress (RFC 8550 3)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        from_san = [str(name) for name in san.get_values_for_type(x509.RFC822Name)]
    except (x509.ExtensionNotFound, ValueError):
        from_san = []
    if from_san:
        return tuple(from_san)
    return tuple(str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS))


def address_matches(certificate: x509.Certificate, address: str) -> bool:
    """Whether ``address`` is one of the certificate's addresses, case-insensitively."""
    wanted = address.strip().casefold()
    return bool(wanted) and any(email.casefold() == wanted for email in certificate_emails(certificate))


# ---------------------------------------------------------------------------
# Path building
# ---------------------------------------------------------------------------


_E = TypeVar("_E", bound=x509.ExtensionType)


def _extension(certificate: x509.Certificate, kind: type[_E]) -> x509.Extension[_E] | None:
    # Unparseable extensions read as absent here; _check_critical_extensions fails such a path.
    try:
        return certificate.extensions.get_extension_for_class(kind)
    except (x509.ExtensionNotFound, ValueError):
        return None


def _key_ids_compatible(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    # RFC 5280 4.2.1.1: the AKI keyIdentifier names the issuer's SKI when both are present.
    aki = _extension(child, x509.AuthorityKeyIdentifier)
    ski = _extension(issuer, x509.SubjectKeyIdentifier)
    if aki is None or ski is None or aki.value.key_identifier is None:
        return True
    return bool(aki.value.key_identifier == ski.value.digest)


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


@dataclass
class _Search:
    anchors: tuple[x509.Certificate, ...]
    pool: tuple[x509.Certificate, ...]
    paths: list[tuple[x509.Certificate, ...]] = field(default_factory=list)
    bad_signatures: list[tuple[x509.Certificate, x509.Certificate]] = field(default_factory=list)

    def extend(self, path: tuple[x509.Certificate, ...]) -> None:
        current = path[-1]
        if current in self.anchors:
            self.paths.append(path)
            return
        if len(path) > MAX_PATH_LENGTH:
            return
        for candidate in (*self.anchors, *self.pool):
            if candidate in path or candidate.subject != current.issuer or not _key_ids_compatible(current, candidate):
                continue
            if _signed_by(current, candidate):
                self.extend((*path, candidate))
            else:
                self.bad_signatures.append((current, candidate))


def _no_path_failure(leaf: x509.Certificate, search: _Search) -> PathFailure:
    if search.bad_signatures:
        child, issuer = search.bad_signatures[0]
        anchor = issuer if issuer in search.anchors else None
        return PathFailure(PathRule.ISSUER_SIGNATURE, child, anchor,
                           f"signature does not verify with the key of {describe_certificate(issuer)}")
    return PathFailure(PathRule.NO_ANCHOR, leaf, None,
                       f"no path from issuer {leaf.issuer.rfc4514_string()} to a configured trust anchor")


# ---------------------------------------------------------------------------
# Validation of one complete path
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    chain: tuple[x509.Certificate, ...]  # leaf first, anchor last
    now: datetime
    purpose: Purpose
    crls: tuple[x509.CertificateRevocationList, ...]
    require_revocation: bool

    @property
    def anchor(self) -> x509.Certificate:
        return self.chain[-1]

    def fail(self, rule: PathRule, certificate: x509.Certificate, detail: str) -> PathFailure:
        return PathFailure(rule, certificate, self.anchor, detail)


def _check_validity(context: _Context, certificate: x509.Certificate) -> list[PathFailure]:
    # RFC 5280 6.1.3(a)(2): the current time is within the validity period.
    if context.now < certificate.not_valid_before_utc:
        return [context.fail(PathRule.NOT_YET_VALID, certificate, f"valid from {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z")]
    if context.now > certificate.not_valid_after_utc:
        return [context.fail(PathRule.EXPIRED, certificate, f"expired {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")]
    return []


def _check_critical_extensions(context: _Context, certificate: x509.Certificate) -> list[PathFailure]:
    try:
        unknown = [e.oid.dotted_string for e in certificate.extensions if e.critical and e.oid not in _UNDERSTOOD_EXTENSIONS]
    except ValueError as exc:
        return [context.fail(PathRule.UNKNOWN_CRITICAL_EXTENSION, certificate, f"unparseable extensions: {exc}")]
    return [context.fail(PathRule.UNKNOWN_CRITICAL_EXTENSION, certificate, f"critical extension {oid} not understood")
            for oid in unknown]


def _check_issuer(context: _Context, issuer: x509.Certificate, certificates_below: int) -> list[PathFailure]:
    """RFC 5280 6.1.4(k)-(n): an issuing certificate must be a CA allowed to sign certificates."""
    constraints = _extension(issuer, x509.BasicConstraints)
    if constraints is None or not constraints.value.ca:
        return [context.fail(PathRule.NOT_A_CA, issuer, "basicConstraints cA is not TRUE")]
    failures = []
    # RFC 5280 4.2.1.9: pathLenConstraint counts the non-self-issued intermediates below this CA.
    intermediates_below = certificates_below - 1
    if constraints.value.path_length is not None and intermediates_below > constraints.value.path_length:
        failures.append(context.fail(PathRule.PATH_LENGTH, issuer,
                                     f"pathLenConstraint {constraints.value.path_length}, {intermediates_below} CA(s) below"))
    usage = _extension(issuer, x509.KeyUsage)
    if usage is not None and not usage.value.key_cert_sign:
        failures.append(context.fail(PathRule.CA_KEY_USAGE, issuer, "keyUsage lacks keyCertSign"))
    return failures


def _check_leaf_usage(context: _Context, leaf: x509.Certificate) -> list[PathFailure]:
    failures = []
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not _key_usage_allows(usage.value, leaf, context.purpose):
        wanted = "digitalSignature or nonRepudiation" if context.purpose is Purpose.SIGNING else "keyEncipherment or keyAgreement"
        failures.append(context.fail(PathRule.KEY_USAGE, leaf, f"keyUsage lacks {wanted} for {context.purpose.value}"))
    extended = _extension(leaf, x509.ExtendedKeyUsage)
    # RFC 8550 4.4.4: when extendedKeyUsage is present it must allow emailProtection.
    if extended is not None and not ({ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
                                     & set(extended.value)):
        failures.append(context.fail(PathRule.EXTENDED_KEY_USAGE, leaf, "extendedKeyUsage lacks emailProtection"))
    return failures


def _key_usage_allows(usage: x509.KeyUsage, leaf: x509.Certificate, purpose: Purpose) -> bool:
    # RFC 8550 4.4.2: signing needs digitalSignature or nonRepudiation; encryption keyEncipherment (RSA) or keyAgreement (EC).
    if purpose is Purpose.SIGNING:
        return bool(usage.digital_signature or usage.content_commitment)
    try:
        public_key = leaf.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return False
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return bool(usage.key_agreement)
    return bool(usage.key_encipherment)


def _email_within(email: str, constraint: str) -> bool:
    # RFC 5280 4.2.1.10: a mailbox, a host (all mailboxes there) or ".domain" (any host in it).
    email, constraint = email.casefold(), constraint.casefold()
    if "@" in constraint:
        return email == constraint
    host = email.rpartition("@")[2]
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def _check_name_constraints(context: _Context, ca: x509.Certificate, below: Sequence[x509.Certificate]) -> list[PathFailure]:
    extension = _extension(ca, x509.NameConstraints)
    if extension is None:
        return []
    constraints: x509.NameConstraints = extension.value
    subtrees = [*(constraints.permitted_subtrees or []), *(constraints.excluded_subtrees or [])]
    unsupported = {type(name).__name__ for name in subtrees if not isinstance(name, x509.RFC822Name)}
    if unsupported:
        return [context.fail(PathRule.NAME_CONSTRAINTS, ca, f"name constraints of type {', '.join(sorted(unsupported))} are not enforced here")]
    permitted = [name.value for name in constraints.permitted_subtrees or []]
    excluded = [name.value for name in constraints.excluded_subtrees or []]
    failures = []
    for certificate in below:
        for email in certificate_emails(certificate):
            if any(_email_within(email, rule) for rule in excluded) or (permitted and not any(_email_within(email, rule) for rule in permitted)):
                failures.append(context.fail(PathRule.NAME_CONSTRAINTS, certificate, f"{email} is outside the name constraints of {describe_certificate(ca)}"))
    return failures


@dataclass(frozen=True)
class _RevocationStatus:
    failures: list[PathFailure]
    checked: bool
    notes: list[str]


def _usable_crls(context: _Context, certificate: x509.Certificate, issuer: x509.Certificate) -> tuple[list[x509.CertificateRevocationList], list[str]]:
    usable, notes = [], []
    can_sign_crls = _extension(issuer, x509.KeyUsage)
    for crl in context.crls:
        if crl.issuer != certificate.issuer:
            continue
        # RFC 5280 6.3.3(f)-(g): the CRL is signed by the certificate's issuer, allowed to sign CRLs.
        if not _crl_signed_by(crl, issuer):
            notes.append(f"CRL from {crl.issuer.rfc4514_string()} ignored: bad signature")
            continue
        if can_sign_crls is not None and not can_sign_crls.value.crl_sign:
            notes.append(f"CRL from {crl.issuer.rfc4514_string()} ignored: issuer keyUsage lacks cRLSign")
            continue
        usable.append(crl)
    return usable, notes


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (UnsupportedAlgorithm, ValueError, TypeError):
        return False


def _check_revocation(context: _Context, certificate: x509.Certificate, issuer: x509.Certificate) -> _RevocationStatus:
    crls, notes = _usable_crls(context, certificate, issuer)
    failures: list[PathFailure] = []
    fresh = False
    for crl in crls:
        entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
        if entry is not None and entry.revocation_date_utc <= context.now:
            failures.append(context.fail(PathRule.REVOKED, certificate, f"revoked on {entry.revocation_date_utc:%Y-%m-%d %H:%M:%S}Z{_crl_reason(entry)} per CRL of {crl.issuer.rfc4514_string()}"))
        # RFC 5280 6.3.3(a): a CRL is current only until its nextUpdate.
        next_update = crl.next_update_utc
        if next_update is not None and next_update >= context.now and crl.last_update_utc <= context.now:
            fresh = True
        else:
            notes.append(f"CRL from {crl.issuer.rfc4514_string()} is not current (nextUpdate {next_update})")
    if not fresh and context.require_revocation and not failures:
        failures.append(context.fail(PathRule.REVOCATION_UNKNOWN, certificate, "no current, validly signed CRL from its issuer"))
    return _RevocationStatus(failures, fresh, notes)


def _crl_reason(entry: x509.RevokedCertificate) -> str:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        return ""
    return f" ({reason.value})"


def _validate_chain(context: _Context) -> PathResult:
    chain = context.chain
    failures: list[PathFailure] = []
    notes: list[str] = []
    all_checked = True
    for index in range(len(chain) - 1, -1, -1):  # RFC 5280 6.1.3: from the anchor down to the leaf
        certificate = chain[index]
        failures += _check_validity(context, certificate)
        failures += _check_critical_extensions(context, certificate)
        if index > 0:
            failures += _check_issuer(context, certificate, certificates_below=index)
            failures += _check_name_constraints(context, certificate, chain[:index])
        if index < len(chain) - 1:
            status = _check_revocation(context, certificate, chain[index + 1])
            failures += status.failures
            notes += status.notes
            all_checked = all_checked and status.checked
    failures += _check_leaf_usage(context, chain[0])
    return PathResult(not failures, chain, context.anchor, tuple(failures), all_checked and len(chain) > 1, tuple(notes))


def validate_path(
    certificate: x509.Certificate,
    *,
    anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    crls: Sequence[x509.CertificateRevocationList] = (),
    now: datetime,
    purpose: Purpose = Purpose.SIGNING,
    require_revocation: bool = False,
) -> PathResult:
    """Validate ``certificate`` up to one of ``anchors`` (RFC 5280 6.1, RFC 8550 4).

    ``now`` must be timezone-aware. Returns the first fully valid path, else the
    failures of the first complete path found, else "no anchor".
    """
    search = _Search(anchors=tuple(anchors), pool=tuple(c for c in intermediates if c not in anchors))
    search.extend((certificate,))
    if not search.paths:
        return PathResult(False, (certificate,), None, (_no_path_failure(certificate, search),))
    results = [
        _validate_chain(_Context(path, now, purpose, tuple(crls), require_revocation))
        for path in search.paths
    ]
    return next((result for result in results if result.valid), results[0])

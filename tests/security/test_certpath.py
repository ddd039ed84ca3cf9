"""Certificate path validation (RFC 5280 6.1, RFC 8550 4): every failure names certificate, anchor and rule."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from gateway.security.certpath import (
    PathRule,
    Purpose,
    address_matches,
    certificate_emails,
    describe_certificate,
    validate_path,
)
from tests.security.smime_pki import NOW, Issued, Pki, build_pki, make_ca, make_crl, make_leaf


@pytest.fixture(scope="module")
def pki() -> Pki:
    return build_pki()


def rules(result: object) -> set[PathRule]:
    return {failure.rule for failure in result.failures}  # type: ignore[attr-defined]


def test_valid_path_through_an_intermediate(pki: Pki) -> None:
    result = validate_path(pki.alice.certificate, anchors=pki.anchors, intermediates=[pki.intermediate.certificate], now=NOW)
    assert result.valid, result.reason
    assert result.chain == (pki.alice.certificate, pki.intermediate.certificate, pki.root.certificate)
    assert result.anchor == pki.root.certificate
    assert not result.revocation_checked


def test_missing_intermediate_names_the_leaf_and_no_anchor(pki: Pki) -> None:
    result = validate_path(pki.alice.certificate, anchors=pki.anchors, now=NOW)
    assert not result.valid and rules(result) == {PathRule.NO_ANCHOR}
    text = result.reason
    assert "no-trust-anchor" in text and "no anchor" in text
    assert describe_certificate(pki.alice.certificate) in text


def test_untrusted_root(pki: Pki) -> None:
    result = validate_path(pki.mallory.certificate, anchors=pki.anchors, intermediates=[pki.rogue_root.certificate], now=NOW)
    assert not result.valid and rules(result) == {PathRule.NO_ANCHOR}


def test_forged_issuer_signature(pki: Pki) -> None:
    impostor = make_ca("Test Issuing CA", parent=pki.root)  # same name, different key
    leaf = make_leaf(impostor, "eve@clinic.example")
    result = validate_path(leaf.certificate, anchors=pki.anchors, intermediates=[pki.intermediate.certificate], now=NOW)
    assert not result.valid
    assert rules(result) <= {PathRule.ISSUER_SIGNATURE, PathRule.NO_ANCHOR}


@pytest.mark.parametrize("offset,rule", [(timedelta(days=400), PathRule.EXPIRED), (-timedelta(days=2), PathRule.NOT_YET_VALID)])
def test_validity_period(pki: Pki, offset: timedelta, rule: PathRule) -> None:
    result = validate_path(pki.bob.certificate, anchors=pki.anchors, now=NOW + offset)
    assert rule in rules(result)
    failure = next(f for f in result.failures if f.rule is rule)
    assert failure.certificate == pki.bob.certificate and failure.anchor == pki.root.certificate
    assert describe_certificate(pki.root.certificate) in str(failure)


def test_expired_intermediate_is_named(pki: Pki) -> None:
    old = make_ca("Old Issuing CA", parent=pki.root, not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=1))
    leaf = make_leaf(old, "dan@clinic.example", not_before=NOW - timedelta(days=300), not_after=NOW + timedelta(days=30))
    result = validate_path(leaf.certificate, anchors=pki.anchors, intermediates=[old.certificate], now=NOW)
    assert [(f.rule, f.certificate) for f in result.failures] == [(PathRule.EXPIRED, old.certificate)]


def test_path_length_constraint(pki: Pki) -> None:
    # pki.intermediate has pathLen 0: it may not issue another CA that issues leaves.
    sub = make_ca("Sub CA", parent=pki.intermediate)
    leaf = make_leaf(sub, "erin@clinic.example")
    result = validate_path(leaf.certificate, anchors=pki.anchors,
                           intermediates=[pki.intermediate.certificate, sub.certificate], now=NOW)
    assert [(f.rule, f.certificate) for f in result.failures] == [(PathRule.PATH_LENGTH, pki.intermediate.certificate)]


def test_end_entity_cannot_issue(pki: Pki) -> None:
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "child")]))
               .issuer_name(pki.bob.certificate.subject)
               .public_key(pki.carol.key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1))
               .not_valid_after(NOW + timedelta(days=10)))
    child = builder.sign(pki.bob.key, hashes.SHA256())  # type: ignore[arg-type]
    result = validate_path(child, anchors=pki.anchors, intermediates=[pki.bob.certificate], now=NOW)
    assert (PathRule.NOT_A_CA, pki.bob.certificate) in [(f.rule, f.certificate) for f in result.failures]


def test_extended_key_usage_must_allow_email(pki: Pki) -> None:
    leaf = make_leaf(pki.root, "tls@hospital.example", email_protection=False)
    result = validate_path(leaf.certificate, anchors=pki.anchors, now=NOW)
    assert rules(result) == {PathRule.EXTENDED_KEY_USAGE}


def test_key_usage_by_purpose(pki: Pki) -> None:
    assert validate_path(pki.carol.certificate, anchors=pki.anchors, now=NOW, purpose=Purpose.ENCRYPTION).valid
    assert validate_path(pki.bob.certificate, anchors=pki.anchors, now=NOW, purpose=Purpose.ENCRYPTION).valid


def test_revoked_leaf(pki: Pki) -> None:
    crl = make_crl(pki.root, [pki.bob.certificate])
    result = validate_path(pki.bob.certificate, anchors=pki.anchors, crls=[crl], now=NOW)
    assert rules(result) == {PathRule.REVOKED}
    assert "keyCompromise" in result.reason and describe_certificate(pki.bob.certificate) in result.reason


def test_revoked_intermediate(pki: Pki) -> None:
    crls = [make_crl(pki.root, [pki.intermediate.certificate]), make_crl(pki.intermediate, [])]
    result = validate_path(pki.alice.certificate, anchors=pki.anchors, intermediates=[pki.intermediate.certificate],
                           crls=crls, now=NOW)
    assert [(f.rule, f.certificate) for f in result.failures] == [(PathRule.REVOKED, pki.intermediate.certificate)]


def test_fresh_crls_mark_revocation_checked(pki: Pki) -> None:
    crls = [make_crl(pki.root, []), make_crl(pki.intermediate, [])]
    result = validate_path(pki.alice.certificate, anchors=pki.anchors, intermediates=[pki.intermediate.certificate],
                           crls=crls, now=NOW, require_revocation=True)
    assert result.valid and result.revocation_checked


def test_crl_with_a_forged_signature_is_ignored(pki: Pki) -> None:
    forged = make_crl(pki.root, [pki.bob.certificate], signer=pki.rogue_root)
    result = validate_path(pki.bob.certificate, anchors=pki.anchors, crls=[forged], now=NOW)
    assert result.valid and any("bad signature" in note for note in result.notes)
    strict = validate_path(pki.bob.certificate, anchors=pki.anchors, crls=[forged], now=NOW, require_revocation=True)
    assert rules(strict) == {PathRule.REVOCATION_UNKNOWN}


def test_stale_crl(pki: Pki) -> None:
    stale = make_crl(pki.root, [], last_update=NOW - timedelta(days=10), next_update=NOW - timedelta(days=3))
    result = validate_path(pki.bob.certificate, anchors=pki.anchors, crls=[stale], now=NOW, require_revocation=True)
    assert rules(result) == {PathRule.REVOCATION_UNKNOWN}
    assert any("not current" in note for note in result.notes)


def test_name_constraints_on_email(pki: Pki) -> None:
    constrained = _constrained_ca(pki.root, permitted=[x509.RFC822Name(".clinic.example"), x509.RFC822Name("clinic.example")])
    inside = make_leaf(constrained, "frank@clinic.example")
    outside = make_leaf(constrained, "frank@elsewhere.example")
    intermediates = [constrained.certificate]
    assert validate_path(inside.certificate, anchors=pki.anchors, intermediates=intermediates, now=NOW).valid
    result = validate_path(outside.certificate, anchors=pki.anchors, intermediates=intermediates, now=NOW)
    assert rules(result) == {PathRule.NAME_CONSTRAINTS}


def _constrained_ca(parent: Issued, permitted: list[x509.GeneralName]) -> Issued:
    base = make_ca("Constrained CA", parent=parent)
    builder = (x509.CertificateBuilder()
               .subject_name(base.certificate.subject)
               .issuer_name(parent.certificate.subject)
               .public_key(base.key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1))
               .not_valid_after(NOW + timedelta(days=100)))
    for extension in base.certificate.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    builder = builder.add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
    return Issued(builder.sign(parent.key, hashes.SHA256()), base.key, parent)  # type: ignore[arg-type]


def test_unknown_critical_extension(pki: Pki) -> None:
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    builder = (x509.CertificateBuilder()
               .subject_name(pki.bob.certificate.subject)
               .issuer_name(pki.root.certificate.subject)
               .public_key(pki.bob.key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1))
               .not_valid_after(NOW + timedelta(days=10))
               .add_extension(unknown, critical=True))
    certificate = builder.sign(pki.root.key, hashes.SHA256())  # type: ignore[arg-type]
    result = validate_path(certificate, anchors=pki.anchors, now=NOW)
    assert rules(result) == {PathRule.UNKNOWN_CRITICAL_EXTENSION}
    assert "1.3.6.1.4.1.99999.1" in result.reason


def test_certificate_emails_and_matching(pki: Pki) -> None:
    assert certificate_emails(pki.alice.certificate) == ("alice@clinic.example",)
    assert address_matches(pki.alice.certificate, "ALICE@Clinic.Example")
    assert not address_matches(pki.alice.certificate, "alice@clinic.example.evil")
    assert not address_matches(pki.alice.certificate, "")
    assert certificate_emails(pki.root.certificate) == ()

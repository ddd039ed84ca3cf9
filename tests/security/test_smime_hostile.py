"""Hostile and broken input: each case ends in a precise, typed verdict, never an exception."""

from __future__ import annotations

import base64
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.security import smime
from gateway.security.certpath import PathRule, describe_certificate
from gateway.security.cms import (
    ContentCipher,
    SmimeError,
    SmimeFailure,
    build_enveloped_data,
    build_signed_data,
    open_enveloped_data,
    verify_signed_data,
)
from tests.security.smime_pki import NOW, Pki, build_pki, make_crl, make_leaf

MESSAGE = (
    b"From: alice@clinic.example\r\n"
    b"To: bob@hospital.example\r\n"
    b"Subject: Resultats\r\n"
    b"Message-ID: <r-1@clinic.example>\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Potassium 4.1 mmol/L\r\n"
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return build_pki()


def incoming(pki: Pki, raw: bytes, **kwargs: object) -> smime.IncomingResult:
    arguments: dict[str, object] = {"trust_anchors": pki.anchors, "now": NOW, **kwargs}
    return smime.process_incoming(raw, **arguments)  # type: ignore[arg-type]


def pkcs7_mime(der: bytes, smime_type: str = "signed-data") -> bytes:
    return (b"From: alice@clinic.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/pkcs7-mime; smime-type=" + smime_type.encode() + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(der).replace(b"\n", b"\r\n"))


def test_good_message_passes(pki: Pki) -> None:
    signed = smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity())
    result = incoming(pki, signed)
    assert result.status is smime.SmimeStatus.PASS and result.trusted
    assert result.signer_matches_from is True
    assert result.path is not None and result.path.anchor == pki.root.certificate
    assert result.summary == "smime=pass header.from=alice@clinic.example body.smime-identifier=alice@clinic.example"
    assert result.content.endswith(b"Potassium 4.1 mmol/L\r\n") and b"Message-ID: <r-1@clinic.example>" in result.content


def test_untrusted_ca(pki: Pki) -> None:
    mallory = pki.mallory
    identity = smime.SigningIdentity(mallory.certificate, mallory.key, (pki.rogue_root.certificate,))
    result = incoming(pki, smime.process_outgoing(MESSAGE, sign_with=identity))
    assert result.status is smime.SmimeStatus.FAIL
    assert result.signature is not None and result.signature.valid  # the mathematics hold; trust does not
    assert result.path is not None and result.path.failures[0].rule is PathRule.NO_ANCHOR
    assert "no-trust-anchor" in result.summary and "no anchor" in result.reasons[0]
    assert describe_certificate(mallory.certificate) in result.reasons[0]


def test_expired_signer(pki: Pki) -> None:
    old = make_leaf(pki.root, "alice@clinic.example", not_before=NOW - timedelta(days=60), not_after=NOW - timedelta(days=1))
    result = incoming(pki, smime.process_outgoing(MESSAGE, sign_with=old.identity()))
    assert result.status is smime.SmimeStatus.FAIL
    assert result.path is not None and [f.rule for f in result.path.failures] == [PathRule.EXPIRED]
    assert result.summary.startswith("smime=fail (expired: ")


def test_revoked_signer(pki: Pki) -> None:
    crls = [make_crl(pki.root, []), make_crl(pki.intermediate, [pki.alice.certificate])]
    result = incoming(pki, smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity()), crls=crls)
    assert result.status is smime.SmimeStatus.FAIL
    assert result.path is not None and [f.rule for f in result.path.failures] == [PathRule.REVOKED]


def test_signer_is_not_the_sender(pki: Pki) -> None:
    forged_from = MESSAGE.replace(b"From: alice@clinic.example", b"From: Dr Eve <eve@clinic.example>")
    result = incoming(pki, smime.process_outgoing(forged_from, sign_with=pki.alice.identity()))
    assert result.status is smime.SmimeStatus.POLICY
    assert result.signer_matches_from is False and result.path is not None and result.path.valid
    assert result.summary.startswith("smime=policy (address-mismatch: From eve@clinic.example")


def test_one_byte_changed_after_signing(pki: Pki) -> None:
    signed = smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity())
    tampered = signed.replace(b"Potassium 4.1", b"Potassium 9.1")
    assert tampered != signed
    result = incoming(pki, tampered)
    assert result.status is smime.SmimeStatus.FAIL
    assert result.signature is not None and result.signature.failure is SmimeFailure.DIGEST_MISMATCH


def test_signature_value_altered(pki: Pki) -> None:
    der = build_signed_data(b"content\r\n", pki.bob.identity(), detached=False)
    info = asn1_cms.ContentInfo.load(der)
    signer_info = info["content"]["signer_infos"][0]
    value = bytearray(signer_info["signature"].native)
    value[10] ^= 0x01
    signer_info["signature"] = bytes(value)
    result = verify_signed_data(info.dump(force=True))
    assert not result.valid and result.failure is SmimeFailure.BAD_SIGNATURE


def test_signer_certificate_absent(pki: Pki) -> None:
    der = build_signed_data(b"content\r\n", pki.bob.identity(), detached=False)
    info = asn1_cms.ContentInfo.load(der)
    info["content"]["certificates"] = []
    result = verify_signed_data(info.dump(force=True))
    assert result.failure is SmimeFailure.SIGNER_CERTIFICATE_MISSING


def test_weak_sha1_signature_from_openssl(pki: Pki, tmp_path: Path) -> None:
    certificate, key = pki.bob.write(tmp_path, "bob")
    signed = subprocess.run(
        ["openssl", "cms", "-sign", "-md", "sha1", "-signer", str(certificate), "-inkey", str(key),
         "-from", "bob@hospital.example"],
        input=b"Content-Type: text/plain\r\n\r\nold client\r\n", capture_output=True, check=True).stdout
    result = incoming(pki, signed)
    assert result.signature is not None and result.signature.valid and result.signature.weak_algorithm
    assert result.status is smime.SmimeStatus.POLICY and "weak-algorithm" in result.summary


@pytest.mark.parametrize("der", [os.urandom(200), b"\x30\x82\xff\xff" + b"\x00" * 20, b"", b"\x30\x00"])
def test_garbage_cms(pki: Pki, der: bytes) -> None:
    result = incoming(pki, pkcs7_mime(der))
    assert result.status is smime.SmimeStatus.PERMERROR
    assert result.summary.startswith("smime=permerror (")
    assert result.content == pkcs7_mime(der)


def test_truncated_cms(pki: Pki) -> None:
    der = build_signed_data(b"content\r\n", pki.bob.identity(), detached=False)
    for cut in (len(der) - 1, len(der) // 2, 10):
        with pytest.raises(SmimeError) as raised:
            verify_signed_data(der[:cut])
        assert raised.value.reason is SmimeFailure.MALFORMED
        assert incoming(pki, pkcs7_mime(der[:cut])).status is smime.SmimeStatus.PERMERROR


def test_invalid_base64(pki: Pki) -> None:
    raw = pkcs7_mime(b"x")[:-8] + b"!!!*&^\r\n"
    result = incoming(pki, raw)
    assert result.status is smime.SmimeStatus.PERMERROR and "malformed-mime" in result.reasons[0]


def test_multipart_signed_without_closing_delimiter(pki: Pki) -> None:
    signed = smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity())
    cut = signed[: signed.rindex(b"--\r\n") - 10]
    result = incoming(pki, cut)
    assert result.status is smime.SmimeStatus.PERMERROR and "closing delimiter" in result.reasons[0]


def test_encrypted_for_someone_else(pki: Pki) -> None:
    sealed = smime.process_outgoing(MESSAGE, encrypt_to=[pki.bob.certificate])
    result = incoming(pki, sealed, keys=[pki.carol.recipient_key(), pki.alice.recipient_key()])
    assert result.status is smime.SmimeStatus.NEUTRAL
    assert result.decryption is not None and not result.decryption.decrypted
    assert result.decryption.failure is SmimeFailure.NO_RECIPIENT_KEY
    assert result.content == sealed  # delivered as is, flagged
    assert result.summary.startswith("smime=neutral (no-recipient-key")


def test_gcm_ciphertext_altered(pki: Pki) -> None:
    der = build_enveloped_data(b"Content-Type: text/plain\r\n\r\nsecret\r\n", [pki.bob.certificate], cipher=ContentCipher.AES256_GCM)
    info = asn1_cms.ContentInfo.load(der)
    content_info = info["content"]["auth_encrypted_content_info"]
    altered = bytearray(content_info["encrypted_content"].native)
    altered[0] ^= 0x80
    content_info["encrypted_content"] = bytes(altered)
    with pytest.raises(SmimeError) as raised:
        open_enveloped_data(info.dump(force=True), [pki.bob.recipient_key()])
    assert raised.value.reason is SmimeFailure.DECRYPTION_FAILED
    result = incoming(pki, pkcs7_mime(info.dump(force=True), "authEnveloped-data"), keys=[pki.bob.recipient_key()])
    assert result.status is smime.SmimeStatus.PERMERROR
    assert result.decryption is not None and result.decryption.failure is SmimeFailure.DECRYPTION_FAILED


def test_plain_and_pgp_messages_are_not_judged(pki: Pki) -> None:
    assert incoming(pki, MESSAGE).summary == "smime=none header.from=alice@clinic.example"
    pgp = (b"From: a@b.example\r\nContent-Type: multipart/signed; protocol=\"application/pgp-signature\"; "
           b"boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x\r\n\r\nsig\r\n--x--\r\n")
    assert incoming(pki, pgp).status is smime.SmimeStatus.NONE


def test_outgoing_needs_matching_key(pki: Pki) -> None:
    wrong = smime.SigningIdentity(pki.alice.certificate, pki.bob.key)
    with pytest.raises(SmimeError) as raised:
        smime.process_outgoing(MESSAGE, sign_with=wrong)
    assert raised.value.reason is SmimeFailure.KEY_MISMATCH


# --- fuzzing -------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(pki: Pki) -> list[bytes]:
    return [
        build_signed_data(b"abc\r\n", pki.alice.identity(), detached=False),
        build_signed_data(b"abc\r\n", pki.carol.identity(), detached=False, rsa_pss=True),
        build_signed_data(b"abc\r\n", pki.bob.identity(), detached=False, rsa_pss=True),
        build_enveloped_data(b"abc\r\n", [pki.bob.certificate, pki.carol.certificate]),
        build_enveloped_data(b"abc\r\n", [pki.carol.certificate], cipher=ContentCipher.AES128_GCM),
    ]


def _mutate(der: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(der)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


def _exercise(pki: Pki, der: bytes) -> None:
    for operation in (lambda: verify_signed_data(der, None),
                      lambda: verify_signed_data(der, b"abc\r\n"),
                      lambda: open_enveloped_data(der, [pki.bob.recipient_key(), pki.carol.recipient_key()])):
        try:
            operation()
        except SmimeError:
            pass
    result = incoming(pki, pkcs7_mime(der), keys=[pki.bob.recipient_key()])
    assert result.summary.startswith("smime=")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_random_bytes_never_crash(pki: Pki, data: bytes) -> None:
    _exercise(pki, data)
    _exercise(pki, b"\x30\x80" + data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 4),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 3000)))
def test_mutated_der_never_crashes(pki: Pki, samples: list[bytes], index: int, edits: list[tuple[int, int]], cut: int | None) -> None:
    _exercise(pki, _mutate(samples[index], edits, cut))


@pytest.fixture(scope="module")
def mime_samples(pki: Pki) -> list[bytes]:
    return [
        smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity()),
        smime.process_outgoing(MESSAGE, sign_with=pki.carol.identity(), encrypt_to=[pki.bob.certificate],
                               options=smime.OutgoingOptions(detached=False)),
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 1),
       edits=st.lists(st.tuples(st.integers(0, 20_000), st.sampled_from(b"\r\n-:;\"=ABz0+/ \t\x00\xff")), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 20_000)))
def test_mutated_mime_never_crashes(pki: Pki, mime_samples: list[bytes], index: int, edits: list[tuple[int, int]], cut: int | None) -> None:
    raw = _mutate(mime_samples[index], edits, cut)
    result = incoming(pki, raw, keys=[pki.bob.recipient_key()])
    assert result.summary.startswith("smime=") and "\n" not in result.summary

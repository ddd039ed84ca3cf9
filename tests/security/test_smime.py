"""The S/MIME pipeline on its own: wrapping, unwrapping, headers and results."""

from __future__ import annotations

import base64

import pytest

from gateway.security import smime
from gateway.security.cms import ContentCipher, KeyTransport, content_type_of
from tests.security.smime_pki import NOW, Pki, build_pki

MESSAGE = (
    b"Return-Path: <alice@clinic.example>\n"
    b"From: \"Dr Alice\" <Alice@Clinic.Example>\n"
    b"To: bob@hospital.example, carol@lab.example\n"
    b"Subject: =?utf-8?q?R=C3=A9sultats?=\n"
    b"Date: Mon, 02 Jun 2025 10:00:00 +0200\n"
    b"Message-ID: <lf-1@clinic.example>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: multipart/mixed; boundary=\"mix\"\n"
    b"\n"
    b"--mix\n"
    b"Content-Type: text/plain; charset=us-ascii\n"
    b"\n"
    b"See attached.\n"
    b"--mix\n"
    b"Content-Type: application/pdf; name=cr.pdf\n"
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    b"JVBERi0xLjQK\n"
    b"--mix--\n"
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return build_pki()


def test_outer_headers_stay_outside_and_content_headers_go_inside(pki: Pki) -> None:
    signed = smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity())
    outer = smime.parse_entity(signed)
    assert [f.name for f in outer.fields] == [
        "Return-Path", "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
    assert outer.content_type()[0] == "multipart/signed"
    assert outer.param("micalg") == "sha-256" and outer.param("protocol") == "application/pkcs7-signature"
    content, _ = smime.split_multipart(outer)
    assert content.startswith(b'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n--mix\r\n')
    assert b"\n" not in content.replace(b"\r\n", b"")  # canonical CRLF throughout


@pytest.mark.parametrize("digest,micalg", [("sha384", "sha-384"), ("sha512", "sha-512")])
def test_micalg_names_the_digest(pki: Pki, digest: str, micalg: str) -> None:
    signed = smime.process_outgoing(MESSAGE, sign_with=pki.bob.identity(), options=smime.OutgoingOptions(digest=digest))
    assert smime.parse_entity(signed).param("micalg") == micalg


def test_round_trip_recovers_the_message_with_case_insensitive_from(pki: Pki) -> None:
    sealed = smime.process_outgoing(MESSAGE, sign_with=pki.alice.identity(), encrypt_to=[pki.bob.certificate, pki.carol.certificate])
    result = smime.process_incoming(sealed, keys=[pki.carol.recipient_key()], trust_anchors=pki.anchors, now=NOW)
    assert result.status is smime.SmimeStatus.PASS, result.reasons
    assert result.signer_matches_from is True and result.from_address == "Alice@Clinic.Example"
    assert result.decryption is not None and result.decryption.recipient == pki.carol.certificate
    recovered = smime.parse_entity(result.content)
    assert recovered.header("Message-ID") == "<lf-1@clinic.example>"
    assert recovered.content_type()[0] == "multipart/mixed"
    assert recovered.body == smime.canonicalize(MESSAGE.split(b"\n\n", 1)[1])


def test_sender_can_read_their_sent_copy(pki: Pki) -> None:
    sealed = smime.process_outgoing(MESSAGE, encrypt_to=[pki.bob.certificate], sender_certificate=pki.alice.certificate)
    mine = smime.process_incoming(sealed, keys=[pki.alice.recipient_key()], now=NOW)
    assert mine.decryption is not None and mine.decryption.decrypted
    without = smime.process_outgoing(MESSAGE, encrypt_to=[pki.bob.certificate])
    assert smime.process_incoming(without, keys=[pki.alice.recipient_key()], now=NOW).status is smime.SmimeStatus.NEUTRAL


@pytest.mark.parametrize("cipher,smime_type,content_type", [
    (ContentCipher.AES256_CBC, "enveloped-data", "enveloped_data"),
    (ContentCipher.AES128_GCM, "authEnveloped-data", "authenticated_enveloped_data"),
])
def test_envelope_mime_type(pki: Pki, cipher: ContentCipher, smime_type: str, content_type: str) -> None:
    sealed = smime.process_outgoing(MESSAGE, encrypt_to=[pki.bob.certificate],
                                    options=smime.OutgoingOptions(cipher=cipher, key_transport=KeyTransport.OAEP))
    outer = smime.parse_entity(sealed)
    assert outer.content_type()[0] == "application/pkcs7-mime" and outer.param("smime-type") == smime_type
    assert content_type_of(smime.decode_body(outer)) == content_type


def test_eight_bit_text_is_transfer_encoded_before_signing(pki: Pki) -> None:
    raw = b"From: alice@clinic.example\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nh\xc3\xa9matie\r\n"
    signed = smime.process_outgoing(raw, sign_with=pki.alice.identity())
    content, _ = smime.split_multipart(smime.parse_entity(signed))
    inner = smime.parse_entity(content)
    assert inner.header("Content-Transfer-Encoding") == "base64"
    assert base64.b64decode(inner.body) == b"h\xc3\xa9matie\r\n"
    assert all(byte < 128 for byte in signed)


def test_opaque_signed_then_encrypted_nesting(pki: Pki) -> None:
    sealed = smime.process_outgoing(MESSAGE, sign_with=pki.carol.identity(), encrypt_to=[pki.bob.certificate],
                                    options=smime.OutgoingOptions(detached=False))
    forged_from = sealed.replace(b'"Dr Alice" <Alice@Clinic.Example>', b"carol@lab.example")
    result = smime.process_incoming(forged_from, keys=[pki.bob.recipient_key()], trust_anchors=pki.anchors, now=NOW)
    assert result.status is smime.SmimeStatus.PASS, result.reasons
    assert result.signature is not None and result.signature.signature_algorithm == "sha256_ecdsa"
    assert result.summary == "smime=pass header.from=carol@lab.example body.smime-identifier=carol@lab.example"


def test_nothing_to_do_returns_the_message_unchanged() -> None:
    assert smime.process_outgoing(MESSAGE) == MESSAGE


def test_summary_comment_cannot_break_the_header(pki: Pki) -> None:
    raw = MESSAGE.replace(b'"Dr Alice" <Alice@Clinic.Example>', b"eve@clinic.example")
    result = smime.process_incoming(smime.process_outgoing(raw, sign_with=pki.alice.identity()),
                                    trust_anchors=pki.anchors, now=NOW)
    assert result.status is smime.SmimeStatus.POLICY
    comment = result.summary.split("(", 1)[1].rsplit(")", 1)[0]
    assert "(" not in comment and ")" not in comment and "\n" not in result.summary

"""The SASL decoders shared by SMTP AUTH and IMAP AUTHENTICATE."""

from __future__ import annotations

import pytest

from gateway.security import sasl


def test_plain_with_and_without_authzid() -> None:
    assert sasl.decode_plain(b"\x00doc@x\x00s3cret") == sasl.PlainResponse("", "doc@x", "s3cret")
    acting = sasl.decode_plain(b"boss@x\x00doc@x\x00pw")
    assert acting.authzid_differs() and not sasl.decode_plain(b"DOC@x\x00doc@x\x00pw").authzid_differs()


@pytest.mark.parametrize("message", [b"doc@x\x00pw", b"\x00\x00pw", b"a\x00b\x00c\x00d", b""])
def test_malformed_plain_is_refused(message: bytes) -> None:
    with pytest.raises(sasl.SaslMalformed):
        sasl.decode_plain(message)


def test_utf8_and_invalid_bytes_in_plain() -> None:
    decoded = sasl.decode_plain("\x00médecin@x\x00mot de passe é".encode() + b"\xff")
    assert decoded.authcid == "médecin@x" and decoded.password.endswith("é\ufffd")


def test_bearer_mechanisms() -> None:
    assert sasl.decode_oauthbearer(b"n,a=doc=2Cx@y,\x01host=gw\x01auth=Bearer tok.en\x01\x01") == \
        sasl.BearerResponse("doc,x@y", "tok.en")
    assert sasl.decode_xoauth2(b"user=doc@x\x01auth=Bearer abc\x01\x01") == sasl.BearerResponse("doc@x", "abc")
    assert sasl.decode_xoauth2(b"user=doc@x\x01auth=Basic abc\x01\x01").token == ""


def test_external_is_the_authzid() -> None:
    assert sasl.decode_external(b"") == "" and sasl.decode_external(b" lab@x ") == "lab@x"

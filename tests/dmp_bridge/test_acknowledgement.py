"""The MDN's machine-readable part: RFC 8098 fields in US-ASCII, RFC 6533 only for UTF-8 addresses."""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser

from gateway.dmp_bridge.acknowledgement import DeliveredMessage, Failure, build_mdn, to_ascii
from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.filing import FilingReport

LAB = "labo@labo-test.mssante.fr"


def delivered(recipient: str) -> DeliveredMessage:
    original = EmailMessage()
    original["Return-Path"] = f"<{LAB}>"
    original["From"] = LAB
    original["To"] = recipient
    original["Subject"] = "XDM/1.0/DDM+Compte rendu"
    original["Message-ID"] = "<m1@labo-test.mssante.fr>"
    original["Disposition-Notification-To"] = LAB
    original.set_content("compte rendu")
    raw = original.as_bytes(policy=policy.SMTPUTF8)
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return DeliveredMessage(job_id=1, delivery_key="q1:1", recipient=recipient, message=parsed, raw=raw)


def disposition_part(mdn: bytes) -> tuple[str, bytes]:
    """(content type, raw body) of the MDN's second part, read from the bytes as a client would."""
    message = email.message_from_bytes(mdn, policy=policy.default)
    boundary = message.get_boundary()
    assert boundary is not None
    second = mdn.split(f"--{boundary}".encode())[2]
    head, _, body = second.lstrip(b"\r\n").partition(b"\r\n\r\n")
    content_type = BytesHeaderParser(policy=policy.default).parsebytes(head + b"\r\n\r\n").get_content_type()
    return content_type, body


def fields_of(body: bytes, encoding: str) -> dict[str, str]:
    block = BytesHeaderParser(policy=policy.default).parsebytes(body.decode(encoding).encode("utf-8"))
    return {name: " ".join(str(value).split()) for name, value in block.items()}


def test_failure_fields_are_ascii_in_a_message_disposition_notification() -> None:
    failure = Failure(IntegrationCode.INS_MISMATCH, "the INS key is wrong")
    assert not IntegrationCode.INS_MISMATCH.label.isascii()  # "identité": the case this is about
    mdn = build_mdn(delivered("dr.martin@demo.mssante.localhost"), failure, FilingReport(()), "mx.demo.mssante.localhost")
    content_type, body = disposition_part(mdn)
    assert content_type == "message/disposition-notification"
    assert body.isascii()
    fields = fields_of(body, "ascii")
    assert fields["Disposition"] == ("automatic-action/MDN-sent-automatically; "
                                     "processed/Error: 904^INS ou traits d'identite ne correspondent pas")
    assert fields["Error"] == "904^INS ou traits d'identite ne correspondent pas"
    assert fields["Final-Recipient"] == "rfc822;dr.martin@demo.mssante.localhost"
    assert fields["Original-Message-ID"] == "<m1@labo-test.mssante.fr>"
    # The human part keeps the label as the CI-SIS table spells it.
    human = email.message_from_bytes(mdn, policy=policy.default)
    text = next(p for p in human.walk() if p.get_content_type() == "text/plain")
    assert "904^INS ou traits d'identité ne correspondent pas" in text.get_content()  # type: ignore[attr-defined]


def test_success_is_plain_processed() -> None:
    content_type, body = disposition_part(build_mdn(delivered("dr.martin@demo.mssante.localhost"), None,
                                                    FilingReport(()), "mx.demo.mssante.localhost"))
    assert content_type == "message/disposition-notification"
    fields = fields_of(body, "ascii")
    assert fields["Disposition"] == "automatic-action/MDN-sent-automatically; processed" and "Error" not in fields


def test_utf8_address_gives_a_global_disposition_notification() -> None:
    recipient = "hélène.lefèvre@demo.mssante.localhost"
    failure = Failure(IntegrationCode.INS_INCOMPLETE, "traits missing")
    content_type, body = disposition_part(build_mdn(delivered(recipient), failure, FilingReport(()),
                                                    "mx.demo.mssante.localhost"))
    assert content_type == "message/global-disposition-notification"  # RFC 6533 6
    fields = fields_of(body, "utf-8")
    assert fields["Final-Recipient"] == f"utf-8;{recipient}"
    assert fields["Error"] == "905^INS incomplet (traits d'identité manquants)"


def test_to_ascii() -> None:
    assert to_ascii("Mauvaise version du document à remplacer") == "Mauvaise version du document a remplacer"
    assert to_ascii("Œuvre d’art") == "OEuvre d'art"

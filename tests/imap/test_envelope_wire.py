"""The ENVELOPE a sealed store keeps rendered at delivery (RFC 3501 7.4.2) is, octet for octet, the one a FETCH
renders from the message's header, with and without UTF8=ACCEPT (RFC 6855 3) where it is used."""

from __future__ import annotations

import pytest

from gateway.imap.protocol.envelope import EnvelopeWriter, render_envelope, usable_wire
from gateway.imap.protocol.structure import format_envelope, parse_message
from gateway.mailstore.headers import header_section, parse_headers

HEADERS = [
    # group syntax (RFC 5322 3.4): group markers around the members, an empty group
    "From: Dr A <a@x.org>\r\nTo: group: g1@d1.org, g2@d2.org;, undisclosed:;\r\nSubject: s\r\n",
    # encoded words stay encoded (RFC 3501 7.4.2), quoted specials escaped
    ('From: =?UTF-8?Q?Caf=C3=A9?= <c@x.org>\r\nSubject: =?ISO-8859-1?Q?R=E9sum=E9?= "q" \\ b\r\n'
     "Message-ID: <1@x>\r\nIn-Reply-To: <0@x>\r\nDate: Fri, 17 May 2024 09:30:00 +0200\r\n"),
    # Sender and Reply-To absent: From's; Cc and Bcc present; quoted local part, display name with a comma
    'From: "Martin, Dr" <"j doe"@x.org>\r\nCc: c@y.org\r\nBcc: b@y.org\r\nReply-To: r@z.org\r\n',
    # raw UTF-8 (RFC 6532): a literal without UTF8=ACCEPT, a quoted string with it
    "From: Hélène <h@x.org>\r\nSubject: Compte rendu échographie\r\n",
    # an 8-bit octet that is not UTF-8, a line break inside a value: literals in every mode
    "From: a@x.org\r\nSubject: caf\xe9\r\n",
    # a long subject: beyond the quoted-string limit, a literal
    "From: a@x.org\r\nSubject: " + "x" * 5000 + "\r\n",
    # nothing at all of the envelope's fields
    "X-Other: 1\r\n",
]


def _message(header: str) -> bytes:
    return header.encode("utf-8", "surrogateescape").replace(b"caf\xc3\xa9\r\n", b"caf\xe9\r\n") + b"\r\nbody\r\n"


@pytest.mark.parametrize("header", HEADERS)
def test_stored_rendering_is_the_fetch_rendering(header: str) -> None:
    raw = _message(header)
    cached = parse_headers(header_section(raw))
    wire = cached.envelope_wire()
    parsed = parse_message(raw)
    assert wire == format_envelope(parsed, utf8=False) == render_envelope(cached.envelope)
    with_utf8 = format_envelope(parsed, utf8=True)
    assert EnvelopeWriter(utf8=True).envelope(cached.envelope) == with_utf8
    if usable_wire(wire, utf8=True):
        assert wire == with_utf8        # used as is for a UTF8=ACCEPT session only when it is the same octets


def test_non_ascii_rendering_is_not_used_with_utf8_accept() -> None:
    wire = parse_headers(header_section(_message(HEADERS[3]))).envelope_wire()
    assert not usable_wire(wire, utf8=True) and usable_wire(wire, utf8=False)

"""``raw_fields`` (the header section's fields, as delivery and APPEND cache them) lists exactly what the email
package's header parser (``BytesHeaderParser``, policy compat32) lists, on any octets: fields, folded lines,
continuations before any field, Unix ``From `` lines anywhere, empty names, lines that end the section, CR,
LF and CRLF mixed, 8-bit octets. ``parse_headers`` built on it gives what it gave on the email package's."""

from __future__ import annotations

import email.parser
import email.policy
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mailstore import headers
from gateway.mailstore.headers import parse_headers, raw_fields


def _reference(section: bytes) -> list[tuple[str, str]]:
    return list(email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(section).raw_items())


_ENDINGS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b""])
_NAMES = st.sampled_from([b"Subject", b"From", b"To", b"Cc", b"Date", b"Message-ID", b"Sender", b"Reply-To",
                          b"In-Reply-To", b"X-Mixed", b"", b"Bad Name", b"\xc3\xa9t\xc3\xa9", b"From ", b"A:B"])
_VALUES = st.one_of(
    st.sampled_from([b" hello", b"   spaced  ", b"\tTabbed", b" =?utf-8?q?Caf=C3=A9?=", b" Caf\xc3\xa9 cr\xe8me",
                     b" <a@b.example>", b" \"Dr. X\" <x@y.example>, z@w.example", b" Fri, 04 Dec 2026 12:00:00 +0000",
                     b" undisclosed:;", b"", b":", b" a: b"]),
    st.binary(max_size=24))
_FIELD = st.builds(lambda name, value, ending: name + b":" + value + ending, _NAMES, _VALUES, _ENDINGS)
_OTHER = st.one_of(
    st.builds(lambda lead, text, ending: lead + text + ending, st.sampled_from([b" ", b"\t", b"From ", b""]),
              st.binary(max_size=20), _ENDINGS),
    st.sampled_from([b"\r\n", b"\n", b"\r", b"From someone Fri Dec  4 12:00:00 2026\n", b" folded on\r\n"]))
SECTIONS = st.lists(st.one_of(_FIELD, _FIELD, _OTHER), max_size=14).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(SECTIONS)
def test_raw_fields_are_the_email_packages(section: bytes) -> None:
    assert raw_fields(section) == _reference(section)


@settings(max_examples=500, deadline=None)
@given(SECTIONS)
def test_parse_headers_is_unchanged(section: bytes) -> None:
    fast = parse_headers(section)
    with mock.patch.object(headers, "raw_fields", _reference):
        assert parse_headers(section) == fast


def test_a_usual_header_section() -> None:
    section = (b"From nobody Fri Dec  4 12:00:00 2026\r\nReturn-Path: <a@b.example>\r\nReceived: from x\r\n\tby y;"
               b" Fri, 04 Dec 2026 12:00:00 +0000\r\nSubject:  =?utf-8?q?Caf=C3=A9?=\r\n continued\r\n"
               b"From: \"Dr A\" <a@b.example>\r\n\r\nFrom: body\r\n")
    assert raw_fields(section) == _reference(section) == [
        ("Return-Path", "<a@b.example>"), ("Received", "from x\r\n\tby y; Fri, 04 Dec 2026 12:00:00 +0000"),
        ("Subject", "=?utf-8?q?Caf=C3=A9?=\r\n continued"), ("From", "\"Dr A\" <a@b.example>")]

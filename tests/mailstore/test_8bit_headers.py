"""Header fields with raw 8-bit octets (RFC 6532 UTF-8, or legacy bytes that are no valid UTF-8).

The decision, measured against Dovecot 2.3 on the reference server (APPEND, then FETCH ENVELOPE and SEARCH):
the ENVELOPE carries the octets exactly as received, as Dovecot sends them (a literal: neither side may
guess a charset for the client). What SEARCH compares (the cached subject and address columns, and any other
HEADER field) is text: UTF-8 where the octets are valid UTF-8 (RFC 6532 3.2), and each octet that is not part
of valid UTF-8 read as ISO-8859-1 (the legacy charset of 8-bit French mail), never U+FFFD. Dovecot replaces
them by U+FFFD (SEARCH SUBJECT "Café" misses "Caf\\xe9", SEARCH SUBJECT "\\ufffd" finds it); before this the
gateway replaced *every* 8-bit octet, valid UTF-8 included, so an RFC 6532 subject "Café" was not found.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mailstore.headers import octets_text, parse_headers

DATE = b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
# A field body's octets: anything but CR, LF and NUL (RFC 5322 2.2 / RFC 6532 3.2), no leading blank.
FIELD_OCTETS = st.binary(min_size=1, max_size=60).map(
    lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip(b" \t")).filter(bool)
UTF8_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffd"),
                    min_size=1, max_size=30).map(str.strip).filter(lambda text: text and "=?" not in text)


def section(subject: bytes, sender: bytes = b"jose@example.org") -> bytes:
    return b"From: " + sender + b"\r\nSubject: " + subject + b"\r\n" + DATE + b"\r\n"


def test_latin1_and_utf8_and_invalid_octets_are_all_text() -> None:
    cached = parse_headers(section(b"Caf\xe9 latin \xc3\xa9utf8 bad\xff\xfe end", b"Jos\xe9 <jose@example.org>"))
    assert cached.subject == "Café latin éutf8 badÿþ end"
    assert cached.from_addr is not None and "José <jose@example.org>" in cached.from_addr
    # The ENVELOPE keeps the octets exactly (as Dovecot's): the client chooses how to show them.
    assert b"Caf\xe9 latin \xc3\xa9utf8 bad\xff\xfe end" in cached.envelope_wire()
    assert b"Jos\xe9" in cached.envelope_wire()


def test_rfc6532_utf8_fields_are_their_text() -> None:
    cached = parse_headers(section("Résultats d'analyse – glycémie".encode(), "Renée <renee@example.org>".encode()))
    assert cached.subject == "Résultats d'analyse – glycémie"
    assert cached.from_addr is not None and cached.from_addr.startswith("Renée <renee@example.org>")


@settings(max_examples=300, deadline=None)
@given(FIELD_OCTETS)
def test_no_octet_becomes_a_replacement_character(subject: bytes) -> None:
    cached = parse_headers(section(subject))
    assert cached.subject is not None
    if "\ufffd".encode() not in subject and b"=?" not in subject:
        assert "\ufffd" not in cached.subject, (subject, cached.subject)
        # Every octet is accounted for: valid UTF-8 runs as themselves, the others one character each.
        assert cached.subject == octets_text(subject.decode("ascii", "surrogateescape")).strip(" \t")
    quoted = subject.replace(b"\\", b"\\\\").replace(b'"', b'\\"')      # RFC 3501 9 quoted, if not a literal
    assert subject in cached.envelope_wire() or quoted in cached.envelope_wire()  # the octets, exactly


@settings(max_examples=200, deadline=None)
@given(UTF8_TEXT)
def test_valid_utf8_reads_back_unchanged(text: str) -> None:
    cached = parse_headers(section(text.encode()))
    assert cached.subject == text


@given(st.binary(max_size=40))
def test_octets_text_is_utf8_where_valid_and_latin1_elsewhere(octets: bytes) -> None:
    text = octets_text(octets.decode("ascii", "surrogateescape"))
    assert not any("\udc80" <= char <= "\udcff" for char in text)       # no octet left undecoded
    try:
        assert text == octets.decode("utf-8")
    except UnicodeDecodeError:
        assert len(text) <= len(octets) and text.encode("utf-8") != octets


def test_8bit_text_beside_encoded_words_is_decoded_with_them() -> None:
    """RFC 2047 encoded words next to raw 8-bit text: both decoded (the email package's make_header refused
    the whole field, which was then searched undecoded)."""
    cached = parse_headers(section(b"Jos\xe9 =?iso-8859-1?q?Caf=E9?= \xc3\xa9t\xc3\xa9",
                                   b"Jos\xe9 =?utf-8?q?Ren=C3=A9e?= <a@example.org>"))
    assert cached.subject == "José Café été"
    assert cached.from_addr is not None and cached.from_addr.startswith("José Renée <a@example.org>")

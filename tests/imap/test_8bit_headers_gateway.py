"""A message whose header holds raw 8-bit octets, APPENDed to a running ``gateway serve``: the ENVELOPE
answers the octets exactly (as Dovecot does) and SEARCH finds its words, RFC 6532 UTF-8 and legacy Latin-1
alike (tests/mailstore/test_8bit_headers.py says why)."""

from __future__ import annotations

import imaplib
from collections.abc import Iterator

import pytest

from tests.harness import GatewayProcess

MESSAGE = (b"From: Jos\xe9 Mart\xedn <jose@example.org>\r\nTo: Ren\xc3\xa9e <renee@example.org>\r\n"
           b"Subject: Caf\xe9 latin \xc3\xa9utf8 bad\xff\xfe end\r\nDate: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
           b"Message-ID: <env8bit@example.org>\r\n\r\nbody\r\n")


@pytest.fixture(scope="module")
def imap(shared_gateway: GatewayProcess) -> Iterator[imaplib.IMAP4_SSL]:
    client = shared_gateway.imaps_login("PER", 0)
    typ, data = client.append("INBOX", None, None, MESSAGE)
    assert typ == "OK", data
    client.select("INBOX")
    yield client
    client.logout()


def search(client: imaplib.IMAP4_SSL, key: str, text: str) -> list[bytes]:
    client.literal = text.encode()                                        # type: ignore[attr-defined]
    typ, data = client.uid("SEARCH", "CHARSET", "UTF-8", *key.split())
    assert typ == "OK", data
    return (data[0] or b"").split()


def test_the_envelope_carries_the_octets_as_received(imap: imaplib.IMAP4_SSL) -> None:
    typ, data = imap.uid("FETCH", "1:*", "(ENVELOPE)")
    assert typ == "OK", data
    wire = b"".join(part if isinstance(part, bytes) else b"".join(part) for part in data)
    assert b"Caf\xe9 latin \xc3\xa9utf8 bad\xff\xfe end" in wire and b"Jos\xe9 Mart\xedn" in wire
    assert "\ufffd".encode() not in wire


@pytest.mark.parametrize(("key", "text"), [
    ("SUBJECT", "Café"),          # Latin-1 octet
    ("SUBJECT", "éutf8"),         # RFC 6532 UTF-8 beside it
    ("SUBJECT", "badÿþ"),         # octets no charset makes sense of, read as Latin-1
    ("FROM", "José Martín"),
    ("TO", "Renée"),
    ("HEADER Subject", "Café"),   # the uncached HEADER path
])
def test_search_finds_the_words_of_8bit_fields(imap: imaplib.IMAP4_SSL, key: str, text: str) -> None:
    assert search(imap, key, text), (key, text)


def test_no_replacement_character_was_stored(imap: imaplib.IMAP4_SSL) -> None:
    assert search(imap, "SUBJECT", "\ufffd") == [] and search(imap, "FROM", "\ufffd") == []

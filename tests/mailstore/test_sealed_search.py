"""SEARCH on sealed header columns unseals only what the key names, and answers as the clear store does."""

from __future__ import annotations

import datetime as dt

from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.interface import (
    INBOX, All, AnyOf, BodyContains, DateBefore, DateField, DateOn, DateSince, FolderRef, Header, Not, SearchKey,
)
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.security.at_rest import FieldSealer, HeaderSealer
from gateway.security.keys import KeyManager
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from tests.mailstore.conftest import MakeMailbox
from tests.mailstore.test_store import message

KEYS = [
    Header("FROM", "martin"),
    Header("SUBJECT", "rendu 2"),
    Not(Header("SUBJECT", "rendu 2")),
    AnyOf([Header("SUBJECT", "rendu 1"), Header("TO", "nobody")]),
    All([Header("FROM", "dr"), Not(Header("SUBJECT", "x")), BodyContains("Bonjour 3", False)]),
    Header("Message-ID", "<4@"),
    Header("X-Unknown", ""),
    Not(Header("CC", "x")),  # no message has a Cc: RFC 3501 6.4.4 NOT matches them all (SQL NULL must not hide them)
]


async def test_sealed_and_clear_stores_answer_alike(database: Database, blobs: BlobStore, keys: KeyManager,
                                                    make_mailbox: MakeMailbox) -> None:
    clear = SqlMailStore(database, blobs, ChangeHub())
    sealed = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    answers = []
    for store in (clear, sealed):
        box = await make_mailbox()
        await LocalDelivery(store).provision(box)
        for n in range(6):
            await store.append(FolderRef(box, INBOX), message(n))
        answers.append([await store.search(FolderRef(box, INBOX), key) for key in KEYS])
    assert answers[0] == answers[1]
    assert answers[0][-1] == answers[1][-1] == [1, 2, 3, 4, 5, 6]
    assert answers[1][0] == [1, 2, 3, 4, 5, 6] and answers[1][1] == [3] and answers[1][4] == [4]


# RFC 3501 6.4.4: FROM/TO/CC/BCC match every address form (display name, RFC 2047 encoded words, quoted
# local part, group name and members, comment); dates: SENT* use the Date field's own day.
ADDRESS_FORMS = [
    ("jean@example.org", "Tue, 1 Jul 2025 23:30:00 -0500"),
    ("Jean Dupont <jean@example.org>", "Wed, 2 Jul 2025 00:30:00 +0200"),
    ('"Dupont, Jean" <jean@example.org>', "Wed, 2 Jul 2025 12:00:00 +0000"),
    ("=?UTF-8?Q?Jean_Dupont=C3=A9?= <jean@example.org>", "Thu, 3 Jul 2025 10:00:00 +0000"),
    ('"jean"@example.org', "Thu, 3 Jul 2025 10:00:00 +0000"),
    ("Equipe soins: jean@example.org, autre@example.org;", "Thu, 3 Jul 2025 10:00:00 +0000"),
    ("jean@example.org (Jean Dupont)", "Thu, 3 Jul 2025 10:00:00 +0000"),
    ("=?ISO-8859-1?Q?Andr=E9?= <andre@example.org>", "Thu, 3 Jul 2025 23:59:59 -1200"),
]
ADDRESS_KEYS: list[tuple[SearchKey, list[int]]] = [
    (Header("FROM", "jean@example.org"), [1, 2, 3, 4, 5, 6, 7]),
    (Header("FROM", "dupont"), [2, 3, 4, 7]),
    (Header("FROM", "DUPONTÉ"), [4]),
    (Header("FROM", "andré"), [8]),
    (Header("FROM", "Equipe Soins"), [6]),
    (Header("TO", "jean@example.org"), [1, 2, 3, 4, 5, 6, 7]),
    (Header("CC", "équipe"), []),
    (Header("BCC", "autre@example.org"), [6]),
    (Not(Header("BCC", "jean@example.org")), [8]),
    (DateOn(DateField.SENT, dt.date(2025, 7, 1)), [1]),
    (DateOn(DateField.SENT, dt.date(2025, 7, 2)), [2, 3]),
    (DateBefore(DateField.SENT, dt.date(2025, 7, 2)), [1]),
    (All([DateSince(DateField.SENT, dt.date(2025, 7, 3)), Header("FROM", "jean")]), [4, 5, 6, 7]),
]


def address_message(number: int, address: str, date: str) -> bytes:
    return (f"From: {address}\r\nTo: {address}\r\nBcc: {address}\r\nSubject: {number}\r\nDate: {date}\r\n"
            f"\r\nBonjour\r\n").encode()


async def test_every_address_form_and_sent_day_alike_sealed_or_clear(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    clear = SqlMailStore(database, blobs, ChangeHub())
    sealed = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    for store in (clear, sealed):
        box = await make_mailbox()
        await LocalDelivery(store).provision(box)
        for number, (address, date) in enumerate(ADDRESS_FORMS, 1):
            await store.append(FolderRef(box, INBOX), address_message(number, address, date))
        for key, expected in ADDRESS_KEYS:
            assert await store.search(FolderRef(box, INBOX), key) == expected, (store.headers, key)

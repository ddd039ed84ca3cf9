"""SEARCH on sealed header columns unseals only what the key names, and answers as the clear store does."""

from __future__ import annotations

from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.interface import INBOX, All, AnyOf, BodyContains, FolderRef, Header, Not
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

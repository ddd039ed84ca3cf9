"""Local delivery, provisioning, quota, search, change notifications, no plaintext on disk."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
from pathlib import Path

import pytest

from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.errors import MailboxNotHosted, QuotaExceeded
from gateway.mailstore.interface import (
    INBOX,
    All,
    AnyOf,
    BodyContains,
    DateField,
    DateSince,
    FolderRef,
    HasFlag,
    Header,
    Larger,
    Not,
    StoreMode,
    UidIn,
    UidSet,
)
from gateway.mailstore.notify import ChangeHub, ChangeKind
from gateway.mailstore.sql import SqlMailStore
from gateway.storage.db import Database
from tests.mailstore.conftest import MakeMailbox, stored_bodies
from tests.mailstore.test_store import message


async def test_provision_creates_six_special_use_folders_all_subscribed(
        store: SqlMailStore, delivery: LocalDelivery, make_mailbox: MakeMailbox) -> None:
    box = await make_mailbox()
    await delivery.provision(box)
    await delivery.provision(box)  # idempotent
    folders = {info.name: info for info in await store.list_folders(box)}
    assert {name: info.special_use for name, info in folders.items()} == {
        "INBOX": None, "Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk",
        "Archive": "\\Archive"}
    assert all(info.subscribed for info in folders.values())


async def test_same_delivery_key_twice_files_one_message(store: SqlMailStore, delivery: LocalDelivery,
                                                         mailbox_id: int) -> None:
    first = await delivery.deliver(mailbox_id, message(1), delivery_key="queue-42:doc@demo")
    again = await delivery.deliver(mailbox_id, message(1), delivery_key="queue-42:doc@demo")
    assert not first.duplicate and again.duplicate and (again.uid, again.uidvalidity) == (first.uid, first.uidvalidity)
    racing = await asyncio.gather(*(delivery.deliver(mailbox_id, message(2), delivery_key="queue-43:doc@demo")
                                    for _ in range(5)))
    assert sum(not result.duplicate for result in racing) == 1
    assert (await store.status(FolderRef(mailbox_id, INBOX))).messages == 2


async def test_first_delivery_provisions_and_missing_folder_falls_back_to_inbox(
        store: SqlMailStore, delivery: LocalDelivery, make_mailbox: MakeMailbox) -> None:
    box = await make_mailbox()
    result = await delivery.deliver(box, io.BytesIO(message(1)), delivery_key="k1", folder="Nulle/Part")
    assert result.folder == INBOX and result.uid == 1
    assert len(await store.list_folders(box)) == 6


async def test_quota_exceeded_is_typed_and_leaves_no_blob(store: SqlMailStore, delivery: LocalDelivery,
                                                          make_mailbox: MakeMailbox, data_dir: Path,
                                                          database: Database) -> None:
    box = await make_mailbox(quota_bytes=4096)
    await delivery.provision(box)
    await delivery.deliver(box, b"Subject: small\r\n\r\n" + b"x" * 3000, delivery_key="a")
    with pytest.raises(QuotaExceeded) as refused:
        await delivery.deliver(box, b"Subject: big\r\n\r\n" + b"x" * 3000, delivery_key="b")
    assert refused.value.imap_code == "OVERQUOTA"
    usage = await store.quota(box)
    assert usage.messages == 1 and usage.storage_kib == 3 and usage.storage_limit_kib == 4
    assert await stored_bodies(database, data_dir) == 1


async def test_unknown_mailbox_is_refused(delivery: LocalDelivery) -> None:
    with pytest.raises(MailboxNotHosted):
        await delivery.deliver(999_999, message(1), delivery_key="x")


async def test_large_message_streams_from_a_spool_file(store: SqlMailStore, delivery: LocalDelivery,
                                                       mailbox_id: int, tmp_path: Path) -> None:
    spool = tmp_path / "spool.eml"
    with open(spool, "wb") as file:
        file.write(b"Subject: IRM cerebrale\r\nMessage-ID: <big@demo>\r\n\r\n")
        for _ in range(8):
            file.write(b"A" * (1024 * 1024))
    result = await delivery.deliver(mailbox_id, spool, delivery_key="big")
    [meta] = await store.fetch(FolderRef(mailbox_id, INBOX), UidSet.of(result.uid))
    assert meta.size == spool.stat().st_size and meta.subject == "IRM cerebrale"


async def test_no_plaintext_on_disk_after_delivery(delivery: LocalDelivery, mailbox_id: int, data_dir: Path) -> None:
    await delivery.deliver(mailbox_id, message(1, subject="Resultat biopsie", body="adenocarcinome"),
                           delivery_key="secret")
    for path in (p for p in data_dir.parent.rglob("*") if p.is_file()):     # the SQLite files too
        assert b"adenocarcinome" not in path.read_bytes(), path


async def test_a_small_delivery_is_sealed_in_its_row_and_goes_with_the_last_reference(
        store: SqlMailStore, delivery: LocalDelivery, mailbox_id: int, data_dir: Path, database: Database) -> None:
    """A delivered message of a few KB writes no blob file: its sealed body is a row committed with the
    message (``inline_blobs``), read back byte for byte; a COPY shares it; it goes with the EXPUNGE of the
    last message referring to it, in that transaction."""
    raw = message(1, subject="Resultat biopsie", body="adenocarcinome")
    result = await delivery.deliver(mailbox_id, raw, delivery_key="q1:r1")
    inbox = FolderRef(mailbox_id, INBOX, result.uidvalidity)
    assert [p for p in (data_dir / "blobs").rglob("*") if p.is_file()] == []
    assert await stored_bodies(database, data_dir) == 1
    assert await store.message_bytes(inbox, result.uid) == raw
    async with await store.open_message(inbox, result.uid) as body:
        assert await body.read() == raw
    copied = await store.copy(inbox, UidSet.of((result.uid, result.uid)), FolderRef(mailbox_id, "Archive"))
    await store.store_flags(inbox, UidSet.of((result.uid, result.uid)), StoreMode.ADD, ["\\Deleted"])
    await store.expunge(inbox)
    assert await stored_bodies(database, data_dir) == 1                    # the copy still refers to it
    archive = FolderRef(mailbox_id, "Archive", copied.uidvalidity)
    [copy_uid] = copied.dest_uids
    assert await store.message_bytes(archive, copy_uid) == raw
    await store.store_flags(archive, UidSet.of((copy_uid, copy_uid)), StoreMode.ADD, ["\\Deleted"])
    await store.expunge(archive)
    assert await stored_bodies(database, data_dir) == 0


async def test_search_in_sql_and_by_body_scan(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await store.append(inbox, message(1, subject="Bilan sanguin", body="glycemie normale"))
    await store.append(inbox, message(2, subject="Radio thorax", body="pas d'anomalie"))
    await store.append(inbox, message(3, subject="Bilan hepatique", body="transaminases elevees"),
                       flags=["\\Seen", "NonJunk"])
    assert await store.search(inbox, Header("subject", "bilan")) == [1, 3]
    assert await store.search(inbox, Not(HasFlag("\\Seen"))) == [1, 2]
    assert await store.search(inbox, HasFlag("NonJunk")) == [3]
    assert await store.search(inbox, AnyOf((UidIn(UidSet.of(2)), HasFlag("\\Seen")))) == [2, 3]
    assert await store.search(inbox, All((Header("subject", "bilan"), BodyContains("TRANSAMINASES")))) == [3]
    assert await store.search(inbox, Not(BodyContains("anomalie"))) == [1, 3]
    assert await store.search(inbox, Header("X-Absent", "")) == []
    assert await store.search(inbox, DateSince(DateField.SENT, dt.date(2026, 11, 23))) == [1, 2, 3]
    assert await store.search(inbox, Larger(10_000)) == []
    assert await store.search(inbox, All(())) == [1, 2, 3]


async def test_changes_wake_a_subscribed_session(store: SqlMailStore, hub: ChangeHub, delivery: LocalDelivery,
                                                 mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    with hub.subscribe(mailbox_id, INBOX) as idle, hub.subscribe(mailbox_id, "Archive") as elsewhere:
        waiter = asyncio.create_task(idle.wait(timeout=30))
        await delivery.deliver(mailbox_id, message(1), delivery_key="wake")
        events = await waiter
        assert [event.kind for event in events] == [ChangeKind.EXISTS]
        await store.store_flags(inbox, UidSet.of(1), StoreMode.ADD, ["\\Seen"])
        assert [event.kind for event in await idle.wait(timeout=0)] == [ChangeKind.FLAGS]
        assert await elsewhere.wait(timeout=0) == []
    assert hub.subscriber_count() == 0


async def test_concurrent_first_deliveries_to_an_unprovisioned_mailbox(
        store: SqlMailStore, delivery: LocalDelivery, make_mailbox: MakeMailbox) -> None:
    box = await make_mailbox()
    results = await asyncio.gather(*(delivery.deliver(box, message(n), delivery_key=f"first-{n}") for n in range(4)))
    assert sorted(result.uid for result in results) == [1, 2, 3, 4]
    assert len(await store.list_folders(box)) == 6


async def test_local_delivery_runs_on_the_mail_store_interface_alone() -> None:
    """``LocalDelivery`` needs only ``MailStore`` (``add_message``, ``shares_commits``): the in-memory store
    delivers as the SQL one, idempotent per delivery key, a missing folder falling back to INBOX."""
    from gateway.mailstore.memory import MemoryMailStore

    store = MemoryMailStore()
    delivery = LocalDelivery(store)
    assert delivery.shares_commits is False           # no group commit: recipients delivered one by one
    await delivery.provision(7)
    raw = b"From: a@example.org\r\nSubject: Compte rendu\r\n\r\nBonjour\r\n"
    first = await delivery.deliver(7, raw, delivery_key="q1:1", folder="Nowhere")
    again = await delivery.deliver(7, raw, delivery_key="q1:1")
    assert (first.folder, first.uid, first.duplicate) == (INBOX, 1, False)
    assert (again.uid, again.duplicate) == (1, True)
    assert [meta.uid for meta in await store.fetch(FolderRef(7, INBOX), UidSet.of((1, 10)))] == [1]

"""The mail store on SQLite and PostgreSQL, and in memory: UIDs, UIDVALIDITY, MODSEQ, flags, COPY/MOVE, EXPUNGE, \\Recent, rename."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from gateway.mailstore.errors import (
    CannotDeleteInbox,
    FolderExists,
    FolderHasChildren,
    FolderNotFound,
    InvalidFolderName,
    MessageNotFound,
    UidValidityChanged,
)
from gateway.mailstore.interface import INBOX, FolderRef, StoreMode, UidSet
from gateway.mailstore.memory import MemoryMailStore
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database


@pytest.fixture(params=["sql", "memory"])
def store(request: pytest.FixtureRequest, database: Database, blobs: BlobStore, hub: ChangeHub) -> SqlMailStore:
    """Both implementations of the MailStore interface must keep its invariants (the memory one serves the
    protocol tests); the memory store gets the quota ``make_mailbox`` gives by default."""
    if request.param == "memory":
        return MemoryMailStore(hub, quota_bytes=10 * 1024 * 1024)  # type: ignore[return-value]
    return SqlMailStore(database, blobs, hub)


def message(number: int, subject: str = "Compte rendu", body: str = "Bonjour") -> bytes:
    return (f"From: Dr Martin <martin@demo.mssante.localhost>\r\nTo: patient@patient.mssante.localhost\r\n"
            f"Subject: {subject} {number}\r\nMessage-ID: <{number}@demo>\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n\r\n{body} {number}\r\n").encode()


async def fill(store: SqlMailStore, folder: FolderRef, count: int) -> list[int]:
    return [(await store.append(folder, message(n))).uid for n in range(count)]


async def test_uids_ascend_and_are_never_reused_after_expunge(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    first = await fill(store, inbox, 3)
    assert first == [1, 2, 3]
    await store.store_flags(inbox, UidSet.of(3), StoreMode.ADD, ["\\Deleted"])
    assert (await store.expunge(inbox)).uids == (3,)
    assert (await store.append(inbox, message(9))).uid == 4
    assert tuple((await store.select(inbox)).uids) == (1, 2, 4)


async def test_concurrent_appends_get_distinct_ascending_uids(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    results = await asyncio.gather(*(store.append(inbox, message(n)) for n in range(25)))
    uids = sorted(result.uid for result in results)
    assert uids == list(range(1, 26))
    modseqs = sorted(result.modseq for result in results)
    assert len(set(modseqs)) == 25
    snapshot = await store.select(inbox)
    assert tuple(snapshot.uids) == tuple(uids) and snapshot.uidnext == 26


async def test_uidvalidity_changes_when_a_folder_is_recreated(store: SqlMailStore, mailbox_id: int) -> None:
    created = await store.create_folder(mailbox_id, "Projets")
    await store.delete_folder(mailbox_id, "Projets")
    again = await store.create_folder(mailbox_id, "Projets")
    assert again.uidvalidity > created.uidvalidity
    with pytest.raises(UidValidityChanged):
        await store.fetch(FolderRef(mailbox_id, "Projets", created.uidvalidity), UidSet.of((1, 10)))


async def test_modseq_grows_on_flag_changes_and_unchanged_since_reports_conflicts(
        store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 3)
    before = (await store.select(inbox)).highestmodseq
    seen = await store.store_flags(inbox, UidSet.of((1, 2)), StoreMode.ADD, ["\\Seen", "$Forwarded"])
    assert seen.highestmodseq == before + 1
    assert {update.uid for update in seen.updated} == {1, 2}
    assert all(update.modseq == before + 1 for update in seen.updated)
    again = await store.store_flags(inbox, UidSet.of((1, 2)), StoreMode.ADD, ["\\Seen"])
    assert again.updated == () and again.highestmodseq == before + 1  # nothing changed, no new MODSEQ
    # RFC 7162 3.1.3: message 1 changed after `before`, so it conflicts; 3 did not.
    guarded = await store.store_flags(inbox, UidSet.of(1, 3), StoreMode.ADD, ["\\Flagged"], unchanged_since=before)
    assert guarded.conflicts == (1,)
    assert [update.uid for update in guarded.updated] == [3]
    [one] = await store.fetch(inbox, UidSet.of(1))
    assert one.flags == {"\\Seen", "$Forwarded"}
    replaced = await store.store_flags(inbox, UidSet.of(1), StoreMode.REPLACE, ["\\Answered"])
    assert replaced.updated[0].flags == {"\\Answered"}
    assert "$Forwarded" in (await store.select(inbox)).flags


async def test_copy_and_move_return_uidplus_data(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    archive = FolderRef(mailbox_id, "Archive")
    await fill(store, inbox, 4)
    await store.store_flags(inbox, UidSet.of(2), StoreMode.ADD, ["\\Flagged"])
    copied = await store.copy(inbox, UidSet.of((2, 3)), archive)
    archive_snapshot = await store.select(archive)
    assert copied.uidvalidity == archive_snapshot.uidvalidity
    assert copied.source_uids == (2, 3) and copied.dest_uids == (1, 2)
    assert (await store.fetch(archive, UidSet.of(1)))[0].flags == {"\\Flagged"}
    moved = await store.move(inbox, UidSet.of(1, 4), archive)
    assert moved.copy.source_uids == (1, 4) and moved.copy.dest_uids == (3, 4)
    assert moved.expunged.uids == (1, 4)
    assert tuple((await store.select(inbox)).uids) == (2, 3)
    body = await store.open_message(archive, 4)
    async with body:
        assert b"Bonjour 3" in await body.read()


async def test_expunge_and_changes_since(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 5)
    mark = (await store.select(inbox)).highestmodseq
    await store.store_flags(inbox, UidSet.of(1, 2, 5), StoreMode.ADD, ["\\Deleted"])
    await store.store_flags(inbox, UidSet.of(3), StoreMode.ADD, ["\\Seen"])
    only_two = await store.expunge(inbox, UidSet.of((2, 3)))  # UID EXPUNGE: only \Deleted ones in the set
    assert only_two.uids == (2,)
    rest = await store.expunge(inbox)
    assert rest.uids == (1, 5)
    changes = await store.changes_since(inbox, mark)
    assert changes.expunged == (1, 2, 5)
    assert [update.uid for update in changes.updated] == [3]
    assert changes.highestmodseq == rest.highestmodseq
    assert (await store.status(inbox)).messages == 2


async def test_recent_is_claimed_by_one_session_only(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 2)
    examined = await store.select(inbox, read_only=True)
    assert examined.recent == 2  # EXAMINE shows \Recent without claiming it
    first, second = await asyncio.gather(store.select(inbox), store.select(inbox))
    assert sorted([first.recent, second.recent]) == [0, 2]
    await store.append(inbox, message(3))
    claims = await asyncio.gather(store.claim_recent(inbox), store.claim_recent(inbox))
    assert sorted(len(claim) for claim in claims) == [0, 1]
    assert (await store.status(inbox)).recent == 0


async def test_select_reports_unseen_and_flags(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 3)
    await store.store_flags(inbox, UidSet.of(1), StoreMode.ADD, ["\\Seen"])
    snapshot = await store.select(inbox)
    assert snapshot.exists == 3 and snapshot.unseen == 2 and snapshot.first_unseen == 2
    assert "\\*" in snapshot.permanent_flags and not snapshot.read_only


async def test_rename_inbox_moves_messages_and_leaves_it_empty(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 3)
    old_validity = (await store.select(inbox)).uidvalidity
    await store.rename_folder(mailbox_id, "inbox", "Anciens/2026")
    emptied = await store.select(inbox)
    assert emptied.exists == 0 and emptied.uidvalidity == old_validity and emptied.uidnext == 4
    moved = await store.select(FolderRef(mailbox_id, "Anciens/2026"))
    assert tuple(moved.uids) == (1, 2, 3) and moved.uidvalidity != old_validity
    names = {info.name for info in await store.list_folders(mailbox_id)}
    assert {"Anciens", "Anciens/2026", INBOX} <= names


async def test_rename_carries_children_and_delete_rules(store: SqlMailStore, mailbox_id: int) -> None:
    await store.create_folder(mailbox_id, "Patients/Dupont/Bilans")  # parents created, no \Noselect holes
    with pytest.raises(FolderHasChildren):
        await store.delete_folder(mailbox_id, "Patients")
    with pytest.raises(CannotDeleteInbox):
        await store.delete_folder(mailbox_id, "INBOX")
    with pytest.raises(FolderExists):
        await store.create_folder(mailbox_id, "Patients/Dupont")
    with pytest.raises(InvalidFolderName):
        await store.create_folder(mailbox_id, "a//b")
    await store.rename_folder(mailbox_id, "Patients", "Suivi")
    names = {info.name: info for info in await store.list_folders(mailbox_id)}
    assert {"Suivi", "Suivi/Dupont", "Suivi/Dupont/Bilans"} <= set(names)
    assert not any(name.startswith("Patients") for name in names)
    assert names["Suivi"].has_children and not names["Suivi/Dupont/Bilans"].has_children
    with pytest.raises(FolderNotFound):
        await store.select(FolderRef(mailbox_id, "Patients"))


@pytest.mark.parametrize("name", ["..", "a/.", "a/../b", "~x", "~", "/a", "a/", "a//b", "ınbox", "ＩＮＢＯＸ/x"])
async def test_names_a_file_store_would_read_as_paths_are_refused(store: SqlMailStore, mailbox_id: int,
                                                                   name: str) -> None:
    """Every door's rule, not only IMAP's (``mailstore.names.new_folder_name``): for CREATE and RENAME's target."""
    before = {info.name for info in await store.list_folders(mailbox_id)}
    with pytest.raises(InvalidFolderName, match="Invalid mailbox name"):
        await store.create_folder(mailbox_id, name)
    await store.create_folder(mailbox_id, "Source")
    with pytest.raises(InvalidFolderName, match="Invalid mailbox name"):
        await store.rename_folder(mailbox_id, "Source", name)
    assert {info.name for info in await store.list_folders(mailbox_id)} == before | {"Source"}


async def test_subscriptions_survive_their_folder(store: SqlMailStore, mailbox_id: int) -> None:
    await store.create_folder(mailbox_id, "Temporaire", subscribe=True)
    await store.delete_folder(mailbox_id, "Temporaire")
    assert "Temporaire" in await store.list_subscriptions(mailbox_id)  # RFC 3501 6.3.6
    await store.unsubscribe(mailbox_id, "Temporaire")
    assert "Temporaire" not in await store.list_subscriptions(mailbox_id)


async def test_partial_body_reads(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    raw = message(1, body="x" * 200_000)
    await store.append(inbox, raw, internaldate=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    [meta] = await store.fetch(inbox, UidSet.of(1))
    assert meta.size == len(raw) and meta.internaldate.year == 2026
    assert meta.envelope["subject"] == "Compte rendu 1"
    assert meta.envelope["from"] == [["Dr Martin", None, "martin", "demo.mssante.localhost"]]
    body = await store.open_message(inbox, 1)
    async with body:
        assert await body.read(150_000, 10) == raw[150_000:150_010]
        assert b"".join([chunk async for chunk in body.chunks(10, 100_000)]) == raw[10:100_010]


async def test_a_message_whose_body_vanished_meanwhile_is_not_found(store: SqlMailStore, mailbox_id: int) -> None:
    """Expunged by another session between the row read and the blob open (its blob deleted after the commit):
    MessageNotFound, which FETCH skips (RFC 3501 6.4.8), not a server error; both ways of reading a body."""
    if not isinstance(store, SqlMailStore):
        pytest.skip("bodies are blobs in the SQL store")
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 2)
    async with await store.open_message(inbox, 1) as body:
        assert await store.message_bytes(inbox, 1) == await body.read()
    await store.blobs.delete(await store._blob_of(inbox, 2))     # a file, or an inline body's row
    with pytest.raises(MessageNotFound):
        await store.message_bytes(inbox, 2)
    with pytest.raises(MessageNotFound):
        await store.open_message(inbox, 2)
    with pytest.raises(MessageNotFound):
        await store.message_bytes(inbox, 9)
    # Listed first (FETCH's metadata), the body's blob id is known without another read: same answers.
    selected = FolderRef(mailbox_id, INBOX, (await store.select(inbox)).uidvalidity)
    await fill(store, inbox, 1)
    assert [meta.uid for meta in await store.fetch_meta(selected, UidSet.of((1, 3)))] == [1, 2, 3]
    async with await store.open_message(selected, 3) as body:
        assert await store.message_bytes(selected, 3) == await body.read()
    await store.blobs.delete(await store._blob_of(selected, 3))
    with pytest.raises(MessageNotFound):
        await store.message_bytes(selected, 3)

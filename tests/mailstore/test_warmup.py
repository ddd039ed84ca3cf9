"""Folder indexes preloaded at start (gateway.mailstore.warmup): what the previous run had in memory is loaded
again within a budget, and a preloaded index is caught up like any other (writers of another store, here a
second store on the same database, change the folder after the load and before the first SELECT)."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.mailstore.interface import INBOX, FolderRef, StoreMode, UidSet
from gateway.mailstore.notify import ChangeEvent, ChangeHub, ChangeKind
from gateway.mailstore.sql import SqlMailStore
from gateway.mailstore.warmup import IndexWarmup, read_hint, write_hint
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from tests.mailstore.test_index import _from_database, _from_index
from tests.mailstore.test_store import fill, message


async def _folder_id(store: SqlMailStore, ref: FolderRef) -> int:
    await store.select(ref, read_only=True)
    return store.indexed_folders()[0]


async def test_the_folders_in_memory_are_remembered_most_recent_first_and_preloaded_after_a_restart(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int, tmp_path: Path) -> None:
    inbox, sent = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Sent")
    await fill(store, inbox, 5)
    await fill(store, sent, 2)
    sent_id = await _folder_id(store, sent)
    inbox_id = await _folder_id(store, inbox)
    hint = tmp_path / "run" / "hint.json"
    before = IndexWarmup(store, hint, max_messages=100)
    before.save()
    assert read_hint(hint) == [inbox_id, sent_id]
    assert hint.stat().st_mode & 0o777 == 0o600

    restarted = SqlMailStore(database, blobs)
    warmup = IndexWarmup(restarted, hint, max_messages=100)
    warmup.start()
    await warmup.preloaded.wait()
    await warmup.stop()          # cancelled in its sleep; saves the hint
    assert restarted.indexed_folders() == [inbox_id, sent_id]
    index = restarted.indexes.peek(inbox_id, (await restarted.select(inbox, read_only=True)).uidvalidity)
    assert index is not None and list(index.uids) == [1, 2, 3, 4, 5]


async def test_a_preloaded_index_catches_up_with_changes_made_after_its_load(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 6)
    inbox_id = await _folder_id(store, inbox)
    restarted = SqlMailStore(database, blobs)
    assert await restarted.warm_indexes([inbox_id], max_messages=1000) == (1, 6)
    # Another node changes the folder after the load; nothing tells the restarted store.
    await store.store_flags(inbox, UidSet.of(2), StoreMode.ADD, ["\\Seen", "Urgent"])
    await store.store_flags(inbox, UidSet.of(4), StoreMode.ADD, ["\\Deleted"])
    await store.expunge(inbox)
    await store.append(inbox, message(7))
    snapshot = await restarted.select(inbox)
    assert list(snapshot.uids) == [1, 2, 3, 5, 6, 7]
    assert await _from_index(restarted, inbox) == await _from_database(restarted, inbox)


async def test_the_budget_and_folders_gone_since_limit_what_is_preloaded(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    inbox, sent = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Sent")
    await fill(store, inbox, 5)
    await fill(store, sent, 2)
    inbox_id, sent_id = await _folder_id(store, inbox), await _folder_id(store, sent)
    restarted = SqlMailStore(database, blobs)
    # 4 messages at most: the INBOX (5) does not fit, Sent (2) does; an unknown id is skipped.
    assert await restarted.warm_indexes([10**9, inbox_id, sent_id], max_messages=4) == (1, 2)
    assert restarted.indexed_folders() == [sent_id]
    assert await SqlMailStore(database, blobs).warm_indexes([inbox_id], max_messages=0) == (0, 0)


def test_a_damaged_hint_preloads_nothing(tmp_path: Path) -> None:
    hint = tmp_path / "hint.json"
    assert read_hint(hint) is None                  # no file: the largest folders (next test)
    for damaged in ("{", "[1, 2]", json.dumps({"folders": "12"}), json.dumps({"other": [1]})):
        hint.write_text(damaged)
        assert read_hint(hint) == []
    hint.write_text(json.dumps({"folders": [3, "x", True, 4]}))
    assert read_hint(hint) == [3, 4]
    write_hint(hint, [9, 8])
    assert read_hint(hint) == [9, 8]


async def test_an_append_is_published_as_no_delivery_and_a_delivery_as_one(
        store: SqlMailStore, hub: ChangeHub, mailbox_id: int) -> None:
    """The filing worker wakes for deliveries only (an APPEND has no filing job); the flag crosses nodes."""
    seen: list[ChangeEvent] = []
    hub.add_forwarder(seen.append)
    inbox = FolderRef(mailbox_id, INBOX)
    await store.append(inbox, message(1))
    await store.add_message(inbox, message(2), delivery_key="queue-1:doc")
    assert [(event.kind, event.delivered) for event in seen] == [(ChangeKind.EXISTS, False), (ChangeKind.EXISTS, True)]
    for event in seen:
        assert ChangeEvent.from_json(json.loads(json.dumps(event.to_json()))) == event


async def test_a_stop_with_no_index_in_memory_keeps_the_hint(
        database: Database, blobs: BlobStore, tmp_path: Path) -> None:
    """Stopped before anything was loaded: the previous run's hint stays for the next start."""
    hint = tmp_path / "run" / "hint.json"
    write_hint(hint, [5, 6])
    await IndexWarmup(SqlMailStore(database, blobs), hint, max_messages=0).stop()
    assert read_hint(hint) == [5, 6]


async def test_without_a_hint_the_largest_folders_are_preloaded_within_the_budget(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int, tmp_path: Path) -> None:
    inbox, sent, drafts = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Sent"), FolderRef(mailbox_id, "Drafts")
    await fill(store, inbox, 2)
    await fill(store, sent, 5)
    await fill(store, drafts, 3)
    sent_id, drafts_id = await _folder_id(store, sent), await _folder_id(store, drafts)
    restarted = SqlMailStore(database, blobs)
    warmup = IndexWarmup(restarted, tmp_path / "run" / "none.json", max_messages=9)
    warmup.start()
    await warmup.preloaded.wait()
    await warmup.stop()
    assert restarted.indexed_folders() == [sent_id, drafts_id]      # 5 + 3 fit in 9; the INBOX's 2 would not
    assert read_hint(tmp_path / "run" / "none.json") == [sent_id, drafts_id]

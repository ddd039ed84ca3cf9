"""The shared per-folder index (gateway.mailstore.index): SELECT and FETCH (UID FLAGS MODSEQ) answered from it
must always equal what the database holds, whoever changed it (this store, another node, no notification)."""

from __future__ import annotations

import asyncio
import threading
from array import array
from typing import Any

import pytest
from sqlalchemy import event

from gateway.mailstore.index import CHANGE_LOG, FolderIndex
from gateway.mailstore.interface import INBOX, Changes, FolderRef, StoreMode, UidSet
from gateway.mailstore.sql import SqlMailStore
from gateway.security.keys import KeyManager
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from tests.mailstore.test_store import fill, message


async def _from_database(store: SqlMailStore, folder: FolderRef) -> list[tuple[int, int, frozenset[str]]]:
    """The truth, through the full metadata query (no index)."""
    return [(meta.uid, meta.modseq, meta.flags) for meta in await store.fetch_meta(folder, UidSet.of((1, 10**9)))]


async def _from_index(store: SqlMailStore, folder: FolderRef) -> list[tuple[int, int, frozenset[str]]]:
    listing = await store.fetch_flags(folder, UidSet.of((1, 10**9)))
    return [(uid, modseq, listing.flag_sets[flag_id])
            for uid, modseq, flag_id in zip(listing.uids, listing.modseqs, listing.flag_ids, strict=True)]


async def test_index_follows_appends_flags_and_expunges(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 6)
    first = await store.select(inbox)
    assert list(first.uids) == [1, 2, 3, 4, 5, 6] and first.unseen == 6 and first.first_unseen == 1
    await store.store_flags(inbox, UidSet.of((1, 2)), StoreMode.ADD, ["\\Seen", "Urgent"])
    await store.store_flags(inbox, UidSet.of(4), StoreMode.ADD, ["\\Deleted"])
    await store.expunge(inbox)
    await store.append(inbox, message(7), flags=["\\Seen"])
    assert await _from_index(store, inbox) == await _from_database(store, inbox)
    again = await store.select(inbox)
    assert list(again.uids) == [1, 2, 3, 5, 6, 7]
    assert (again.unseen, again.first_unseen) == (3, 3)       # 3, 5, 6 unseen; 3 is the third message
    assert "Urgent" in again.flags
    # The snapshot given to the first session did not change under it (the index replaced its array).
    assert list(first.uids) == [1, 2, 3, 4, 5, 6]


async def test_changes_by_another_node_are_seen_without_a_notification(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    """Another gateway process on the same database (its hub not bridged): the folder row's HIGHESTMODSEQ
    tells this store its index is behind."""
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 4)
    await store.select(inbox)                                  # index loaded here
    other = SqlMailStore(database, blobs)                      # its own hub: nothing reaches ours
    await other.store_flags(inbox, UidSet.of(2), StoreMode.ADD, ["\\Flagged"])
    await other.store_flags(inbox, UidSet.of(3), StoreMode.ADD, ["\\Deleted"])
    await other.expunge(inbox)
    await other.append(inbox, message(9))
    assert await _from_index(store, inbox) == await _from_database(store, inbox)
    assert list((await store.select(inbox)).uids) == [1, 2, 4, 5]


async def test_changed_since_and_scattered_ranges(store: SqlMailStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 8)
    mark = (await store.select(inbox)).highestmodseq
    await store.store_flags(inbox, UidSet.of(3, 7), StoreMode.ADD, ["\\Answered"])
    changed = await store.fetch_flags(inbox, UidSet.of((1, 8)), changed_since=mark)
    assert list(changed.uids) == [3, 7]
    # Overlapping and unordered ranges name each message once, in UID order (RFC 3501 6.4.8).
    scattered = await store.fetch_flags(inbox, UidSet(((6, 8), (1, 2), (2, 3), (20, 30))))
    assert list(scattered.uids) == [1, 2, 3, 6, 7, 8]


def test_applying_the_same_changes_twice_changes_nothing() -> None:
    """A refresh may see a few changes newer than the folder row it read (PostgreSQL read committed)."""
    index = FolderIndex(1, 1)
    index.load([(1, 2, 0, " "), (2, 3, 1, " "), (3, 4, 0, " x ")], 4)
    for _ in range(2):
        index.apply([(2, 5, 0, " "), (4, 6, 1, " ")], [3], 6)
    assert index.uids == array("I", [1, 2, 4])
    assert list(index.modseqs) == [2, 5, 6]
    assert [index.sets.flags[flag_id] for flag_id in index.flag_ids] == [frozenset(), frozenset(), {"\\Seen"}]
    assert index.unseen() == (2, 1)


async def test_two_nodes_appending_and_delivering_into_one_folder_at_once(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    """Two gateway nodes (their own engines, stores and indexes) writing one folder concurrently: every UID
    and MODSEQ given once, UIDs in the order of their MODSEQs (the folder row's lock orders them), and each
    node's index equal to the database afterwards."""
    from gateway.mailstore.delivery import LocalDelivery

    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 1)
    other_db = Database(database.url)
    try:
        other = SqlMailStore(other_db, BlobStore(blobs.root, KeyManager(other_db, blobs.keys.keks.directory)))
        await store.select(inbox)
        await other.select(inbox)                              # both indexes loaded before the writes

        async def writes(node: SqlMailStore, name: str) -> list[tuple[int, int]]:
            results = []
            for n in range(15):
                if n % 3 == 0:
                    added = await LocalDelivery(node).deliver(mailbox_id, message(1000 + n), delivery_key=f"{name}:{n}")
                    results.append((added.uid, -1))
                else:
                    appended = await node.append(inbox, message(n))
                    results.append((appended.uid, appended.modseq))
            return results

        both = await asyncio.gather(writes(store, "a"), writes(other, "b"))
        uids = sorted(uid for results in both for uid, _ in results)
        assert uids == list(range(2, 32))                      # 30 distinct UIDs after the first message
        for results in both:                                   # each node saw its own UIDs and MODSEQs ascend
            assert [uid for uid, _ in results] == sorted(uid for uid, _ in results)
            modseqs = [modseq for _, modseq in results if modseq >= 0]
            assert modseqs == sorted(set(modseqs))
        truth = await _from_database(store, inbox)
        assert [meta[1] for meta in truth] == sorted({meta[1] for meta in truth})   # MODSEQ ascends with UID
        assert await _from_index(store, inbox) == truth
        assert await _from_index(other, inbox) == truth
        await other.store_flags(inbox, UidSet.of(5), StoreMode.ADD, ["\\Flagged"])   # B changes, A sees it
        assert await _from_index(store, inbox) == await _from_database(other, inbox)
    finally:
        await other_db.dispose()


async def test_a_whole_load_from_the_covering_indexes_equals_the_rows_keywords_included(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    """The first use of a folder after a start reads it whole from two indexes (UID/MODSEQ/system flags, and the
    messages with keywords): a fresh store (as after a restart) must see exactly what the rows hold."""
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 8)
    await store.store_flags(inbox, UidSet.of((2, 3)), StoreMode.ADD, ["Urgent", "$Label1"])
    await store.store_flags(inbox, UidSet.of(3), StoreMode.ADD, ["\\Seen"])
    await store.store_flags(inbox, UidSet.of(5), StoreMode.ADD, ["\\Flagged", "Suivi"])
    await store.store_flags(inbox, UidSet.of(7), StoreMode.ADD, ["\\Deleted"])
    await store.expunge(inbox)
    restarted = SqlMailStore(database, blobs)
    snapshot = await restarted.select(inbox, read_only=True)
    assert list(snapshot.uids) == [1, 2, 3, 4, 5, 6, 8]
    assert await _from_index(restarted, inbox) == await _from_database(restarted, inbox)
    assert {"$Label1", "Suivi", "Urgent"} <= set(snapshot.flags)
    assert (snapshot.unseen, snapshot.first_unseen) == (6, 1)


def _as_sets(changes: Changes | None) -> tuple[set[tuple[int, int, frozenset[str]]], set[int]]:
    assert changes is not None
    return {(update.uid, update.modseq, update.flags) for update in changes.updated}, set(changes.expunged)


async def test_changes_known_from_memory_equal_the_databases_after_this_processes_writes(
        store: SqlMailStore, mailbox_id: int) -> None:
    """The update check after a command (RFC 3501 7.4.1 EXISTS / EXPUNGE / FETCH) answered from the shared index:
    for every MODSEQ a session may hold, the same changes as the database gives, writers running concurrently."""
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 12)
    start = (await store.select(inbox)).highestmodseq
    inbox = FolderRef(mailbox_id, INBOX, (await store.select(inbox)).uidvalidity)
    await store.changes_since(inbox, start)                    # a look: the index is verified from here
    serialized = store.database.is_sqlite                      # PostgreSQL commits MODSEQs out of order: never

    async def flags(uids: UidSet, mode: StoreMode, names: list[str]) -> None:
        await store.store_flags(inbox, uids, mode, names)

    for round_ in range(3):
        await asyncio.gather(
            flags(UidSet.of(1 + round_), StoreMode.ADD, ["\\Seen", f"Tag{round_}"]),
            flags(UidSet.of((4, 6)), StoreMode.ADD, ["\\Deleted"] if round_ == 1 else ["\\Flagged"]),
            store.append(inbox, message(100 + round_), flags=["\\Answered"]),
            store.append(inbox, message(200 + round_)),
            flags(UidSet.of(8), StoreMode.REPLACE, [f"Other{round_}"]),
        )
        await store.expunge(inbox, UidSet.of((4, 6)))
    await store.fetch_flags(inbox, UidSet.of(1))              # a look brings the index up if a write left it behind
    top = (await store.changes_since(inbox, 0)).highestmodseq
    for mark in range(start, top + 1):
        known = store.changes_known(inbox, mark)
        if not serialized:
            assert known is None, mark
            continue
        assert _as_sets(known) == _as_sets(await store.changes_since(inbox, mark)), mark
        assert known is not None and known.highestmodseq == top
    assert store.changes_known(inbox, top + 1) is None         # a mark above the index's: only the database knows


async def test_changes_known_only_while_the_hub_accounts_for_every_change(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    """No answer from memory once an event names no MODSEQ (COPY into the folder), the folders changed, another
    node is bridged in, or the index's log does not reach back to the session's MODSEQ; a look trusts it again."""
    if not store.database.is_sqlite:
        pytest.skip("memory answers only where writers are serialized (SQLite); PostgreSQL always reads")
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 3)
    inbox = FolderRef(mailbox_id, INBOX, (await store.select(inbox)).uidvalidity)
    mark = (await store.changes_since(inbox, 0)).highestmodseq
    assert store.changes_known(inbox, mark) is not None
    await store.create_folder(mailbox_id, "Archives")
    assert store.changes_known(inbox, mark) is None            # folders changed: names may mean other folders
    await store.changes_since(inbox, mark)
    assert store.changes_known(inbox, mark) is not None
    await store.copy(FolderRef(mailbox_id, "Archives"), UidSet.of((1, 9)), inbox)   # nothing to copy, still
    archives = await store.select(FolderRef(mailbox_id, "Archives"))
    await store.append(FolderRef(mailbox_id, "Archives", archives.uidvalidity), message(50))
    await store.copy(FolderRef(mailbox_id, "Archives", archives.uidvalidity), UidSet.of(1), inbox)
    assert store.changes_known(inbox, mark) is None            # an EXISTS without MODSEQ
    fresh = await store.changes_since(inbox, mark)
    assert _as_sets(store.changes_known(inbox, mark)) == _as_sets(fresh)
    other = SqlMailStore(database, blobs)                      # another node, whose events never come here
    await other.store_flags(inbox, UidSet.of(2), StoreMode.ADD, ["\\Flagged"])
    assert _as_sets(store.changes_known(inbox, mark)) == _as_sets(fresh)   # unseen: the session's recheck bounds it
    later = await store.changes_since(inbox, mark)             # the look finds it
    assert (2, later.highestmodseq, frozenset({"\\Flagged"})) in _as_sets(store.changes_known(inbox, mark))[0]
    store.hub.bridged = True
    assert store.changes_known(inbox, mark) is None


def test_the_change_log_answers_only_as_far_back_as_it_reaches() -> None:
    index = FolderIndex(1, 1)
    index.load([(uid, uid, 0, " ") for uid in range(1, 11)], 10)
    assert index.changes_after(10) == ([], [])
    index.apply([(3, 11, 2, " ")], [5], 11)
    assert index.changes_after(10) == ([(3, 11, frozenset({"\\Answered"}))], [5])
    assert index.changes_after(9) is None                      # before the load: the log does not know
    for modseq in range(12, 12 + CHANGE_LOG):
        index.apply([(1, modseq, 0, " ")], [], modseq)
    assert index.changes_after(11) is None                     # the oldest half was dropped
    assert index.changes_after(index.modseq - 1) == ([(1, index.modseq, frozenset())], [])


async def test_status_counted_from_the_index_equals_the_databases_count(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    """STATUS (RFC 3501 6.3.10) UNSEEN and RECENT from the shared index when it holds the folder row's state,
    from the database otherwise (a store without the index, or one left behind by another node's write)."""
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 7)
    await store.store_flags(inbox, UidSet.of((2, 4)), StoreMode.ADD, ["\\Seen"])
    await store.select(inbox)                                  # index loaded, \\Recent claimed
    await store.append(inbox, message(8))                      # one recent message, unseen
    await store.fetch_flags(inbox, UidSet.of(1))
    other = SqlMailStore(database, blobs)                      # no index: the database counts
    counted = await other.status(inbox)
    assert (counted.unseen, counted.recent, counted.messages) == (5, 1, 8)
    assert await store.status(inbox) == counted
    await other.store_flags(inbox, UidSet.of(1), StoreMode.ADD, ["\\Seen"])   # our index is behind now
    assert (await store.status(inbox)).unseen == 4 == (await other.status(inbox)).unseen


def _on_postgresql(database: Database) -> None:
    if database.is_sqlite:    # its statements run on the driver, past SQLAlchemy's events; and a read
        pytest.skip("SQLite: one snapshot per read transaction, no interleaving to show")   # is one snapshot


class _AnotherNodeBetweenStatements:
    """Another gateway node's STORE committed in the middle of one of this store's read transactions: right after
    the first statement whose SQL holds every one of ``marks`` (once). The other node runs in a thread of its own,
    on its own connections, while this store's transaction waits: what PostgreSQL's READ COMMITTED shows a
    transaction whose statements each take a new snapshot, and SQLite's snapshot hides."""

    def __init__(self, database: Database, blobs: BlobStore, folder: FolderRef, uids: UidSet, flag: str,
                 *marks: str) -> None:
        self.database, self.blobs, self.folder, self.uids, self.flag, self.marks = (
            database, blobs, folder, uids, flag, marks)
        self.done = False
        self.engines = [database.engine.sync_engine]

    def __enter__(self) -> _AnotherNodeBetweenStatements:
        for engine in self.engines:
            event.listen(engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        for engine in self.engines:
            event.remove(engine, "after_cursor_execute", self._after)

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if self.done or not all(mark in statement for mark in self.marks):
            return
        self.done = True
        failure: list[BaseException] = []
        thread = threading.Thread(target=self._other_node, args=(failure,))
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    def _other_node(self, failure: list[BaseException]) -> None:
        async def write() -> None:
            other_database = Database(self.database.url)
            try:
                other = SqlMailStore(other_database, self.blobs)
                await other.store_flags(self.folder, self.uids, StoreMode.ADD, [self.flag])
            finally:
                await other_database.dispose()
        try:
            asyncio.run(write())
        except BaseException as exc:   # handed to the waiting transaction's thread
            failure.append(exc)


async def test_status_is_one_state_of_the_folder_while_another_node_writes(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    """STATUS (RFC 3501 6.3.10, RFC 7162 3.1.2) answers MESSAGES, UNSEEN and HIGHESTMODSEQ of one state: a
    \\Seen committed by another node between the read of the folder row and the count is either in all of them
    or in none (PostgreSQL's READ COMMITTED gave the new UNSEEN with the old HIGHESTMODSEQ)."""
    _on_postgresql(database)
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 5)
    reader = SqlMailStore(database, blobs)                     # no index: the database counts
    before = await reader.status(inbox)
    with _AnotherNodeBetweenStatements(database, blobs, inbox, UidSet.of((1, 2)), "\\Seen",
                                       "total_bytes", "recent_uid") as other:
        status = await reader.status(inbox)
    assert other.done
    after = await reader.status(inbox)
    assert (before.unseen, after.unseen, after.highestmodseq) == (5, 3, before.highestmodseq + 1)
    assert (status.unseen, status.highestmodseq) in {(before.unseen, before.highestmodseq),
                                                     (after.unseen, after.highestmodseq)}
    # The same with the shared index loaded (it may hold changes newer than the row it was read with).
    await store.select(inbox)
    with _AnotherNodeBetweenStatements(database, blobs, inbox, UidSet.of(3), "\\Seen",
                                       "total_bytes", "recent_uid") as other:
        status = await store.status(inbox)
    assert other.done
    final = await reader.status(inbox)
    assert (status.unseen, status.highestmodseq) in {(after.unseen, after.highestmodseq),
                                                     (final.unseen, final.highestmodseq)}


async def test_a_change_committed_during_changes_since_is_reported_then_or_next_time(
        store: SqlMailStore, database: Database, blobs: BlobStore, mailbox_id: int) -> None:
    """The update check (RFC 7162 3.1.4: a session keeps the HIGHESTMODSEQ it was told and asks for what is
    above it): a flag change another node commits while ``changes_since`` reads is in its answer, or above the
    HIGHESTMODSEQ it answers, never below it unseen (PostgreSQL read the MODSEQ again after the rows)."""
    _on_postgresql(database)
    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 4)
    mark = (await store.select(inbox)).highestmodseq
    await store.store_flags(inbox, UidSet.of(1), StoreMode.ADD, ["\\Answered"])
    with _AnotherNodeBetweenStatements(database, blobs, inbox, UidSet.of(2), "\\Flagged",
                                       "messages.modseq >") as other:
        first = await store.changes_since(inbox, mark)
    assert other.done
    second = await store.changes_since(inbox, first.highestmodseq)
    reported = {update.uid: update.flags for update in (*first.updated, *second.updated)}
    assert "\\Flagged" in reported.get(2, frozenset())
    assert "\\Answered" in reported[1]
    assert max(first.highestmodseq, second.highestmodseq) == (await store.status(inbox)).highestmodseq

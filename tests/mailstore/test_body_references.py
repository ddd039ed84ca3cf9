"""Bodies shared by copies (COPY and MOVE share the original's blob, an inline row or a file) are deleted when
the last message row referring to them goes, and never before: an EXPUNGE, a MOVE or a DELETE of a folder that
runs while another session (or another node, on PostgreSQL) copies or moves a message with the same body must
not take a body an acknowledged copy still refers to (``OK [COPYUID ...]``, RFC 4315 3), nor leave behind a body
no row refers to any more."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import pytest
from sqlalchemy import event, select, text

from gateway.mailstore.errors import FolderNotFound, MailStoreError
from gateway.mailstore.interface import INBOX, CopyResult, FolderRef, StoreMode, UidSet
from gateway.mailstore.sql import BODY_LOCKS, SqlMailStore
from gateway.mailstore.tables import Message
from gateway.storage.blobs import INLINE_MAX, BlobStore, is_inline
from gateway.storage.db import Database
from tests.mailstore.conftest import stored_bodies
from tests.mailstore.test_store import message

OtherWork = Callable[[SqlMailStore], Awaitable[Any]]
SIZES = {"inline": "Bonjour", "file": "x" * (INLINE_MAX + 10_000)}


def _on_postgresql(database: Database) -> None:
    if database.is_sqlite:    # one writer: see test_on_sqlite_one_writer_orders_the_copy_and_the_expunge
        pytest.skip("SQLite: one writer at a time, no interleaving of two write transactions to show")


class _AnotherNodeDuring:
    """Another gateway node's command (``work``, on its own engine, in a thread of its own) started right after
    the first statement of this node whose SQL holds every one of ``marks``; this node's transaction goes on once
    the other command has committed, or waits on a lock this transaction holds (then it commits after ours):
    every interleaving READ COMMITTED allows between two write transactions."""

    def __init__(self, database: Database, blobs: BlobStore, work: OtherWork, *marks: str) -> None:
        self.database, self.blobs, self.work, self.marks = database, blobs, work, marks
        self.started = False
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=self._other_node)

    def __enter__(self) -> Self:
        event.listen(self.database.engine.sync_engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.database.engine.sync_engine, "after_cursor_execute", self._after)
        if self.started:
            self.thread.join(60)

    def result(self) -> Any:
        assert self.started and not self.thread.is_alive()
        if isinstance(self.outcome[0], BaseException):
            raise self.outcome[0]
        return self.outcome[0]

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if self.started or not all(mark in statement for mark in self.marks):
            return
        self.started = True
        self.thread.start()
        failure: list[BaseException] = []
        watcher = threading.Thread(target=self._watch, args=(failure,))   # this thread runs an event loop
        watcher.start()
        watcher.join()
        if failure:
            raise failure[0]

    def _watch(self, failure: list[BaseException]) -> None:
        try:
            asyncio.run(self._until_done_or_waiting())
        except BaseException as exc:   # noqa: BLE001 - handed to the waiting transaction's thread
            failure.append(exc)

    async def _until_done_or_waiting(self) -> None:
        """Until the other command ended, or its backend waits on a lock (a bounded wait, never a measure)."""
        watcher = Database(self.database.url)
        try:
            for _ in range(3000):
                if not self.thread.is_alive():
                    return
                async with watcher.engine.connect() as connection:
                    waiting = await connection.scalar(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"))
                if waiting:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the other node neither ended nor waited on a lock")
        finally:
            await watcher.dispose()

    def _other_node(self) -> None:
        async def run() -> Any:
            other_database = Database(self.database.url)
            try:
                return await self.work(SqlMailStore(other_database, self.blobs))
            finally:
                await other_database.dispose()
        try:
            self.outcome.append(asyncio.run(run()))
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            self.outcome.append(exc)


async def _deleted_message(store: SqlMailStore, folder: FolderRef, body: str) -> bytes:
    raw = message(1, body=body)
    uid = (await store.append(folder, raw)).uid
    await store.store_flags(folder, UidSet.of(uid), StoreMode.ADD, ["\\Deleted"])
    return raw


async def _copies_read_back(store: SqlMailStore, folder: FolderRef, copied: CopyResult, raw: bytes) -> None:
    """Every copy acknowledged reads back whole (a body deleted under it: MessageNotFound)."""
    for uid in copied.dest_uids:
        assert await store.message_bytes(folder, uid) == raw


async def _bodies_referenced(database: Database) -> set[str]:
    async with database.session() as session:
        return set(await session.scalars(select(Message.blob_id).distinct()))


async def _no_body_lost_or_left(database: Database, data_dir: Path) -> None:
    """As many bodies kept as bodies referred to: none lost (a row without its body), none left behind."""
    assert await stored_bodies(database, data_dir) == len(await _bodies_referenced(database))


# Where the other node's command starts within the EXPUNGE: after its folder lock, after its rows' deletion,
# after its reference check.
EXPUNGE_POINTS = {"locked": ("FROM mail_folders", "FOR UPDATE"), "deleted": ("DELETE FROM mail_messages",),
                  "checked": ("SELECT mail_messages.id", "mail_messages.blob_id =")}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("point", EXPUNGE_POINTS)
@pytest.mark.parametrize("command", ["copy", "move"])
async def test_a_copy_committed_during_the_expunge_of_its_source_keeps_its_body(
        store: SqlMailStore, database: Database, blobs: BlobStore, data_dir: Path, mailbox_id: int,
        size: str, point: str, command: str) -> None:
    """A COPY (or MOVE) of a message by another node while this node expunges it: the copy is refused (its
    source expunged first) or, acknowledged, reads back whole; the body is deleted only if no copy was made."""
    _on_postgresql(database)
    inbox, archive = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Archive")
    raw = await _deleted_message(store, inbox, SIZES[size])

    async def other(node: SqlMailStore) -> Any:
        return await getattr(node, command)(inbox, UidSet.of(1), archive)

    with _AnotherNodeDuring(database, blobs, other, *EXPUNGE_POINTS[point]) as during:
        expunged = await store.expunge(inbox)
    done = during.result()
    copied = done if command == "copy" else done.copy
    assert expunged.uids == (1,) or copied.dest_uids == (1,)   # one of them had the message
    await _copies_read_back(store, archive, copied, raw)
    await _no_body_lost_or_left(database, data_dir)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("point", EXPUNGE_POINTS)
async def test_a_copy_of_a_shared_body_from_another_folder_during_an_expunge_keeps_it(
        store: SqlMailStore, database: Database, blobs: BlobStore, data_dir: Path, mailbox_id: int,
        size: str, point: str) -> None:
    """The body is shared by INBOX 1 (expunged here) and Drafts 1 (moved to Archive by another node, which needs
    no lock of INBOX): whichever commits first, Archive's copy reads back, and the body stays."""
    _on_postgresql(database)
    inbox, drafts, archive = (FolderRef(mailbox_id, name) for name in (INBOX, "Drafts", "Archive"))
    raw = await _deleted_message(store, inbox, SIZES[size])
    assert (await store.copy(inbox, UidSet.of(1), drafts)).dest_uids == (1,)

    async def other(node: SqlMailStore) -> Any:
        return await node.move(drafts, UidSet.of(1), archive)

    with _AnotherNodeDuring(database, blobs, other, *EXPUNGE_POINTS[point]) as during:
        assert (await store.expunge(inbox)).uids == (1,)
    moved = during.result()
    assert moved.copy.dest_uids == (1,)
    await _copies_read_back(store, archive, moved.copy, raw)
    await _no_body_lost_or_left(database, data_dir)


# Where the other node's EXPUNGE starts within the COPY: after its source rows' read, after its copies' insert.
COPY_POINTS = {"read": ("FROM mail_messages", "mail_messages.folder_id ="), "inserted": ("INSERT INTO mail_messages",)}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("point", COPY_POINTS)
async def test_an_expunge_committed_during_the_copy_of_its_message_keeps_the_copys_body(
        store: SqlMailStore, database: Database, blobs: BlobStore, data_dir: Path, mailbox_id: int,
        size: str, point: str) -> None:
    _on_postgresql(database)
    inbox, archive = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Archive")
    raw = await _deleted_message(store, inbox, SIZES[size])

    async def other(node: SqlMailStore) -> Any:
        return await node.expunge(inbox)

    with _AnotherNodeDuring(database, blobs, other, *COPY_POINTS[point]) as during:
        copied = await store.copy(inbox, UidSet.of(1), archive)
    expunged = during.result()
    assert copied.dest_uids == (1,) and expunged.uids == (1,)
    await _copies_read_back(store, archive, copied, raw)
    await _no_body_lost_or_left(database, data_dir)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("point", ["deleted", "checked"])
async def test_two_folders_expunged_at_once_leave_no_shared_body_behind(
        store: SqlMailStore, database: Database, blobs: BlobStore, data_dir: Path, mailbox_id: int,
        size: str, point: str) -> None:
    """INBOX 1 and its copy Drafts 1 expunged by two nodes at once: each saw the other's row still there (READ
    COMMITTED) and both kept the body, which no row referred to any more. The second waits for the first."""
    _on_postgresql(database)
    inbox, drafts = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Drafts")
    await _deleted_message(store, inbox, SIZES[size])
    assert (await store.copy(inbox, UidSet.of(1), drafts)).dest_uids == (1,)

    async def other(node: SqlMailStore) -> Any:
        return await node.expunge(drafts)

    with _AnotherNodeDuring(database, blobs, other, *EXPUNGE_POINTS[point]) as during:
        assert (await store.expunge(inbox)).uids == (1,)
    assert during.result().uids == (1,)
    assert await _bodies_referenced(database) == set()
    await _no_body_lost_or_left(database, data_dir)


async def test_on_sqlite_one_writer_orders_the_copy_and_the_expunge(
        store: SqlMailStore, database: Database, blobs: BlobStore, data_dir: Path, mailbox_id: int) -> None:
    """Both orders, and both at once from two stores on one database (as two IMAP sessions, or on SQLite two
    processes, do): every acknowledged copy reads back, no body is lost or left behind."""
    inbox, archive = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Archive")
    other = SqlMailStore(database, blobs)
    for body in SIZES.values():
        raw = await _deleted_message(store, inbox, body)
        uid = (await store.select(inbox)).uids[-1]
        outcomes = await asyncio.gather(other.copy(inbox, UidSet.of(uid), archive), store.expunge(inbox),
                                        return_exceptions=True)
        assert not [outcome for outcome in outcomes if isinstance(outcome, BaseException)
                    and not isinstance(outcome, MailStoreError)], outcomes
        copied = outcomes[0]
        if isinstance(copied, CopyResult):
            await _copies_read_back(store, archive, copied, raw)
        await _no_body_lost_or_left(database, data_dir)


@pytest.mark.parametrize("size", SIZES)
async def test_deleting_a_folder_drops_the_bodies_only_its_messages_used(
        store: SqlMailStore, database: Database, data_dir: Path, mailbox_id: int, size: str) -> None:
    """RFC 3501 6.3.4: DELETE of a folder removes its messages; their bodies no other row refers to go too
    (inline ones in the same transaction, files after the commit); a body a copy elsewhere shares stays."""
    inbox, old = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Old")
    await store.create_folder(mailbox_id, "Old")
    alone = message(1, body=SIZES[size])
    shared = message(2, body=SIZES[size])
    await store.append(old, alone)
    await store.append(old, shared)
    assert (await store.copy(old, UidSet.of(2), inbox)).dest_uids == (1,)
    assert await stored_bodies(database, data_dir) == 2
    kinds = {is_inline(blob_id) for blob_id in await _bodies_referenced(database)}
    assert kinds == {size == "inline"}
    await store.delete_folder(mailbox_id, "Old")
    assert await stored_bodies(database, data_dir) == 1
    assert await store.message_bytes(inbox, 1) == shared
    await _no_body_lost_or_left(database, data_dir)


# The reference check of an EXPUNGE or a DELETE (in its transaction, or after its commit as it once was).
CHECK = ("SELECT", "WHERE mail_messages.blob_id")


@pytest.mark.parametrize("size", SIZES)
async def test_a_folder_deleted_while_its_shared_bodys_other_copy_is_expunged_leaves_nothing_behind(
        store: SqlMailStore, database: Database, blobs: BlobStore, data_dir: Path, mailbox_id: int,
        size: str) -> None:
    """DELETE of Old (holding Old 1) while another node expunges INBOX 1, a copy of it: the body goes, once."""
    _on_postgresql(database)
    inbox, old = FolderRef(mailbox_id, INBOX), FolderRef(mailbox_id, "Old")
    await store.create_folder(mailbox_id, "Old")
    await store.append(old, message(1, body=SIZES[size]))
    assert (await store.copy(old, UidSet.of(1), inbox)).dest_uids == (1,)
    await store.store_flags(inbox, UidSet.of(1), StoreMode.ADD, ["\\Deleted"])

    async def other(node: SqlMailStore) -> Any:
        return await node.expunge(inbox)

    with _AnotherNodeDuring(database, blobs, other, *CHECK) as during:
        await store.delete_folder(mailbox_id, "Old")
    assert during.result().uids == (1,)
    assert await _bodies_referenced(database) == set()
    await _no_body_lost_or_left(database, data_dir)


@pytest.mark.parametrize("size", SIZES)
async def test_a_copy_out_of_a_folder_being_deleted_is_refused_or_keeps_its_body(
        store: SqlMailStore, database: Database, blobs: BlobStore, data_dir: Path, mailbox_id: int,
        size: str) -> None:
    _on_postgresql(database)
    old, archive = FolderRef(mailbox_id, "Old"), FolderRef(mailbox_id, "Archive")
    await store.create_folder(mailbox_id, "Old")
    raw = message(1, body=SIZES[size])
    await store.append(old, raw)

    async def other(node: SqlMailStore) -> Any:
        return await node.copy(old, UidSet.of(1), archive)

    with _AnotherNodeDuring(database, blobs, other, "DELETE FROM mail_messages") as during:
        await store.delete_folder(mailbox_id, "Old")
    with pytest.raises(FolderNotFound):      # it waited for the DELETE's commit: no folder any more
        during.result()
    await _no_body_lost_or_left(database, data_dir)
    assert await stored_bodies(database, data_dir) == 0


async def test_an_inline_body_goes_with_its_deleted_folder_in_one_transaction(
        store: SqlMailStore, database: Database, data_dir: Path, mailbox_id: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing done after the commit (the process may be killed there) is needed to drop an inline body."""
    await store.create_folder(mailbox_id, "Old")
    await store.append(FolderRef(mailbox_id, "Old"), message(1))

    async def killed(_blob_id: str) -> None:
        raise RuntimeError("killed after the commit")

    monkeypatch.setattr(store.blobs, "delete", killed)
    await store.delete_folder(mailbox_id, "Old")
    assert await stored_bodies(database, data_dir) == 0


async def test_an_expunge_of_many_bodies_drops_them_all_under_a_bounded_number_of_locks(
        store: SqlMailStore, database: Database, data_dir: Path, mailbox_id: int) -> None:
    """Every body of a large EXPUNGE is locked (one of ``BODY_LOCKS`` per mailbox, so PostgreSQL's lock table
    is never exhausted) and dropped."""
    inbox = FolderRef(mailbox_id, INBOX)
    for number in range(3 * BODY_LOCKS):
        await store.append(inbox, message(number), flags=["\\Deleted"])
    assert len((await store.expunge(inbox)).uids) == 3 * BODY_LOCKS
    assert await stored_bodies(database, data_dir) == 0

"""Group commit of concurrent deliveries (SQLite): grouped, yet each writer gets its own outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.errors import FolderNotFound, QuotaExceeded
from gateway.mailstore.interface import INBOX, ExpungeResult, FolderRef, StoreMode, StoreResult, UidSet
from gateway.mailstore.sql import SqlMailStore
from tests.mailstore.conftest import MakeMailbox, stored_bodies
from tests.mailstore.test_store import message


def _grouping(store: SqlMailStore) -> None:
    if store.append_group is None:
        pytest.skip("group commit is for SQLite; PostgreSQL commits concurrently")


async def test_concurrent_deliveries_share_transactions_and_get_distinct_uids(
        store: SqlMailStore, delivery: LocalDelivery, mailbox_id: int) -> None:
    _grouping(store)
    results = await asyncio.gather(*(delivery.deliver(mailbox_id, message(n), delivery_key=f"q{n}:r")
                                     for n in range(30)))
    assert sorted(r.uid for r in results) == list(range(1, 31))
    assert not any(r.duplicate for r in results)
    assert store.append_group is not None and store.append_group.grouped >= 30 and store.append_group.batches < 30
    metas = await store.fetch(FolderRef(mailbox_id, INBOX), UidSet.of((1, 30)))
    assert len(metas) == 30 and len({m.modseq for m in metas}) == 30  # each message its own MODSEQ
    for result in results:
        async with await store.open_message(FolderRef(mailbox_id, INBOX), result.uid) as body:
            assert len(await body.read()) == body.size > 0


async def test_a_redelivery_racing_inside_a_group_files_once(store: SqlMailStore, delivery: LocalDelivery,
                                                             mailbox_id: int, data_dir: Path) -> None:
    _grouping(store)
    others = [delivery.deliver(mailbox_id, message(n), delivery_key=f"other{n}") for n in range(5)]
    same = [delivery.deliver(mailbox_id, message(99), delivery_key="same-key") for _ in range(5)]
    results = await asyncio.gather(*others, *same)
    assert sum(not r.duplicate for r in results[5:]) == 1
    assert (await store.status(FolderRef(mailbox_id, INBOX))).messages == 6
    assert await stored_bodies(store.database, data_dir) == 6


async def test_a_refusal_inside_a_group_goes_to_its_writer_alone(
        store: SqlMailStore, delivery: LocalDelivery, make_mailbox: MakeMailbox) -> None:
    _grouping(store)
    small = await make_mailbox(quota_bytes=4096)
    roomy = await make_mailbox()
    await delivery.provision(small)
    await delivery.provision(roomy)
    await delivery.deliver(small, b"Subject: first\r\n\r\n" + b"x" * 3000, delivery_key="s1")
    outcomes = await asyncio.gather(
        *(delivery.deliver(roomy, message(n), delivery_key=f"r{n}") for n in range(4)),
        delivery.deliver(small, b"Subject: over\r\n\r\n" + b"x" * 3000, delivery_key="s2"),
        *(delivery.deliver(roomy, message(n), delivery_key=f"r{n + 4}") for n in range(4)),
        return_exceptions=True)
    assert isinstance(outcomes[4], QuotaExceeded)
    assert all(not isinstance(o, BaseException) for i, o in enumerate(outcomes) if i != 4)
    assert (await store.status(FolderRef(roomy, INBOX))).messages == 8
    assert (await store.status(FolderRef(small, INBOX))).messages == 1


async def test_concurrent_stores_expunges_and_appends_share_transactions_each_with_its_own_outcome(
        store: SqlMailStore, mailbox_id: int) -> None:
    """STORE, EXPUNGE and APPEND queue in the one group commit: grouped, yet each STORE gets its own new MODSEQ,
    a STORE on a folder gone is refused alone, and the shared index equals the rows afterwards."""
    _grouping(store)
    from tests.mailstore.test_index import _from_database, _from_index
    from tests.mailstore.test_store import fill

    inbox = FolderRef(mailbox_id, INBOX)
    await fill(store, inbox, 20)
    await store.select(inbox)
    await store.store_flags(inbox, UidSet.of((1, 4)), StoreMode.ADD, ["\\Deleted"])
    assert store.append_group is not None
    batches, grouped = store.append_group.batches, store.append_group.grouped
    stores = [store.store_flags(inbox, UidSet.of(uid), StoreMode.ADD, ["\\Seen"]) for uid in range(5, 21)]
    gone = store.store_flags(FolderRef(mailbox_id, "No such folder"), UidSet.of(1), StoreMode.ADD, ["\\Seen"])
    outcomes = await asyncio.gather(*stores, store.expunge(inbox, UidSet.of((1, 2))), gone,
                                    *(store.append(inbox, message(n)) for n in range(30, 35)),
                                    return_exceptions=True)
    stored = outcomes[:16]
    assert all(isinstance(result, StoreResult) and len(result.updated) == 1 for result in stored)
    assert len({result.highestmodseq for result in stored if isinstance(result, StoreResult)}) == 16
    assert isinstance(outcomes[16], ExpungeResult) and outcomes[16].uids == (1, 2)
    assert isinstance(outcomes[17], FolderNotFound)
    # Every writer went through the group (the refused one may have been alone), fewer transactions than writers.
    assert store.append_group.grouped - grouped >= 22 and store.append_group.batches - batches < 22
    assert await _from_index(store, inbox) == await _from_database(store, inbox)
    assert [uid for uid, _, flags in await _from_database(store, inbox) if "\\Seen" in flags] == list(range(5, 21))

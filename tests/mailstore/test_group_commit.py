"""Group commit of concurrent deliveries (SQLite): grouped, yet each writer gets its own outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.errors import QuotaExceeded
from gateway.mailstore.interface import INBOX, FolderRef, UidSet
from gateway.mailstore.sql import SqlMailStore
from tests.mailstore.conftest import MakeMailbox
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
    assert len([p for p in (data_dir / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"]) == 6


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

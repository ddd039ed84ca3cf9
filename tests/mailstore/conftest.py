"""Fixtures of the mail store tests: keys, blobs, a store, hosted mailboxes (on SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.security.keys import KeyManager
from gateway.storage.blobs import BlobStore, InlineBlob
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Professional

_numbers = itertools.count(1)

MakeMailbox = Callable[..., Awaitable[int]]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def keys(database: Database, data_dir: Path) -> KeyManager:
    return KeyManager(database, data_dir / "keys")


@pytest.fixture
def blobs(keys: KeyManager, data_dir: Path) -> BlobStore:
    return BlobStore(data_dir / "blobs", keys)


@pytest.fixture
def hub() -> ChangeHub:
    return ChangeHub()


@pytest.fixture
def store(database: Database, blobs: BlobStore, hub: ChangeHub) -> SqlMailStore:
    return SqlMailStore(database, blobs, hub)


@pytest.fixture
def delivery(store: SqlMailStore) -> LocalDelivery:
    return LocalDelivery(store)


@pytest.fixture
def make_mailbox(database: Database) -> MakeMailbox:
    async def make(quota_bytes: int = 10 * 1024 * 1024) -> int:
        number = next(_numbers)
        async with database.session() as session:
            professional = Professional(
                idnps=f"8{number:010d}", id_type="RPPS", id_value=f"{number:011d}", family_name="Martin",
                profession_code="10", profession_label="Médecin",
            )
            session.add(professional)
            await session.flush()
            mailbox = Mailbox(address=f"doc{number}@demo.mssante.localhost", domain="demo.mssante.localhost",
                              type="PER", professional=professional, quota_bytes=quota_bytes)
            session.add(mailbox)
            await session.flush()
            return mailbox.id

    return make


@pytest.fixture
async def mailbox_id(make_mailbox: MakeMailbox, delivery: LocalDelivery) -> int:
    """A hosted mailbox, provisioned with its six folders."""
    box = await make_mailbox()
    await delivery.provision(box)
    return box


async def stored_bodies(database: Database, data_dir: Path) -> int:
    """Message bodies kept: blob files (not the temporary ones) and inline blobs (``inline_blobs`` rows)."""
    files = [p for p in (data_dir / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"]
    async with database.session() as session:
        inline = await session.scalar(select(func.count()).select_from(InlineBlob))
    return len(files) + int(inline or 0)

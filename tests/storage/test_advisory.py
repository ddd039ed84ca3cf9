"""Periodic jobs on one node at a time (PostgreSQL advisory locks), migrations of nodes starting together,
and crypto-shredding seen by every node's caches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.dmp_bridge.record import patient_owner
from gateway.retention import ShreddingTask
from gateway.security.at_rest import FieldSealer
from gateway.security.keys import KeyDestroyed, KeyManager
from gateway.storage.advisory import run_alone
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from tests.pg import PgCluster
from tests.security.test_at_rest import _closed_patient


async def test_one_node_at_a_time_runs_a_job(database: Database) -> None:
    other_node = Database(database.url)
    try:
        async with run_alone(database, "job") as first:
            assert first
            async with run_alone(other_node, "job") as second, run_alone(other_node, "another job") as third:
                assert second is database.is_sqlite          # PostgreSQL: held by the first node; SQLite: one process
                assert third
        async with run_alone(other_node, "job") as after:
            assert after                                     # released when the first node's pass ended
    finally:
        await other_node.dispose()


@pytest.mark.postgres
async def test_nodes_starting_together_migrate_one_after_the_other(pg_cluster: PgCluster) -> None:
    url = await pg_cluster.create_database()
    nodes = [Database(url) for _ in range(3)]
    try:
        await asyncio.gather(*(node.migrate() for node in nodes))
        assert len({await node.current_revision() for node in nodes}) == 1
    finally:
        for node in nodes:
            await node.dispose()
        await pg_cluster.drop_database(url)


async def test_a_space_shredded_by_one_node_is_forgotten_by_the_others(database: Database, settings: Settings,
                                                                        tmp_path: Path) -> None:
    ins, _mailbox_id = await _closed_patient(database, settings, days_ago=400)
    other_db = Database(database.url)
    try:
        keys_a, keys_b = KeyManager(database, tmp_path / "keys"), KeyManager(other_db, tmp_path / "keys")
        blob = await BlobStore(tmp_path / "blobs", keys_a).put(patient_owner(ins), b"%PDF-1.4 compte rendu")
        node_b = BlobStore(tmp_path / "blobs", keys_b)
        assert await node_b.read(patient_owner(ins), blob.blob_id) == b"%PDF-1.4 compte rendu"   # B holds the key
        shredding_a = ShreddingTask(database, keys_a, FieldSealer(keys_a), retention_days=365, interval_seconds=60)
        shredding_b = ShreddingTask(other_db, keys_b, FieldSealer(keys_b), retention_days=365, interval_seconds=60)
        assert [space.ins for space in await shredding_a.run_once()] == [ins]
        assert await shredding_b.run_once() == []            # nothing left to shred: A did it ...
        with pytest.raises(KeyDestroyed):                     # ... and B no longer decrypts from its cache
            await node_b.read(patient_owner(ins), blob.blob_id)
    finally:
        await other_db.dispose()

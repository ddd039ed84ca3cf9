"""Change notifications across gateway nodes through PostgreSQL LISTEN/NOTIFY."""

from __future__ import annotations

import pytest

from gateway.mailstore.notify import ChangeEvent, ChangeHub, ChangeKind, PgNotifyBridge
from gateway.storage.db import Database


async def test_an_event_on_one_node_wakes_a_session_on_another(database: Database) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite is the single-process embedded case: no bridge")
    node_a, node_b = ChangeHub(), ChangeHub()
    bridge_a, bridge_b = PgNotifyBridge(node_a, database.url), PgNotifyBridge(node_b, database.url)
    await bridge_a.start()
    await bridge_b.start()
    try:
        with node_b.subscribe(7, "INBOX") as remote, node_a.subscribe(7, "INBOX") as local:
            node_a.publish(ChangeEvent(7, "INBOX", ChangeKind.EXISTS, 12))
            assert await remote.wait(timeout=10) == [ChangeEvent(7, "INBOX", ChangeKind.EXISTS, 12)]
            assert await local.wait(timeout=0) == [ChangeEvent(7, "INBOX", ChangeKind.EXISTS, 12)]  # no echo
            assert await local.wait(timeout=0.2) == []
    finally:
        await bridge_a.stop()
        await bridge_b.stop()

"""Change notifications across gateway nodes through PostgreSQL LISTEN/NOTIFY."""

from __future__ import annotations

import pytest

from gateway.mailstore.notify import ChangeEvent, ChangeHub, ChangeKind, PgNotifyBridge
from gateway.storage.db import Database
from tests.harness import wait_until_async


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


def test_version_counts_the_changes_of_each_mailbox() -> None:
    """What an IMAP session relies on to skip asking the store for changes after a command."""
    hub = ChangeHub()
    assert hub.version(7) == 0 and hub.sees_every_change
    hub.publish(ChangeEvent(7, "INBOX", ChangeKind.FLAGS, 3))
    hub.publish(ChangeEvent(7, None, ChangeKind.FOLDERS))
    hub.publish(ChangeEvent(8, "INBOX", ChangeKind.EXISTS, 2))
    assert (hub.version(7), hub.version(8), hub.version(9)) == (2, 1, 0)
    hub.add_forwarder(lambda event: None)          # a local listener (the filing worker) is not another node
    assert hub.sees_every_change


async def test_a_bridged_hub_does_not_claim_to_see_every_change(database: Database) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite is the single-process embedded case: no bridge")
    hub = ChangeHub()
    bridge = PgNotifyBridge(hub, database.url)
    await bridge.start()
    try:
        assert not hub.sees_every_change
    finally:
        await bridge.stop()


async def test_the_bridge_reconnects_after_losing_its_connection(database: Database) -> None:
    if database.is_sqlite:
        pytest.skip("SQLite is the single-process embedded case: no bridge")
    import asyncpg

    node_a, node_b = ChangeHub(), ChangeHub()
    bridge_a, bridge_b = PgNotifyBridge(node_a, database.url), PgNotifyBridge(node_b, database.url)
    await bridge_a.start()
    await bridge_b.start()
    admin = await asyncpg.connect(database.url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        pid = bridge_b._connection.get_server_pid()
        await admin.execute("SELECT pg_terminate_backend($1)", pid)      # as a PostgreSQL restart would
        await wait_until_async(lambda: True if bridge_b.connections == 2 and not bridge_b._connection.is_closed()
                               else None, timeout=10, what="the bridge reconnected")
        with node_b.subscribe(7, "INBOX") as remote:
            node_a.publish(ChangeEvent(7, "INBOX", ChangeKind.EXISTS, 13))
            assert await remote.wait(timeout=10) == [ChangeEvent(7, "INBOX", ChangeKind.EXISTS, 13)]
    finally:
        await admin.close()
        await bridge_a.stop()
        await bridge_b.stop()

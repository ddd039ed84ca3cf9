"""``gateway mailbox reindex``: fills the SEARCH blind index of messages stored before it, as a subprocess."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from gateway.app import open_services
from gateway.config import load_settings
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.interface import INBOX, FolderRef
from tests.harness import run_cli

ADDRESS = "claire.medecin@demo.mssante.localhost"


async def append_unindexed(data_dir: Path, count: int) -> None:
    """Messages stored as before the index existed (sealed headers, no index rows)."""
    async with open_services(load_settings(None, data_dir=data_dir)) as services:
        account = await services.directory.account(ADDRESS)
        await LocalDelivery(services.mailstore).provision(account.mailbox_id)
        services.mailstore.index = None
        for number in range(count):
            await services.mailstore.append(FolderRef(account.mailbox_id, INBOX), (
                f"From: Dr Martin <martin@example.org>\r\nSubject: Compte rendu {number}\r\n\r\nBonjour\r\n").encode())


async def test_reindex_indexes_what_has_no_rows_then_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cli("init", "--demo", data_dir=data_dir).returncode == 0
    await append_unindexed(data_dir, 3)
    messages = 3
    first = run_cli("mailbox", "reindex", ADDRESS, "--json", data_dir=data_dir)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == [{"address": ADDRESS, "indexed": messages, "envelopes": 0,
                                         "headers_recomputed": 0}]
    again = run_cli("mailbox", "reindex", "--all", data_dir=data_dir)
    assert again.returncode == 0 and f"{ADDRESS}: 0 messages indexed" in again.stdout
    with sqlite3.connect(data_dir / "gateway.db") as db:
        unindexed = db.execute("SELECT count(*) FROM mail_messages m WHERE NOT EXISTS "
                               "(SELECT 1 FROM mail_message_tokens t WHERE t.message_id = m.id)").fetchone()[0]
    assert unindexed == 0


def test_reindex_refusals(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cli("init", "--demo", data_dir=data_dir).returncode == 0
    unknown = run_cli("mailbox", "reindex", "nobody@demo.mssante.localhost", data_dir=data_dir)
    assert unknown.returncode == 1 and "no mailbox nobody@demo.mssante.localhost hosted here" in unknown.stderr
    neither = run_cli("mailbox", "reindex", data_dir=data_dir)
    assert neither.returncode == 2 and "give an ADDRESS or --all" in neither.stderr

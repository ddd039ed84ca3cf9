"""Blob files no row refers to (a crash between a blob's write and its row's commit, or between a deletion's
commit and the file's removal) are removed once old enough; a file a row refers to, or a young one, never is
(gateway/storage/blob_sweep.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Connection

from gateway import schema
from gateway.mailstore.interface import INBOX, FolderRef
from gateway.security.keys import mailbox_owner
from gateway.mailstore.sql import SqlMailStore
from gateway.mailstore.tables import Folder, Message
from gateway.storage.blob_sweep import BlobSweep, blob_reference_columns
from gateway.storage.blobs import INLINE_MAX, BlobNotFound, BlobStore
from gateway.storage.db import Database
from tests.harness import GatewayProcess
from tests.mailstore.test_store import message

DAY = 24 * 3600
BIG = "x" * (INLINE_MAX + 10_000)          # a body kept in a file, not inline


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_every_column_holding_blob_ids_is_a_reference() -> None:
    # A column pointing at blobs under another name would have its files swept: the naming is the rule.
    found = {f"{column.table.name}.{column.name}" for column in blob_reference_columns(schema.metadata)}
    assert found == {"mail_messages.blob_id", "record_documents.blob_id", "smime_inbound_results.decrypted_blob_id"}
    blobish = {f"{table.name}.{column.name}" for table in schema.metadata.sorted_tables for column in table.columns
               if "blob" in column.name and table.name != "inline_blobs"}
    assert blobish == found, "a column holding blob ids must be named blob_id or *_blob_id"


async def test_old_unreferenced_files_go_referenced_and_young_ones_stay(
        database: Database, store: SqlMailStore, blobs: BlobStore, mailbox_id: int) -> None:
    inbox = FolderRef(mailbox_id, INBOX)
    raw = message(1, body=BIG)
    await store.append(inbox, raw)
    [kept_id] = await _blob_ids(database, inbox)
    orphan = await blobs.put(mailbox_owner(mailbox_id), b"left by a crash " * 5000)        # no row: a crash's leftover
    young_orphan = await blobs.put(mailbox_owner(mailbox_id), b"a delivery committing now " * 5000)
    half_written = blobs.temp_dir / "0123456789abcdef0123456789abcdef.tmp"
    half_written.write_bytes(b"\x00" * 100)
    young_half_written = blobs.temp_dir / "fedcba9876543210fedcba9876543210.tmp"
    young_half_written.write_bytes(b"\x00" * 100)
    for path in (blobs.path(kept_id), blobs.path(orphan.blob_id), half_written):
        _age(path, 2 * DAY)
    sweep = BlobSweep(database, blobs, schema.metadata, min_age=dt.timedelta(days=1))

    rehearsal = await sweep.sweep(dry_run=True)
    assert (rehearsal.count.removed, rehearsal.count.referenced, rehearsal.count.young,
            rehearsal.count.temporary) == (1, 1, 1, 1)
    assert blobs.path(orphan.blob_id).exists() and half_written.exists()

    report = await sweep.sweep()
    assert (report.count.removed, report.count.referenced, report.count.temporary) == (1, 1, 1)
    assert report.count.removed_bytes > orphan.size          # the sealed file: the plaintext and its tags
    assert report.count.examples == [orphan.blob_id]
    assert not blobs.path(orphan.blob_id).exists() and not half_written.exists()
    assert blobs.path(young_orphan.blob_id).exists() and young_half_written.exists()
    # The message a row refers to is whole.
    assert await blobs.read(mailbox_owner(mailbox_id), kept_id) == raw


async def test_a_body_left_behind_after_its_expunge_is_swept(
        database: Database, store: SqlMailStore, blobs: BlobStore, mailbox_id: int) -> None:
    # The expunge committed, the process died before unlinking the file: put the file back as the crash left it.
    inbox = FolderRef(mailbox_id, INBOX)
    uid = (await store.append(inbox, message(2, body=BIG), flags=["\\Deleted"])).uid
    [blob_id] = await _blob_ids(database, inbox)
    left = blobs.path(blob_id).read_bytes()
    await store.expunge(inbox)
    assert not blobs.path(blob_id).exists()
    blobs.path(blob_id).write_bytes(left)
    _age(blobs.path(blob_id), 2 * DAY)
    report = await BlobSweep(database, blobs, schema.metadata, min_age=dt.timedelta(days=1)).sweep()
    assert report.count.removed == 1 and not blobs.path(blob_id).exists()
    try:
        await blobs.read(mailbox_owner(mailbox_id), blob_id)
    except BlobNotFound:
        pass
    else:
        raise AssertionError(f"uid {uid}'s body is still readable")


async def _blob_ids(database: Database, folder: FolderRef) -> list[str]:
    def read(connection: Connection) -> list[str]:
        rows = connection.execute(select(Message.blob_id).join(Folder, Folder.id == Message.folder_id)
                                  .where(Folder.mailbox_id == folder.mailbox_id))
        return [blob_id for (blob_id,) in rows]

    return await database.run_in_transaction(read)


def test_gateway_blobs_sweep_on_a_running_gateway(gateway: GatewayProcess) -> None:
    blob_id = "abcd" + "0123456789abcdef0123456789ab"
    left = gateway.data_dir / "blobs" / "ab" / "cd" / blob_id
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"GWBL" + os.urandom(200))
    _age(left, 2 * DAY)

    rehearsal = gateway.cli("blobs", "sweep", "--dry-run", "--json", check=True)
    figures = json.loads(rehearsal.stdout)
    assert (figures["dry_run"], figures["removed"], figures["removed_bytes"]) == (True, 1, 204)
    assert left.exists()

    done = gateway.cli("blobs", "sweep", check=True)
    assert "removed: 1 blob file(s) no row refers to (204 bytes)" in done.stdout
    assert not left.exists()
    assert gateway.cli("blobs", "sweep", "--json", check=True).stdout.count('"removed": 0') == 1


def test_serve_sweeps_at_start(gateway: GatewayProcess) -> None:
    gateway.stop()
    left = gateway.data_dir / "blobs" / "fe" / "dc" / ("fedc" + "0" * 28)
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(b"GWBL" + os.urandom(50))
    _age(left, 2 * DAY)
    gateway.start()            # the sweep's first pass runs at start, then every retention.blob_sweep_interval_hours
    deadline = time.monotonic() + 30
    while "blob sweep: removed" not in gateway.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left.exists()
    assert "blob sweep: removed 1 blob file(s) no row refers to (54 bytes" in gateway.log_text()

"""Encryption at rest, piece by piece: sealed spool files, sealed fields, KEK rotation, crypto-shredding
of a closed patient space (a backup of its blob files and database does not open any more)."""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from gateway.config import Settings
from gateway.directory.demo import TEST_INS_OID
from gateway.directory.identifiers import add_nir_key
from gateway.directory.service import DirectoryService
from gateway.dmp_bridge.record import patient_owner
from gateway.queue.spool import KEEP_PLAINTEXT_BYTES, Spool
from gateway.security.at_rest import (
    SPOOL_SEGMENT,
    FieldSealer,
    SealedDataError,
    SpoolCipher,
    key_status,
)
from gateway.retention import shred_expired_patients
from gateway.security.keys import KekMissing, KeyDestroyed, KeyManager, mailbox_owner
from gateway.security.passwords import PasswordHasher
from gateway.storage.blobs import BlobStore, insert_inline
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Patient, PatientState, utcnow


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'gateway.db'}")
    (tmp_path / "data").mkdir(exist_ok=True)
    await database.migrate()
    yield database
    await database.dispose()


@pytest.fixture
def keys(db: Database, tmp_path: Path) -> KeyManager:
    return KeyManager(db, tmp_path / "keys")          # outside the data directory, as a key store would be


async def _spool(keys: KeyManager, root: Path) -> Spool:
    return Spool(root, await SpoolCipher.load(keys))


async def test_spool_files_are_sealed_and_read_back(keys: KeyManager, tmp_path: Path) -> None:
    spool = await _spool(keys, tmp_path / "spool")
    message = b"Subject: SECRET-SUBJECT\r\n\r\n" + b"SECRET-BODY line\r\n" * 20000       # several segments
    spool_file = spool.new_file()
    for offset in range(0, len(message), 1000):
        spool_file.write(message[offset:offset + 1000])
    with spool_file.open_incoming() as stream:
        assert stream.read() == message
    await spool_file.make_durable()
    on_disk = spool.path_of(spool_file.queue_id).read_bytes()
    assert b"SECRET" not in on_disk and len(on_disk) > len(message)
    with spool.open_read(spool_file.queue_id) as stream:
        assert stream.readline() == b"Subject: SECRET-SUBJECT\r\n" and stream.read() == message[25:]


async def test_a_small_message_is_kept_in_memory_and_its_file_created_sealed_when_made_durable(
        keys: KeyManager, tmp_path: Path) -> None:
    """Up to KEEP_PLAINTEXT_BYTES no file exists while DATA streams (created, written and fsynced in one
    worker-thread hop by sync_data); a larger message spills to its incoming file as it comes."""
    spool = await _spool(keys, tmp_path / "spool")
    small = b"Subject: SECRET-SMALL\r\n\r\nSECRET-BODY\r\n"
    spool_file = spool.new_file()
    spool_file.write(small)
    assert not spool_file.incoming_path.exists()
    assert spool_file.plaintext() == small
    with spool_file.open_incoming() as stream:
        assert stream.read() == small
    await spool_file.make_durable()
    on_disk = spool.path_of(spool_file.queue_id).read_bytes()
    assert b"SECRET" not in on_disk
    with spool.open_read(spool_file.queue_id) as stream:
        assert stream.read() == small

    large = spool.new_file()
    large.write(b"x" * (KEEP_PLAINTEXT_BYTES + 1))
    assert large.incoming_path.exists() and large.plaintext() is None
    large.discard()
    assert not large.incoming_path.exists()


# flip-salt / flip-prefix: the header changed after the cipher of the file was kept (SpoolCipher's recent
# files): the changed header names another file, whose cipher is derived anew and fails.
@pytest.mark.parametrize("damage", ["truncate-segment", "drop-last-segment", "flip-bit", "other-queue-id",
                                    "flip-salt", "flip-prefix"])
async def test_damaged_spool_files_do_not_open(keys: KeyManager, tmp_path: Path, damage: str) -> None:
    spool = await _spool(keys, tmp_path / "spool")
    spool_file = spool.new_file()
    spool_file.write(b"x" * (SPOOL_SEGMENT * 2 + 10))
    await spool_file.make_durable()
    path = spool.path_of(spool_file.queue_id)
    data = path.read_bytes()
    queue_id = spool_file.queue_id
    if damage == "truncate-segment":
        path.write_bytes(data[:-5])
    elif damage == "drop-last-segment":
        path.write_bytes(data[:-(10 + 16)])
    elif damage in ("flip-bit", "flip-salt", "flip-prefix"):
        with spool.reader(path, queue_id) as stream:                   # the intact file opens (its cipher kept)
            assert stream.read(10) == b"x" * 10
        at = {"flip-bit": 100, "flip-salt": 4 + 1 + 8 + 3, "flip-prefix": 4 + 1 + 8 + 16 + 2}[damage]
        path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    else:
        queue_id = "0" * len(queue_id)
    with pytest.raises(SealedDataError):
        with spool.reader(path, queue_id) as stream:
            stream.read()


async def test_unsealed_spool_files_from_before_still_read(keys: KeyManager, tmp_path: Path) -> None:
    spool = await _spool(keys, tmp_path / "spool")
    spool.path_of("0123456789abcdef").write_bytes(b"Subject: old\r\n\r\nbody\r\n")
    with spool.open_read("0123456789abcdef") as stream:
        assert stream.read() == b"Subject: old\r\n\r\nbody\r\n"


async def test_sealed_fields_are_bound_to_owner_and_column(keys: KeyManager) -> None:
    sealer = FieldSealer(keys)
    token = await sealer.seal("mailbox:1", "subject", "Résultats de biologie")
    assert token is not None and "biologie" not in token
    assert await sealer.open("mailbox:1", "subject", token) == "Résultats de biologie"
    assert await sealer.open("mailbox:1", "subject", "legacy clear text") == "legacy clear text"
    await keys.current_key("mailbox:2")
    for owner, column in (("mailbox:2", "subject"), ("mailbox:1", "from_addr")):
        with pytest.raises(SealedDataError):
            await sealer.open(owner, column, token)


async def test_kek_rotation_rewraps_without_touching_blobs(db: Database, keys: KeyManager, tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", keys)
    stored = await blobs.put(mailbox_owner(7), b"compte rendu")
    before = await key_status(db, keys)
    report = await keys.rotate_kek()
    retired = await keys.retire_unused_keks()
    after = await key_status(db, keys)
    assert retired == [before.current_kek] and after.kek_files == (report.kek_id,)
    assert after.data_keys_by_kek == {report.kek_id: report.rewrapped}
    fresh = KeyManager(db, tmp_path / "keys")                     # nothing cached: unwraps under the new KEK
    assert await BlobStore(tmp_path / "blobs", fresh).read(mailbox_owner(7), stored.blob_id) == b"compte rendu"


async def _closed_patient(db: Database, settings: Settings, days_ago: int) -> tuple[str, int]:
    directory = DirectoryService(db, settings, PasswordHasher.from_settings(settings.auth))
    await directory.ensure_local_domain(settings.directory.patient_domain, kind="patient")
    patient = await directory.add_patient(ins=add_nir_key("2790351215189"), ins_oid=TEST_INS_OID,
                                          birth_family_name="PAT-TROIS", first_given_name="DOMINIQUE",
                                          birth_date="1979-03-28", sex="F", birthplace_code="51215", password=None)
    async with db.session() as session:
        mailbox_id = await session.scalar(select(Mailbox.id).where(Mailbox.address == patient["mailbox"]))
        await session.execute(update(Patient).where(Patient.ins == patient["ins"]).values(
            state=PatientState.CLOSED.value, state_changed_at=utcnow() - dt.timedelta(days=days_ago)))
    return patient["ins"], mailbox_id


async def test_crypto_shredding_makes_backups_unreadable(db: Database, keys: KeyManager, settings: Settings,
                                                         tmp_path: Path) -> None:
    ins, mailbox_id = await _closed_patient(db, settings, days_ago=400)
    blobs = BlobStore(tmp_path / "blobs", keys)
    message = await blobs.put(mailbox_owner(mailbox_id), b"Compte rendu de la patiente")
    document = await blobs.put(patient_owner(ins), b"%PDF-1.4 dossier medical")
    delivered = await blobs.put(mailbox_owner(mailbox_id), b"Compte rendu livre", inline=True)  # in the database
    await db.run_in_transaction(lambda connection: insert_inline(connection, delivered), write=True)
    backup = tmp_path / "backup"                                     # the data directory, backed up: DB and blobs
    shutil.copytree(tmp_path / "blobs", backup / "blobs")
    with sqlite3.connect(tmp_path / "data" / "gateway.db") as source, sqlite3.connect(backup / "gateway.db") as copy:
        source.backup(copy)                                          # an online backup, WAL included

    assert await shred_expired_patients(db, keys, retention_days=500) == []     # not yet due
    shredded = await shred_expired_patients(db, keys, retention_days=365)
    assert [space.ins for space in shredded] == [ins] and shredded[0].keys_destroyed == 2
    assert await shred_expired_patients(db, keys, retention_days=365) == []     # idempotent

    live = BlobStore(backup / "blobs", KeyManager(db, tmp_path / "keys"))
    for owner, blob in ((mailbox_owner(mailbox_id), message), (patient_owner(ins), document),
                        (mailbox_owner(mailbox_id), delivered)):
        with pytest.raises(KeyDestroyed):
            await live.read(owner, blob.blob_id)
    restored = Database(f"sqlite+aiosqlite:///{backup / 'gateway.db'}")            # the old database, keys intact
    try:
        old = BlobStore(backup / "blobs", KeyManager(restored, tmp_path / "keys"))
        for owner, blob in ((mailbox_owner(mailbox_id), message), (patient_owner(ins), document),
                            (mailbox_owner(mailbox_id), delivered)):
            with pytest.raises(KekMissing):                              # wrapped under a KEK that was destroyed
                await old.read(owner, blob.blob_id)
    finally:
        await restored.dispose()


async def test_crypto_shredding_removes_the_search_index_of_the_patients_mailbox(db: Database, keys: KeyManager,
                                                                                  settings: Settings, tmp_path: Path) -> None:
    """The blind index's tokens (equalities and frequencies of a patient's headers) do not outlive the keys."""
    from sqlalchemy import func

    from gateway.mailstore.blind_index import BlindIndex, fold
    from gateway.mailstore.interface import FolderRef
    from gateway.mailstore.notify import ChangeHub
    from gateway.mailstore.sql import SqlMailStore
    from gateway.mailstore.tables import MessageTokens, TokenPostings
    from gateway.security.at_rest import FieldSealer, HeaderSealer

    ins, mailbox_id = await _closed_patient(db, settings, days_ago=400)
    store = SqlMailStore(db, BlobStore(tmp_path / "blobs", keys), ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    await store.create_folder(mailbox_id, "INBOX")
    await store.add_message(FolderRef(mailbox_id, "INBOX"),
                            b"From: Dr Martin <martin@x.test>\r\nSubject: Resultats de biologie\r\n\r\ncorps\r\n")
    await store.add_message(FolderRef(mailbox_id, "INBOX"),
                            b"From: Dr Martin <martin@x.test>\r\nSubject: Compte rendu\r\n\r\ncorps\r\n")
    assert await db.run_in_transaction(lambda connection: fold(connection, mailbox_id, limit=1), write=True) == 1
    tables = (MessageTokens, TokenPostings)     # one message posted, the other not yet
    async with db.session() as session:
        assert all([await session.scalar(select(func.count()).select_from(table)) for table in tables])
    assert [space.ins for space in await shred_expired_patients(db, keys, retention_days=365)] == [ins]
    async with db.session() as session:
        assert [await session.scalar(select(func.count()).select_from(table)) for table in tables] == [0, 0]
    assert isinstance(store.index, BlindIndex)

"""Encryption at rest: no plaintext on disk, tamper/swap/truncation detection, KEK rotation, crypto-shredding."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from gateway.security.keys import KeyDestroyed, KeyManager
from gateway.storage.blobs import (
    INLINE_MAX,
    SEGMENT_SIZE,
    BlobCorrupt,
    BlobNotFound,
    BlobStore,
    InlineBlob,
    StoredBlob,
    insert_inline,
    is_inline,
)

SECRET = b"Compte rendu: carcinome canalaire infiltrant, patient DUPONT Jean, INS 180017512345678"


def _every_file(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


async def test_no_plaintext_anywhere_under_the_data_directory(blobs: BlobStore, data_dir: Path) -> None:
    message = SECRET * 2000  # several segments
    stored = await blobs.put("mailbox:1", message)
    assert await blobs.read("mailbox:1", stored.blob_id) == message
    for path in _every_file(data_dir):
        content = path.read_bytes()
        assert b"carcinome" not in content, path
        assert b"DUPONT" not in content, path


async def test_kek_file_is_private(blobs: BlobStore, data_dir: Path) -> None:
    await blobs.put("mailbox:1", b"x")
    [kek] = list((data_dir / "keys").glob("kek-*.key"))
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600


async def test_blob_ids_are_random_not_content_addresses(blobs: BlobStore) -> None:
    first = await blobs.put("mailbox:1", SECRET)
    second = await blobs.put("mailbox:2", SECRET)
    assert first.blob_id != second.blob_id
    assert blobs.path(first.blob_id).read_bytes() != blobs.path(second.blob_id).read_bytes()


@pytest.mark.parametrize("size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE])
async def test_round_trip_at_segment_boundaries(blobs: BlobStore, size: int) -> None:
    payload = os.urandom(size)
    stored = await blobs.put("mailbox:1", payload)
    assert stored.size == size
    assert await blobs.read("mailbox:1", stored.blob_id) == payload


async def test_streams_from_a_file_and_reads_ranges(blobs: BlobStore, tmp_path: Path) -> None:
    payload = os.urandom(5 * SEGMENT_SIZE + 123)
    source = tmp_path / "spool.eml"
    source.write_bytes(payload)
    stored = await blobs.put("mailbox:1", source)
    reader = await blobs.open("mailbox:1", stored.blob_id)
    with reader:
        assert reader.size == len(payload)
        assert reader.read(SEGMENT_SIZE - 10, 30) == payload[SEGMENT_SIZE - 10: SEGMENT_SIZE + 20]
        assert reader.read(len(payload) - 5, 100) == payload[-5:]
        assert reader.read(len(payload) + 10, 5) == b""


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
async def test_any_range_matches_the_plaintext(blobs: BlobStore, data: st.DataObject) -> None:
    payload = bytes(range(256)) * (2 * SEGMENT_SIZE // 256 + 7)
    stored = await blobs.put("mailbox:1", io.BytesIO(payload))
    offset = data.draw(st.integers(0, len(payload)))
    length = data.draw(st.integers(0, len(payload)))
    assert await blobs.read("mailbox:1", stored.blob_id, offset, length) == payload[offset: offset + length]


async def test_tampering_is_detected(blobs: BlobStore) -> None:
    stored = await blobs.put("mailbox:1", SECRET * 100)
    path = blobs.path(stored.blob_id)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobCorrupt):
        await blobs.read("mailbox:1", stored.blob_id)


async def test_a_blob_cannot_be_swapped_between_owners_or_ids(blobs: BlobStore) -> None:
    victim = await blobs.put("mailbox:1", SECRET)
    other = await blobs.put("mailbox:2", b"harmless")
    with pytest.raises(BlobCorrupt):
        await blobs.read("mailbox:2", victim.blob_id)  # unknown key id for this owner, or wrong key
    blobs.path(other.blob_id).write_bytes(blobs.path(victim.blob_id).read_bytes())
    with pytest.raises(BlobCorrupt):
        await blobs.read("mailbox:2", other.blob_id)  # file moved into another mailbox's blob
    mine = await blobs.put("mailbox:1", b"mine")
    blobs.path(mine.blob_id).write_bytes(blobs.path(victim.blob_id).read_bytes())
    with pytest.raises(BlobCorrupt):
        await blobs.read("mailbox:1", mine.blob_id)  # same owner, same key, other blob id


async def test_truncation_is_detected_even_at_a_segment_boundary(blobs: BlobStore) -> None:
    stored = await blobs.put("mailbox:1", os.urandom(3 * SEGMENT_SIZE + 10))
    path = blobs.path(stored.blob_id)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - (10 + 16)])  # drop the whole last segment
    with pytest.raises(BlobCorrupt):
        await blobs.open("mailbox:1", stored.blob_id)


async def test_missing_blob(blobs: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blobs.read("mailbox:1", "0" * 32)


async def test_kek_rotation_rewraps_keys_and_old_blobs_still_read(blobs: BlobStore, keys: KeyManager,
                                                                  database: object, data_dir: Path) -> None:
    first = await blobs.put("mailbox:1", SECRET)
    second = await blobs.put("mailbox:2", SECRET + b"2")
    report = await keys.rotate_kek()
    assert report.kek_id == 2 and report.rewrapped == 2
    assert await keys.retire_unused_keks() == [1]
    assert not (data_dir / "keys" / "kek-1.key").exists()
    fresh = KeyManager(keys.database, data_dir / "keys")  # no cached keys: must unwrap under KEK 2
    fresh_blobs = BlobStore(blobs.root, fresh)
    assert await fresh_blobs.read("mailbox:1", first.blob_id) == SECRET
    assert await fresh_blobs.read("mailbox:2", second.blob_id) == SECRET + b"2"


async def test_crypto_shredding_makes_blobs_unreadable_forever(blobs: BlobStore, keys: KeyManager,
                                                               data_dir: Path) -> None:
    stored = await blobs.put("mailbox:7", SECRET)
    kept = await blobs.put("mailbox:8", SECRET)
    assert await keys.destroy_owner_key("mailbox:7") == 1
    with pytest.raises(KeyDestroyed):
        await blobs.read("mailbox:7", stored.blob_id)
    fresh = BlobStore(blobs.root, KeyManager(keys.database, data_dir / "keys"))
    with pytest.raises(KeyDestroyed):
        await fresh.read("mailbox:7", stored.blob_id)
    assert await fresh.read("mailbox:8", kept.blob_id) == SECRET
    again = await blobs.put("mailbox:7", b"new mail after shredding")  # a new key, old blobs stay dead
    assert await blobs.read("mailbox:7", again.blob_id) == b"new mail after shredding"


async def test_whole_reads_in_one_hop_keep_every_check(blobs: BlobStore, keys: KeyManager, data_dir: Path) -> None:
    """``read_whole`` (FETCH BODY[]: opened and read in one worker-thread hop when the data key is in memory)
    returns what ``read`` returns, key cached or not, and refuses a swapped, missing or shredded blob alike."""
    payload = SECRET * 3000                                    # several segments
    stored = await blobs.put("mailbox:1", payload)
    assert await blobs.read_whole("mailbox:1", stored.blob_id) == payload      # the key is cached by put
    cold = BlobStore(blobs.root, KeyManager(keys.database, data_dir / "keys"))
    assert await cold.read_whole("mailbox:1", stored.blob_id) == payload        # unwrapped on the event loop
    other = await blobs.put("mailbox:2", b"harmless")
    await blobs.read("mailbox:2", other.blob_id)               # mailbox:2's key in memory too
    with pytest.raises(BlobCorrupt):
        await blobs.read_whole("mailbox:2", stored.blob_id)    # another owner's blob: never its key
    mine = await blobs.put("mailbox:1", b"mine")
    blobs.path(mine.blob_id).write_bytes(blobs.path(stored.blob_id).read_bytes())
    with pytest.raises(BlobCorrupt):
        await blobs.read_whole("mailbox:1", mine.blob_id)      # same key, other blob id
    with pytest.raises(BlobNotFound):
        await blobs.read_whole("mailbox:1", "0" * 32)
    await keys.destroy_owner_key("mailbox:2")
    with pytest.raises(KeyDestroyed):
        await blobs.read_whole("mailbox:2", other.blob_id)


async def test_many_blobs_in_one_hop_each_under_its_owner_and_a_failure_keeps_the_others(
        blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """``put_many`` (a filing batch's documents): every blob written and readable by its owner only; an item
    that fails is reported in its place while the others are written (so their writer can release them)."""
    stored = await blobs.put_many([("patient:1", SECRET), ("patient:2", b"second"), ("patient:1", SECRET * 3000)])
    assert all(not isinstance(blob, Exception) for blob in stored)
    first, second, large = stored
    assert isinstance(first, StoredBlob) and isinstance(second, StoredBlob) and isinstance(large, StoredBlob)
    assert await blobs.read("patient:1", first.blob_id) == SECRET
    assert await blobs.read("patient:1", large.blob_id) == SECRET * 3000
    assert await blobs.read("patient:2", second.blob_id) == b"second"
    with pytest.raises(BlobCorrupt):
        await blobs.read("patient:1", second.blob_id)
    original = blobs._put_blocking

    def failing(owner: str, key_id: int, key: bytes, source: object) -> StoredBlob:
        if source == b"disk full":
            raise OSError(28, "No space left on device")
        return original(owner, key_id, key, source)  # type: ignore[arg-type]

    monkeypatch.setattr(blobs, "_put_blocking", failing)
    before, failed, after = await blobs.put_many([("patient:1", b"before"), ("patient:1", b"disk full"),
                                                  ("patient:1", b"after")])
    assert isinstance(failed, OSError)
    assert isinstance(before, StoredBlob) and isinstance(after, StoredBlob)
    assert await blobs.read("patient:1", before.blob_id) == b"before"
    assert await blobs.read("patient:1", after.blob_id) == b"after"
    assert await blobs.put_many([]) == []


# ---------------------------------------------------------------- inline blobs (kept in the database)

async def _store_inline(blobs: BlobStore, owner: str, payload: bytes) -> StoredBlob:
    stored = await blobs.put(owner, payload, inline=True)
    await blobs.keys.database.run_in_transaction(lambda connection: insert_inline(connection, stored), write=True)
    return stored


async def _sealed_of(blobs: BlobStore, blob_id: str) -> bytes:
    async with blobs.keys.database.session() as session:
        return bytes(await session.scalar(select(InlineBlob.sealed).where(InlineBlob.blob_id == blob_id)))


async def _overwrite(blobs: BlobStore, blob_id: str, sealed: bytes) -> None:
    async with blobs.keys.database.session() as session:
        await session.execute(update(InlineBlob).where(InlineBlob.blob_id == blob_id).values(sealed=sealed))


@pytest.mark.parametrize("size", [0, 1, 4096, INLINE_MAX])
async def test_a_small_body_is_sealed_inline_and_read_by_every_reader(blobs: BlobStore, data_dir: Path,
                                                                        size: int) -> None:
    """No file: the same sealed format in a database row, read back by ``read``/``read_whole``/``open``/
    ``read_then`` alike, never in clear in the row."""
    payload = (SECRET * (size // len(SECRET) + 1))[:size]
    stored = await _store_inline(blobs, "mailbox:1", payload)
    assert is_inline(stored.blob_id) and len(stored.blob_id) == 32 and stored.size == size
    assert _every_file(data_dir / "blobs") == []
    sealed = await _sealed_of(blobs, stored.blob_id)
    assert sealed.startswith(b"GWBL\x01") and (size == 0 or b"carcinome" not in sealed)
    assert await blobs.read_whole("mailbox:1", stored.blob_id) == payload
    assert await blobs.read("mailbox:1", stored.blob_id, 3, 20) == payload[3:23]
    assert await blobs.read_then("mailbox:1", stored.blob_id, len) == size
    with await blobs.open("mailbox:1", stored.blob_id) as reader:
        assert reader.size == size and reader.read() == payload


async def test_a_body_over_the_inline_limit_or_a_stream_is_still_a_file(blobs: BlobStore) -> None:
    large = await blobs.put("mailbox:1", os.urandom(INLINE_MAX + 1), inline=True)
    streamed = await blobs.put("mailbox:1", io.BytesIO(SECRET), inline=True)
    for stored in (large, streamed):
        assert stored.sealed is None and not is_inline(stored.blob_id) and blobs.path(stored.blob_id).is_file()


async def test_an_inline_blob_refuses_tampering_swaps_and_shredding(blobs: BlobStore, keys: KeyManager,
                                                                    data_dir: Path) -> None:
    victim = await _store_inline(blobs, "mailbox:1", SECRET)
    with pytest.raises(BlobCorrupt):
        await blobs.read_whole("mailbox:2", victim.blob_id)               # another owner
    mine = await _store_inline(blobs, "mailbox:1", b"mine")
    await _overwrite(blobs, mine.blob_id, await _sealed_of(blobs, victim.blob_id))
    with pytest.raises(BlobCorrupt):
        await blobs.read_whole("mailbox:1", mine.blob_id)                 # same key, other blob id
    damaged = bytearray(await _sealed_of(blobs, victim.blob_id))
    damaged[-20] ^= 0x01
    other = await _store_inline(blobs, "mailbox:1", SECRET)
    await _overwrite(blobs, other.blob_id, bytes(damaged))
    with pytest.raises(BlobCorrupt):
        await blobs.read("mailbox:1", other.blob_id)
    with pytest.raises(BlobNotFound):
        await blobs.read_whole("mailbox:1", "i" + "0" * 31)
    assert await keys.destroy_owner_key("mailbox:1") == 1
    cold = BlobStore(blobs.root, KeyManager(keys.database, data_dir / "keys"))
    for reader in (blobs, cold):
        with pytest.raises(KeyDestroyed):
            await reader.read_whole("mailbox:1", victim.blob_id)


async def test_deleting_an_inline_blob_removes_its_row(blobs: BlobStore) -> None:
    stored = await _store_inline(blobs, "mailbox:1", SECRET)
    await blobs.delete(stored.blob_id)
    with pytest.raises(BlobNotFound):
        await blobs.read_whole("mailbox:1", stored.blob_id)
    unwritten = await blobs.put("mailbox:1", SECRET, inline=True)        # its row never committed: nothing to do
    await blobs.discard(unwritten)

"""Key management for encryption at rest: KEK files, wrapped per-owner data keys, crypto-shredding.

Two levels (envelope encryption, NIST SP 800-57 key hierarchy):

- a key-encryption key (KEK) lives *outside* the database, in
  ``<data_dir>/keys/kek-<id>.key`` (32 random bytes, mode 0600). Several
  versions can coexist; the highest id is the current one.
- a data key per owner (``mailbox:<id>``; later ``patient:<id>``) encrypts that
  owner's blobs. It is stored in the ``data_keys`` table wrapped by a KEK with
  AES-256-GCM, the owner bound as associated data, so a wrapped key copied to
  another owner's row does not unwrap.

A stolen database alone, or a stolen blob directory alone, reveals nothing.
``rotate_kek`` re-wraps every data key under a new KEK, batch by batch, while
readers keep working (each row names its KEK). ``destroy_owner_key`` erases the
wrapped key: every blob of that owner is unreadable for good (crypto-shredding).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select, update

from gateway.mailstore.tables import DataKey
from gateway.storage.db import Database
from gateway.storage.models import utcnow

KEY_BYTES = 32  # AES-256
WRAP_NONCE_BYTES = 12
KEK_FILE = re.compile(r"^kek-(\d+)\.key$")
REWRAP_BATCH = 200


class KeyManagementError(Exception):
    """Base of key-management failures."""


class KeyDestroyed(KeyManagementError):
    """The owner's data key was crypto-shredded: what it encrypted is gone for good."""


class KekMissing(KeyManagementError):
    """A data key is wrapped under a KEK whose file is absent (restore the keys directory)."""


class UnknownDataKey(KeyManagementError):
    """No data key with this id belongs to this owner."""


def mailbox_owner(mailbox_id: int) -> str:
    """The key owner of a hosted mailbox's blobs."""
    return f"mailbox:{mailbox_id}"


def _wrap_aad(owner: str) -> bytes:
    return b"gateway-data-key\x00" + owner.encode()


def wrap_key(kek: bytes, owner: str, data_key: bytes) -> bytes:
    nonce = secrets.token_bytes(WRAP_NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(owner))


def unwrap_key(kek: bytes, owner: str, wrapped: bytes) -> bytes:
    nonce, sealed = wrapped[:WRAP_NONCE_BYTES], wrapped[WRAP_NONCE_BYTES:]
    return AESGCM(kek).decrypt(nonce, sealed, _wrap_aad(owner))


class KekRing:
    """The KEK files of one data directory. Generates ``kek-1`` on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def ids(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (KEK_FILE.match(path.name) for path in self.directory.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def current_id(self) -> int:
        existing = self.ids()
        return existing[-1] if existing else self.create()

    def path(self, kek_id: int) -> Path:
        return self.directory / f"kek-{kek_id}.key"

    def key(self, kek_id: int) -> bytes:
        try:
            material = self.path(kek_id).read_bytes()
        except FileNotFoundError:
            raise KekMissing(f"key-encryption key {kek_id} is missing from {self.directory}") from None
        if len(material) != KEY_BYTES:
            raise KekMissing(f"key-encryption key file {self.path(kek_id)} is damaged")
        return material

    def create(self) -> int:
        """Write the next KEK version (O_EXCL: two processes never share an id)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = self.ids()
        kek_id = (existing[-1] if existing else 0) + 1
        while True:
            try:
                _write_secret(self.path(kek_id), secrets.token_bytes(KEY_BYTES))
                return kek_id
            except FileExistsError:
                kek_id += 1

    def remove(self, kek_id: int) -> None:
        self.path(kek_id).unlink(missing_ok=True)


def _write_secret(path: Path, material: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, material)
        os.fsync(fd)
    finally:
        os.close(fd)
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


@dataclass(frozen=True)
class DataKeyMaterial:
    key_id: int
    key: bytes


@dataclass(frozen=True)
class RotationReport:
    kek_id: int
    rewrapped: int


class KeyManager:
    """Hands out per-owner data keys, unwrapped in memory only while the process runs."""

    def __init__(self, database: Database, keys_dir: Path) -> None:
        self.database = database
        self.keks = KekRing(keys_dir)
        self._unwrapped: dict[tuple[str, int], bytes] = {}
        self._current: dict[str, int] = {}
        self._creation_locks: dict[str, asyncio.Lock] = {}

    async def current_key(self, owner: str) -> DataKeyMaterial:
        """The key new blobs of ``owner`` are encrypted with; created on first use."""
        key_id = self._current.get(owner)
        if key_id is None:
            lock = self._creation_locks.setdefault(owner, asyncio.Lock())
            async with lock:
                key_id = self._current.get(owner) or await self._latest_or_new(owner)
                self._current[owner] = key_id
        return DataKeyMaterial(key_id, await self.key(owner, key_id))

    def cached_key(self, owner: str, key_id: int) -> bytes | None:
        """The data key ``key_id`` of ``owner`` if it is unwrapped in memory already (no database read), else None."""
        return self._unwrapped.get((owner, key_id))

    async def key(self, owner: str, key_id: int) -> bytes:
        """The data key ``key_id`` of ``owner``; KeyDestroyed once shredded."""
        cached = self._unwrapped.get((owner, key_id))
        if cached is not None:
            return cached
        async with self.database.session() as session:
            row = await session.get(DataKey, key_id)
        if row is None or row.owner != owner:
            raise UnknownDataKey(f"no data key {key_id} for {owner}")
        if row.wrapped_key is None or row.kek_id is None:
            raise KeyDestroyed(f"the data key of {owner} was destroyed on {row.destroyed_at:%Y-%m-%d}")
        material = self._unwrap(row)
        self._unwrapped[(owner, key_id)] = material
        return material

    async def destroy_owner_key(self, owner: str) -> int:
        """Crypto-shred every data key of ``owner``; returns how many were destroyed."""
        async with self.database.session() as session:
            result = await session.execute(
                update(DataKey)
                .where(DataKey.owner == owner, DataKey.destroyed_at.is_(None))
                .values(wrapped_key=None, kek_id=None, destroyed_at=utcnow())
            )
        self._forget(owner)
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def rotate_kek(self) -> RotationReport:
        """Create a new KEK and re-wrap every live data key under it; blobs are untouched.

        Batches commit one by one, so readers and writers never wait long; a row
        names its KEK, so keys not yet re-wrapped still unwrap with the old one.
        """
        new_kek_id = await asyncio.to_thread(self.keks.create)
        new_kek = self.keks.key(new_kek_id)
        rewrapped = 0
        while batch := await self._rewrap_batch(new_kek_id, new_kek):
            rewrapped += batch
        return RotationReport(new_kek_id, rewrapped)

    async def retire_unused_keks(self) -> list[int]:
        """Delete the files of old KEKs that no data key uses any more (after a rotation)."""
        async with self.database.session() as session:
            in_use = set((await session.scalars(select(DataKey.kek_id).distinct())).all())
        current = self.keks.current_id()
        retired = [kek_id for kek_id in self.keks.ids() if kek_id != current and kek_id not in in_use]
        for kek_id in retired:
            self.keks.remove(kek_id)
        return retired

    async def _latest_or_new(self, owner: str) -> int:
        async with self.database.session() as session:
            latest = await session.scalar(
                select(func.max(DataKey.id)).where(DataKey.owner == owner, DataKey.destroyed_at.is_(None))
            )
            if latest is not None:
                return int(latest)
            kek_id = await asyncio.to_thread(self.keks.current_id)
            material = secrets.token_bytes(KEY_BYTES)
            row = DataKey(owner=owner, wrapped_key=wrap_key(self.keks.key(kek_id), owner, material), kek_id=kek_id)
            session.add(row)
            await session.flush()
        self._unwrapped[(owner, row.id)] = material
        return row.id

    async def _rewrap_batch(self, new_kek_id: int, new_kek: bytes) -> int:
        async with self.database.session() as session:
            rows = (await session.scalars(
                select(DataKey)
                .where(DataKey.kek_id.is_not(None), DataKey.kek_id != new_kek_id)
                .order_by(DataKey.id)
                .limit(REWRAP_BATCH)
            )).all()
            for row in rows:
                row.wrapped_key = wrap_key(new_kek, row.owner, self._unwrap(row))
                row.kek_id = new_kek_id
        return len(rows)

    def _unwrap(self, row: DataKey) -> bytes:
        assert row.wrapped_key is not None and row.kek_id is not None
        try:
            return unwrap_key(self.keks.key(row.kek_id), row.owner, row.wrapped_key)
        except InvalidTag:
            raise KekMissing(f"data key {row.id} does not unwrap under KEK {row.kek_id} (wrong or damaged key file)") from None

    def forget_cached(self, owner: str) -> None:
        """Drop ``owner``'s unwrapped keys from this process (another process or node destroyed them)."""
        self._forget(owner)

    async def destroyed_since(self, since: dt.datetime) -> set[str]:
        """Owners whose data keys were destroyed at or after ``since`` (by any process or node)."""
        async with self.database.session() as session:
            return set((await session.scalars(select(DataKey.owner).where(DataKey.destroyed_at >= since))).all())

    def _forget(self, owner: str) -> None:
        self._current.pop(owner, None)
        for cached in [entry for entry in self._unwrapped if entry[0] == owner]:
            del self._unwrapped[cached]

"""The blob store: immutable message bodies, encrypted at rest, streamed in segments.

File layout, version 1 (all integers big-endian)::

    header   magic "GWBL" | version u8 | data key id u64 | salt 16 | nonce prefix 7 | segment size u32
    segments AES-256-GCM(segment plaintext) || tag 16, every segment but the last of exactly
             ``segment size`` plaintext bytes; the last holds 0..segment size bytes.

Each blob gets its own key, HKDF-SHA256(owner data key, salt, owner + blob id),
so nonces never repeat across blobs whatever their number. Segment i uses the
nonce ``prefix || i (u32) || last (u8)``: the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár (CRYPTO 2015, as in Tink's streaming AEAD). Dropping, reordering or
appending segments breaks authentication, and so does truncating at a segment
boundary, because the new last segment was sealed with last=0. Every segment also
authenticates the header, the owner and the blob id, so a file moved to another
mailbox or renamed to another blob id does not decrypt.

The blob id is random, never a hash of the content: a content address would tell
anyone with the directory listing which mailboxes received the same document.
Writes go to a temporary file, are fsynced, renamed into a sharded directory
(``ab/cd/<id>``), and the directory is fsynced: once ``put`` returns the body
survives a power cut (a 250 after DATA depends on it).

Inline blobs: a body of at most ``INLINE_MAX`` octets that a caller stores with a database row (a local
delivery, an APPEND) may be sealed in memory instead (``put(..., inline=True)``): the very same bytes
as its file would hold (header, one segment), returned in ``StoredBlob.sealed`` for the caller to insert
with ``insert_inline`` in the transaction that adds the row pointing at it, so it is durable with that
commit (one WAL fsync for a batch of deliveries, where a file cost a write, two fsyncs and a rename).
Its id is ``i`` + 31 hex digits, never a file name; every reader (``open``, ``read``, ``read_whole``,
``read_then``) and ``delete`` take both kinds alike. The owner's data key seals both: shredding it makes
an inline blob unreadable as it does a file, in the database and in every backup of it.
"""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import LargeBinary, String, Table, bindparam, delete, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapped, mapped_column

from gateway.security.keys import KeyManager, UnknownDataKey
from gateway.security.nonces import nonce_bytes, nonce_hex
from gateway.security.segments import SegmentAead
from gateway.storage.db import Database
from gateway.storage.models import Base
from gateway.storage.prepared import Prepared
from gateway.storage.private import PRIVATE_DIR, PRIVATE_FILE, private_dir

T = TypeVar("T")

MAGIC = b"GWBL"
VERSION = 1
HEADER = struct.Struct("!4sBQ16s7sI")
SALT_BYTES = 16
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
SEGMENT_SIZE = 64 * 1024
COPY_CHUNK = 1024 * 1024
INLINE_PREFIX = "i"
INLINE_MAX = SEGMENT_SIZE          # plaintext octets of an inline blob: one segment, sealed in memory



class InlineBlob(Base):
    """A small blob kept in the database instead of a file (ids ``i`` + 31 hex digits; see the module's text).

    The same sealed bytes as a blob file (header, one AES-256-GCM segment, under a key derived from the owner's
    data key and bound to owner and blob id): crypto-shredding the owner's data key makes it unreadable, here
    and in every backup. Written in the transaction that adds the row pointing at it (``insert_inline``), so it
    is as durable as that row. Its Alembic revision is the mail store's (``0025_delivery_inline_blobs``).
    """

    __tablename__ = "inline_blobs"

    blob_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)


_INLINE = cast(Table, InlineBlob.__table__)
_INSERT_INLINE = Prepared(insert(_INLINE))
_SELECT_INLINE = Prepared(select(_INLINE.c.sealed).where(_INLINE.c.blob_id == bindparam("blob")))
_DELETE_INLINE = Prepared(delete(_INLINE).where(_INLINE.c.blob_id == bindparam("blob")))

BlobSource = bytes | Path | BinaryIO


class BlobError(Exception):
    """A blob cannot be read."""


class BlobNotFound(BlobError):
    """No file for this blob id."""


class BlobCorrupt(BlobError):
    """The file fails authentication: damaged, truncated, tampered with, or not this owner's."""


@dataclass(frozen=True)
class StoredBlob:
    blob_id: str
    size: int  # plaintext octets
    sealed: bytes | None = None  # an inline blob's sealed bytes, for ``insert_inline`` in the row's transaction


def is_inline(blob_id: str) -> bool:
    """An inline blob's id (kept in the database, ``inline_blobs``), not a file's."""
    return blob_id.startswith(INLINE_PREFIX)


def insert_inline(connection: Connection, stored: StoredBlob) -> None:
    """Write an inline blob, in the transaction that adds the row referencing it (durable with that commit)."""
    assert stored.sealed is not None and is_inline(stored.blob_id)
    _INSERT_INLINE.run(connection, {"blob_id": stored.blob_id, "sealed": stored.sealed})


def delete_inline(connection: Connection, blob_ids: Iterable[str]) -> None:
    """Delete the inline blobs among ``blob_ids`` in the caller's transaction (files are left to ``delete``)."""
    for blob_id in blob_ids:
        if is_inline(blob_id):
            _DELETE_INLINE.run(connection, {"blob": blob_id})


class _InlineReads:
    """Inline blobs' sealed bytes by id. On a SQLite file, read on a private read-only connection in the
    calling (event loop's) thread: one primary-key read in WAL mode never waits for the writer (a reader has
    its own snapshot) and takes microseconds, where a database-thread hop costs a transaction's set-up and
    two thread switches, more than the file read it replaces. Elsewhere (PostgreSQL), a read transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._connection: sqlite3.Connection | None = None

    async def sealed(self, blob_id: str) -> bytes:
        if self.database.sqlite_file is not None:
            try:
                return self._read_here(self.database.sqlite_file, blob_id)
            except sqlite3.Error:          # busy, or not migrated yet: the engine's way, which waits
                pass
        return await self.database.run_in_transaction(lambda connection: _select_inline(connection, blob_id))

    def _read_here(self, path: str, blob_id: str) -> bytes:
        if self._connection is None:
            self._connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0,
                                               isolation_level=None, check_same_thread=False)
        # fetchall: a statement left unfinished would keep its snapshot, and stop checkpoints emptying the WAL.
        rows = self._connection.execute("SELECT sealed FROM inline_blobs WHERE blob_id = ?", (blob_id,)).fetchall()
        if not rows:
            raise BlobNotFound(f"no inline blob {blob_id}")
        return bytes(rows[0][0])

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _select_inline(connection: Connection, blob_id: str) -> bytes:
    row = _SELECT_INLINE.run(connection, {"blob": blob_id}).fetchone()
    if row is None:
        raise BlobNotFound(f"no inline blob {blob_id}")
    return bytes(row[0])


@dataclass(frozen=True)
class _Header:
    key_id: int
    salt: bytes
    nonce_prefix: bytes
    segment_size: int

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.key_id, self.salt, self.nonce_prefix, self.segment_size)

    @classmethod
    def unpack(cls, raw: bytes) -> _Header:
        if len(raw) < HEADER.size:
            raise BlobCorrupt("blob shorter than its header")
        magic, version, key_id, salt, prefix, segment_size = HEADER.unpack(raw[: HEADER.size])
        if magic != MAGIC:
            raise BlobCorrupt("not a blob file (bad magic)")
        if version != VERSION:
            raise BlobCorrupt(f"unsupported blob format version {version}")
        if not 0 < segment_size <= 16 * 1024 * 1024:
            raise BlobCorrupt("implausible segment size")
        return cls(key_id, salt, prefix, segment_size)


def _segment_cipher(data_key: bytes, header: _Header, owner: str, blob_id: str) -> SegmentAead:
    """The segments of one blob: a key of its own (HKDF over the owner's data key), bound to owner and id."""
    binding = owner.encode() + b"\x00" + blob_id.encode()
    blob_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=header.salt, info=b"gateway-blob-v1\x00" + binding
    ).derive(data_key)
    return SegmentAead(blob_key, header.nonce_prefix, header.pack() + b"\x00" + binding,
                       failure=lambda index: BlobCorrupt(f"segment {index} fails authentication"))


def seal_whole(owner: str, key_id: int, data_key: bytes, plaintext: bytes) -> StoredBlob:
    """An inline blob: ``plaintext`` (at most ``INLINE_MAX`` octets) sealed in memory, as its file would hold it."""
    if len(plaintext) > INLINE_MAX:
        raise ValueError(f"an inline blob holds at most {INLINE_MAX} octets")
    blob_id = INLINE_PREFIX + nonce_hex(16)[1:]
    header = _Header(key_id, nonce_bytes(SALT_BYTES), nonce_bytes(NONCE_PREFIX_BYTES), SEGMENT_SIZE)
    cipher = _segment_cipher(data_key, header, owner, blob_id)
    return StoredBlob(blob_id, len(plaintext), header.pack() + cipher.seal(0, plaintext, True))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """Encrypts a stream segment by segment into a temporary file; ``commit`` makes it durable.

    Synchronous (file I/O and fsync): run it in a worker thread.
    """

    def __init__(self, store: BlobStore, owner: str, key_id: int, data_key: bytes) -> None:
        self.blob_id = nonce_hex(16)
        self._store = store
        self._header = _Header(key_id, nonce_bytes(SALT_BYTES), nonce_bytes(NONCE_PREFIX_BYTES),
                               SEGMENT_SIZE)
        self._cipher = _segment_cipher(data_key, self._header, owner, self.blob_id)
        self._pending = bytearray()
        self._index = 0
        self._size = 0
        self._temp_path = store.temp_dir / f"{self.blob_id}.tmp"
        fd = os.open(self._temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        self._file = os.fdopen(fd, "wb")  # closed in commit/abort
        self._file.write(self._header.pack())

    def write(self, data: bytes) -> None:
        self._pending += data
        self._size += len(data)
        # Keep at least one byte back: the last segment must be sealed with last=1.
        while len(self._pending) > SEGMENT_SIZE:
            self._emit(bytes(self._pending[:SEGMENT_SIZE]), last=False)
            del self._pending[:SEGMENT_SIZE]

    def commit(self) -> StoredBlob:
        self._emit(bytes(self._pending), last=True)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final_path = self._store.path(self.blob_id)
        created = self._store.ensure_shard(final_path.parent)
        os.replace(self._temp_path, final_path)
        for directory in [final_path.parent, *created]:
            _fsync_directory(directory)
        return StoredBlob(self.blob_id, self._size)

    def abort(self) -> None:
        self._file.close()
        self._temp_path.unlink(missing_ok=True)

    def _emit(self, plaintext: bytes, *, last: bool) -> None:
        self._file.write(self._cipher.seal(self._index, plaintext, last))
        self._index += 1


class BlobReader:
    """Random access to a blob's plaintext: a range read decrypts only the segments it covers.

    The last segment is authenticated when the reader opens, so ``size`` is
    trustworthy and a truncated file is refused up front. Synchronous: run in a thread.
    """

    def __init__(self, file: BinaryIO, header: _Header, cipher: SegmentAead, file_size: int) -> None:
        self._file = file
        self._cipher = cipher
        self._segment_size = header.segment_size
        sealed_size = header.segment_size + TAG_BYTES
        body = file_size - HEADER.size
        self._segments = max(1, -(-body // sealed_size))
        last_sealed = body - (self._segments - 1) * sealed_size
        if last_sealed < TAG_BYTES:
            raise BlobCorrupt("blob truncated inside its last segment")
        self.size = body - self._segments * TAG_BYTES
        self._last_plain: bytes | None = None
        self._last_plain = self._read_segment(self._segments - 1)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        return b"".join(self.iter_range(offset, length))

    def iter_range(self, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the plaintext of [offset, offset+length) one segment at a time."""
        end = self.size if length is None else min(self.size, offset + length)
        position = max(0, offset)
        while position < end:
            index, skip = divmod(position, self._segment_size)
            plain = self._read_segment(index)
            piece = plain[skip: skip + (end - position)]
            yield piece
            position += len(piece)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _read_segment(self, index: int) -> bytes:
        last = index == self._segments - 1
        if last and self._last_plain is not None:
            return self._last_plain
        sealed_size = self._segment_size + TAG_BYTES
        self._file.seek(HEADER.size + index * sealed_size)
        sealed = self._file.read(sealed_size)
        if not last and len(sealed) != sealed_size:
            raise BlobCorrupt(f"segment {index} is short")
        return self._cipher.open(index, sealed, last)


class BlobStore:
    """Encrypted blobs under ``root`` (``<data_dir>/blobs``), keyed per owner by ``keys``."""

    def __init__(self, root: Path, keys: KeyManager) -> None:
        self.root = root
        self.keys = keys
        self.temp_dir = root / "tmp"
        self._shards: set[str] = set()      # "abcd" of the shard directories known to exist (at most 65,536)
        self._inline = _InlineReads(keys.database)
        private_dir(self.root)
        private_dir(self.temp_dir)

    def path(self, blob_id: str) -> Path:
        if len(blob_id) != 32 or not all(c in "0123456789abcdef" for c in blob_id):
            raise BlobNotFound(f"malformed blob id {blob_id!r}")
        return self.root / blob_id[:2] / blob_id[2:4] / blob_id

    def ensure_shard(self, shard: Path) -> list[Path]:
        """Create the shard directories; returns the parents whose entries changed (to fsync). A shard seen
        once is not looked at again (two ``stat`` calls a blob, each a GIL release in a worker thread)."""
        known = shard.parent.name + shard.name
        if known in self._shards:
            return []
        changed: list[Path] = []
        for directory in (shard.parent, shard):
            if not directory.is_dir():
                directory.mkdir(mode=PRIVATE_DIR, exist_ok=True)
                changed.append(directory.parent)
        self._shards.add(known)
        return changed

    async def put(self, owner: str, source: BlobSource, *, inline: bool = False) -> StoredBlob:
        """Encrypt ``source`` (bytes, a file path or a binary stream) as a new durable blob of ``owner``.

        ``inline``: bytes of at most ``INLINE_MAX`` octets are sealed in memory, right here (no file, no thread
        hop); the caller must ``insert_inline`` the result in the transaction of the row that references it."""
        material = await self.keys.current_key(owner)
        if inline and _fits_inline(source):
            return seal_whole(owner, material.key_id, material.key, bytes(cast(bytes, source)))
        # One worker-thread hop for create + encrypt + fsync (three hops cost more than a 4 KB body's encryption).
        return await asyncio.to_thread(self._put_blocking, owner, material.key_id, material.key, source)

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[StoredBlob | Exception]:
        """``put`` of several (owner, body) in one worker-thread hop, one after the other, each fsynced with its
        directory before this returns (a filing batch's documents: a hop per group of blobs rather than per
        blob). Each item's blob, or the error that stopped it: the others are written regardless, so that the
        caller knows every blob it has to release."""
        keys = {owner: await self.keys.current_key(owner) for owner in {owner for owner, _body in items}}

        def work() -> list[StoredBlob | Exception]:
            results: list[StoredBlob | Exception] = []
            for owner, body in items:
                try:
                    results.append(self._put_blocking(owner, keys[owner].key_id, keys[owner].key, body))
                except Exception as error:  # noqa: BLE001 - reported to the caller with its item
                    results.append(error)
            return results

        return await asyncio.to_thread(work) if items else []

    async def put_prepared(self, owner: str, prepare: Callable[[], tuple[T, BlobSource]], *,
                           inline: bool = False) -> tuple[T, StoredBlob]:
        """``put`` of the source ``prepare()`` returns beside its other result, both in the same worker-thread hop
        (an APPEND's header parse and its blob write); ``inline`` as for ``put``."""
        material = await self.keys.current_key(owner)

        def work() -> tuple[T, StoredBlob]:
            result, source = prepare()
            if inline and _fits_inline(source):
                return result, seal_whole(owner, material.key_id, material.key, bytes(cast(bytes, source)))
            return result, self._put_blocking(owner, material.key_id, material.key, source)

        return await asyncio.to_thread(work)

    def _put_blocking(self, owner: str, key_id: int, key: bytes, source: BlobSource) -> StoredBlob:
        writer = BlobWriter(self, owner, key_id, key)
        try:
            _copy_into(source, writer)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    async def open(self, owner: str, blob_id: str) -> BlobReader:
        """A reader of ``owner``'s blob; BlobCorrupt when it is not theirs or was tampered with."""
        if is_inline(blob_id):
            return await self._open_inline(owner, blob_id, await self._fetch_inline(blob_id))
        path = self.path(blob_id)
        opened = await asyncio.to_thread(self._open_known, path, owner, blob_id)
        if isinstance(opened, BlobReader):
            return opened
        file, header, file_size = opened
        try:
            data_key = await self._data_key(owner, header.key_id)
            cipher = _segment_cipher(data_key, header, owner, blob_id)
            return await asyncio.to_thread(BlobReader, file, header, cipher, file_size)
        except BaseException:
            file.close()
            raise

    async def _fetch_inline(self, blob_id: str) -> bytes:
        return await self._inline.sealed(blob_id)

    async def _open_inline(self, owner: str, blob_id: str, sealed: bytes) -> BlobReader:
        """A reader of an inline blob's sealed bytes (one segment: opened in the event loop, no thread hop)."""
        header = _Header.unpack(sealed)
        data_key = self.keys.cached_key(owner, header.key_id)
        if data_key is None:
            data_key = await self._data_key(owner, header.key_id)
        return BlobReader(io.BytesIO(sealed), header, _segment_cipher(data_key, header, owner, blob_id), len(sealed))

    def _open_known(self, path: Path, owner: str, blob_id: str) -> BlobReader | tuple[BinaryIO, _Header, int]:
        """In one worker-thread hop: the reader when the owner's data key named by the header is in memory
        already (the usual case), else the open file and its header (the key is fetched on the event loop)."""
        file, header, file_size = _open_with_header(path)
        data_key = self.keys.cached_key(owner, header.key_id)
        if data_key is None:
            return file, header, file_size
        try:
            return BlobReader(file, header, _segment_cipher(data_key, header, owner, blob_id), file_size)
        except BaseException:
            file.close()
            raise

    async def read_whole(self, owner: str, blob_id: str) -> bytes:
        """A blob's whole plaintext; one worker-thread hop when the owner's data key is in memory (an inline
        blob: one database hop)."""
        if is_inline(blob_id):
            with await self.open(owner, blob_id) as reader:
                return reader.read()
        return await self.read_then(owner, blob_id, _as_is)

    async def _data_key(self, owner: str, key_id: int) -> bytes:
        try:
            return await self.keys.key(owner, key_id)
        except UnknownDataKey:
            raise BlobCorrupt("blob encrypted under another owner's key") from None

    async def read(self, owner: str, blob_id: str, offset: int = 0, length: int | None = None) -> bytes:
        reader = await self.open(owner, blob_id)
        if is_inline(blob_id):
            with reader:
                return reader.read(offset, length)   # in memory already
        try:
            return await asyncio.to_thread(reader.read, offset, length)
        finally:
            reader.close()

    async def read_then(self, owner: str, blob_id: str, work: Callable[[bytes], T]) -> T:
        """``work(await read(owner, blob_id))`` with the file's reading, its decryption and ``work`` in one
        worker-thread hop when ``owner``'s data key is already in memory (the usual case: ``read`` takes
        three hops); else by ``read``, then one hop for ``work``. Same errors as ``read``. An inline blob: one
        database hop for its bytes, then ``work`` of the plaintext in a worker thread."""
        if is_inline(blob_id):
            with await self.open(owner, blob_id) as reader:
                plaintext = reader.read()
            return await asyncio.to_thread(work, plaintext)
        path = self.path(blob_id)
        done, result = await asyncio.to_thread(self._read_then_blocking, owner, blob_id, path, work)
        if done:
            return cast(T, result)
        return await asyncio.to_thread(work, await self.read(owner, blob_id))

    def _read_then_blocking(self, owner: str, blob_id: str, path: Path, work: Callable[[bytes], T]) -> tuple[bool, T | None]:
        """(True, work(plaintext)), or (False, None) when the blob's data key is not in memory."""
        opened = self._open_known(path, owner, blob_id)
        if not isinstance(opened, BlobReader):
            opened[0].close()
            return False, None
        with opened:
            plaintext = opened.read()
        return True, work(plaintext)

    async def delete(self, blob_id: str) -> None:
        """Delete a blob no row refers to any more (an inline one in a transaction of its own: callers that
        remove the referencing rows delete inline blobs in that transaction, ``delete_inline``)."""
        if is_inline(blob_id):
            await self.keys.database.run_in_transaction(lambda c: delete_inline(c, [blob_id]), write=True)
            return
        await asyncio.to_thread(self.path(blob_id).unlink, True)

    async def discard(self, stored: StoredBlob) -> None:
        """Undo a ``put`` whose row was not committed: a file is deleted; an inline blob was never written."""
        if stored.sealed is None:
            await self.delete(stored.blob_id)


def _as_is(plaintext: bytes) -> bytes:
    return plaintext


def _fits_inline(source: BlobSource) -> bool:
    return isinstance(source, bytes | bytearray | memoryview) and len(source) <= INLINE_MAX


def _copy_into(source: BlobSource, writer: BlobWriter) -> None:
    if isinstance(source, bytes | bytearray | memoryview):
        writer.write(bytes(source))
        return
    if isinstance(source, Path):
        with open(source, "rb") as file:
            _pump(file, writer)
        return
    _pump(source, writer)


def _pump(stream: BinaryIO | io.BufferedReader, writer: BlobWriter) -> None:
    while chunk := stream.read(COPY_CHUNK):
        writer.write(chunk)


def _open_with_header(path: Path) -> tuple[BinaryIO, _Header, int]:
    try:
        file = open(path, "rb")  # noqa: SIM115 (handed to the reader, which closes it)
    except FileNotFoundError:
        raise BlobNotFound(f"no blob file {path.name}") from None
    try:
        header = _Header.unpack(file.read(HEADER.size))
        return file, header, os.fstat(file.fileno()).st_size
    except BaseException:
        file.close()
        raise

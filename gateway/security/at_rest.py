"""Encryption at rest beyond the blob store: sealed database fields and sealed spool files.

Both use the per-owner data keys of :class:`gateway.security.keys.KeyManager`
(wrapped by the KEK files, so a copy of the database or of the spool alone
reveals nothing, and ``destroy_owner_key`` shreds them too).

Sealed fields (cached header columns, held S/MIME private keys)::

    "gw1:" base64url( key id u64 | nonce 12 | AES-256-GCM(text) || tag 16 )

The AES key is HKDF-SHA256(owner data key, info "gateway-field-v1" + owner);
the associated data binds the owner and the column name, so a sealed value
copied to another mailbox's row or another column does not open. A value
without the prefix was written before sealing existed and is read as is.

Sealed spool files (the SMTP queue's copy of a message until every recipient is
done) use the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár,
CRYPTO 2015) as the blob store does: 64 KiB segments, each AES-256-GCM with the
nonce ``prefix || index u32 || last u8`` so truncation, reordering and
appending fail authentication. Layout::

    header   magic "GWSP" | version u8 | data key id u64 | salt 16 | nonce prefix 7
    segments sealed segment || tag 16, every one but the last of SEGMENT plaintext octets
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import func, select

from gateway.imap.protocol.envelope import WIRE_VERSION
from gateway.security.nonces import nonce_bytes
from gateway.security.keys import KeyManager, UnknownDataKey
from gateway.security.segments import SegmentAead
from gateway.storage.db import Database

log = logging.getLogger("gateway.at_rest")

SEALED_PREFIX = "gw1:"
FIELD_NONCE_BYTES = 12
KEY_ID = struct.Struct("!Q")
SPOOL_OWNER = "spool"
SPOOL_MAGIC = b"GWSP"
SPOOL_VERSION = 1
SPOOL_HEADER = struct.Struct("!4sBQ16s7s")
SPOOL_SEGMENT = 64 * 1024
TAG_BYTES = 16


class SealedDataError(Exception):
    """A sealed value or file does not open: damaged, moved to another owner, or its key was shredded."""


def _derive(data_key: bytes, purpose: bytes, owner: str, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=purpose + b"\x00" + owner.encode()).derive(data_key)


_FROM_URLSAFE = bytes.maketrans(b"-_+/", b"+/-_")   # "+" and "/" turned into what strict base64 refuses
_RAW_MINIMUM = KEY_ID.size + FIELD_NONCE_BYTES + TAG_BYTES


def is_sealed(value: str | None) -> bool:
    return value is not None and value.startswith(SEALED_PREFIX)


# ---------------------------------------------------------------------------
# Sealed fields
# ---------------------------------------------------------------------------


class FieldSealer:
    """Seals short values (header fields, private keys) under an owner's data key."""

    def __init__(self, keys: KeyManager) -> None:
        self.keys = keys
        self._ciphers: dict[tuple[str, int], AESGCM] = {}

    async def _cipher(self, owner: str, key_id: int) -> AESGCM:
        cipher = self._ciphers.get((owner, key_id))
        if cipher is None:
            cipher = AESGCM(_derive(await self.keys.key(owner, key_id), b"gateway-field-v1", owner))
            self._ciphers[(owner, key_id)] = cipher
        return cipher

    async def seal_raw(self, owner: str, column: str, value: bytes) -> bytes:
        """``value`` sealed as raw octets: ``key id | nonce | ciphertext || tag`` (a binary column)."""
        return (await self.seal_raw_many(owner, [(column, value)]))[0]

    async def seal_raw_many(self, owner: str, values: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """``seal_raw`` of several (column, value) of one owner: the key and cipher looked up once, the
        nonces drawn together (a delivery seals its five header columns and its ENVELOPE)."""
        current = await self.keys.current_key(owner)
        cipher = await self._cipher(owner, current.key_id)
        key_id = KEY_ID.pack(current.key_id)
        nonces = nonce_bytes(FIELD_NONCE_BYTES * len(values))
        sealed = []
        for number, (column, value) in enumerate(values):
            nonce = nonces[number * FIELD_NONCE_BYTES:(number + 1) * FIELD_NONCE_BYTES]
            sealed.append(key_id + nonce + cipher.encrypt(nonce, value, _field_aad(owner, column)))
        return sealed

    async def seal_bytes(self, owner: str, column: str, value: bytes) -> str:
        """``value`` sealed as a token (a text column): ``"gw1:" base64url(seal_raw)``."""
        return sealed_token(await self.seal_raw(owner, column, value))

    async def seal(self, owner: str, column: str, value: str | None) -> str | None:
        return None if value is None else await self.seal_bytes(owner, column, value.encode("utf-8"))

    async def open_many_bytes(self, owner: str, column: str, tokens: Sequence[str]) -> list[bytes]:
        """``open_bytes`` of many values of one owner's column (FETCH of many ENVELOPEs, SEARCH's candidates)."""
        return await self.open_many_raw(owner, column, [sealed_octets(owner, column, token) for token in tokens])

    async def open_many_raw(self, owner: str, column: str, sealed: Sequence[bytes]) -> list[bytes]:
        """Many values of one owner's column sealed as raw octets (``key id | nonce | ciphertext || tag``, the
        token without its prefix and base64), opened by ``open_many_parts``."""
        if any(len(raw) < _RAW_MINIMUM for raw in sealed):
            raise SealedDataError(f"sealed {column} of {owner} is truncated")
        nonce_end = KEY_ID.size + FIELD_NONCE_BYTES
        return await self.open_many_parts(owner, column, [raw[:KEY_ID.size] for raw in sealed],
                                          [raw[KEY_ID.size:nonce_end] for raw in sealed],
                                          [raw[nonce_end:] for raw in sealed])

    async def open_many_parts(self, owner: str, column: str, key_ids: Sequence[bytes], nonces: Sequence[bytes],
                              bodies: Sequence[bytes]) -> list[bytes]:
        """Many raw sealed values of one owner's column given in their three parts (the database can cut them:
        FETCH of many ENVELOPEs), the packed key id, the nonce, ciphertext || tag: the ciphers looked up once
        per key, then one loop of decryptions and nothing else per value."""
        aad = _field_aad(owner, column)
        ciphers: dict[bytes, Callable[[bytes, bytes, bytes], bytes]] = {}
        opened: list[bytes] = []
        append = opened.append
        try:
            for key, nonce, body in zip(key_ids, nonces, bodies, strict=True):
                decrypt = ciphers.get(key)
                if decrypt is None:
                    if len(key) != KEY_ID.size:
                        raise SealedDataError(f"sealed {column} of {owner} is truncated")
                    cipher = await self._known_cipher(owner, column, KEY_ID.unpack(key)[0])
                    decrypt = ciphers[key] = cipher.decrypt
                append(decrypt(nonce, body, aad))
        except InvalidTag:
            raise SealedDataError(f"sealed {column} of {owner} fails authentication") from None
        except ValueError:                        # a nonce of another length: cut short
            raise SealedDataError(f"sealed {column} of {owner} is truncated") from None
        return opened

    async def _known_cipher(self, owner: str, column: str, key_id: int) -> AESGCM:
        try:
            return await self._cipher(owner, key_id)
        except UnknownDataKey:
            raise SealedDataError(f"sealed {column} was not sealed for {owner}") from None

    async def open_bytes(self, owner: str, column: str, token: str) -> bytes:
        return (await self.open_many_bytes(owner, column, (token,)))[0]

    async def open_many(self, owner: str, column: str, values: Sequence[str | None]) -> list[str | None]:
        """``open`` of many values of one owner's column (SEARCH's candidates), decrypted in one loop."""
        sealed = [value for value in values if is_sealed(value)]
        opened = iter(await self.open_many_bytes(owner, column, sealed))   # type: ignore[arg-type]
        return [next(opened).decode("utf-8") if is_sealed(value) else value for value in values]

    async def open(self, owner: str, column: str, value: str | None) -> str | None:
        """The plaintext of a sealed value; an unsealed (legacy) value is returned unchanged."""
        if not is_sealed(value):
            return value
        assert value is not None
        return (await self.open_bytes(owner, column, value)).decode("utf-8")

    def forget(self, owner: str) -> None:
        """Drop cached ciphers of ``owner`` (after crypto-shredding)."""
        for cached in [entry for entry in self._ciphers if entry[0] == owner]:
            del self._ciphers[cached]


def sealed_token(raw: bytes) -> str:
    """The token form of raw sealed octets (a text column): ``"gw1:" base64url(raw)``."""
    return SEALED_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii")


def sealed_octets(owner: str, column: str, token: str) -> bytes:
    """The raw octets of a sealed token (``key id | nonce | ciphertext || tag``), for ``open_many_raw``."""
    try:   # base64url (RFC 4648 5) straight to binascii: base64.urlsafe_b64decode's checks cost as much
        return binascii.a2b_base64(token.encode("ascii")[len(SEALED_PREFIX):].translate(_FROM_URLSAFE),
                                   strict_mode=True)
    except (binascii.Error, ValueError):   # UnicodeEncodeError is a ValueError
        raise SealedDataError(f"sealed {column} of {owner} is not base64") from None


def _field_aad(owner: str, column: str) -> bytes:
    return b"gateway-field\x00" + owner.encode() + b"\x00" + column.encode()


# ---------------------------------------------------------------------------
# Sealed spool files
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _SpoolHeader:
    key_id: int
    salt: bytes
    nonce_prefix: bytes

    def pack(self) -> bytes:
        return SPOOL_HEADER.pack(SPOOL_MAGIC, SPOOL_VERSION, self.key_id, self.salt, self.nonce_prefix)


def _spool_segments(data_key: bytes, header: _SpoolHeader, binding: str) -> SegmentAead:
    return SegmentAead(_derive(data_key, b"gateway-spool-v1", binding, header.salt), header.nonce_prefix,
                       header.pack() + b"\x00" + binding.encode(),
                       failure=lambda index: SealedDataError(f"spool segment {index} fails authentication"))


class SpoolCipher:
    """The spool's data key (owner ``spool``), loaded once so that writes stay synchronous.

    A spool file is opened three times on its way (written, scanned at DATA, read by delivery): the
    segment cipher of the files opened last is kept, so that the HKDF and the AES key schedule run once a
    file (a twentieth of a delivery's CPU, py-spy). Those keys are derived from the spool key this object
    holds anyway; they go with it."""

    RECENT_FILES = 1024

    def __init__(self, key_id: int, data_key: bytes) -> None:
        self.key_id = key_id
        self._data_key = data_key
        self._recent: OrderedDict[tuple[bytes, bytes, str], SegmentAead] = OrderedDict()
        self._recent_lock = threading.Lock()           # writers and readers run in worker threads too

    @classmethod
    async def load(cls, keys: KeyManager) -> SpoolCipher:
        current = await keys.current_key(SPOOL_OWNER)
        return cls(current.key_id, current.key)

    def writer(self, output: int | Callable[[bytes], None], binding: str) -> SealedSpoolWriter:
        """Seals what is written into ``output``: a file descriptor, or a function given the sealed octets."""
        return SealedSpoolWriter(output, self, binding)

    def reader(self, path: Path, binding: str) -> BinaryIO:
        """A buffered, sequential reader of the plaintext; plaintext files (written before sealing) pass through."""
        return self.stream_reader(path.open("rb"), binding)

    def stream_reader(self, handle: BinaryIO, binding: str) -> BinaryIO:
        """``reader`` of a seekable stream of spool octets (a file, or a queue row's content in memory)."""
        magic = handle.read(len(SPOOL_MAGIC))
        handle.seek(0)
        if magic != SPOOL_MAGIC:
            return handle
        return io.BufferedReader(_SealedSpoolReader(handle, self, binding), SPOOL_SEGMENT)

    def open_octets(self, content: bytes, binding: str) -> bytes:
        """The whole plaintext of spool octets held in memory (a queue row's content): what
        ``stream_reader(io.BytesIO(content), binding).read()`` returns, and the same errors, each segment
        opened straight from ``content`` (no stream, no buffer copied through ``readinto``)."""
        if content[:len(SPOOL_MAGIC)] != SPOOL_MAGIC:
            return bytes(content)                           # written before sealing: passed through
        if len(content) < SPOOL_HEADER.size:
            raise SealedDataError("spool file shorter than its header")
        _magic, version, key_id, salt, prefix = SPOOL_HEADER.unpack_from(content)
        if version != SPOOL_VERSION:
            raise SealedDataError(f"unsupported spool format version {version}")
        aead = self._aead(_SpoolHeader(key_id, salt, prefix), binding)
        pieces: list[bytes] = []
        offset, end, index = SPOOL_HEADER.size, len(content), 0
        while True:
            size = min(SPOOL_SEGMENT + TAG_BYTES, end - offset)
            last = offset + size == end
            if size < TAG_BYTES:
                raise SealedDataError("spool file truncated")
            pieces.append(aead.open(index, content[offset:offset + size], last))
            if last:
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            offset += size
            index += 1

    def _aead(self, header: _SpoolHeader, binding: str) -> SegmentAead:
        if header.key_id != self.key_id:
            raise SealedDataError(f"spool file sealed under data key {header.key_id}, the spool key is {self.key_id}")
        # The whole header and the binding name the file: its salt and nonce prefix are random per file.
        file = (header.salt, header.nonce_prefix, binding)
        with self._recent_lock:
            known = self._recent.get(file)
            if known is not None:
                self._recent.move_to_end(file)
                return known
        aead = _spool_segments(self._data_key, header, binding)
        with self._recent_lock:
            self._recent[file] = aead
            if len(self._recent) > self.RECENT_FILES:
                self._recent.popitem(last=False)
        return aead


class SealedSpoolWriter:
    """Encrypts what is written to ``output`` (a file descriptor, or a function given the sealed octets)
    segment by segment; ``finish`` seals the last segment."""

    def __init__(self, output: int | Callable[[bytes], None], cipher: SpoolCipher, binding: str) -> None:
        header = _SpoolHeader(cipher.key_id, nonce_bytes(16), nonce_bytes(7))
        self._emit: Callable[[bytes], None] = output if callable(output) else functools.partial(_write_all, output)
        self._aead = cipher._aead(header, binding)
        self._buffer = bytearray()
        self._index = 0
        self._finished = False
        self._emit(header.pack())

    def write(self, data: bytes) -> None:
        if self._finished:
            raise SealedDataError("spool file already sealed: no more writes")
        self._buffer += data
        while len(self._buffer) > SPOOL_SEGMENT:         # keep at least one octet back for the last segment
            segment = bytes(self._buffer[:SPOOL_SEGMENT])
            del self._buffer[:SPOOL_SEGMENT]
            self._emit(self._aead.seal(self._index, segment, last=False))
            self._index += 1

    def finish(self) -> None:
        """Seal the last segment (idempotent): the file is then complete and readable."""
        if self._finished:
            return
        self._emit(self._aead.seal(self._index, bytes(self._buffer), last=True))
        self._buffer.clear()
        self._finished = True


class _SealedSpoolReader(io.RawIOBase):
    def __init__(self, handle: BinaryIO, cipher: SpoolCipher, binding: str) -> None:
        super().__init__()
        raw = handle.read(SPOOL_HEADER.size)
        if len(raw) != SPOOL_HEADER.size:
            handle.close()
            raise SealedDataError("spool file shorter than its header")
        _magic, version, key_id, salt, prefix = SPOOL_HEADER.unpack(raw)   # the magic: checked by SpoolCipher.reader
        if version != SPOOL_VERSION:
            handle.close()
            raise SealedDataError(f"unsupported spool format version {version}")
        self._handle = handle
        self._aead = cipher._aead(_SpoolHeader(key_id, salt, prefix), binding)
        self._remaining = handle.seek(0, os.SEEK_END) - SPOOL_HEADER.size   # a file or octets in memory
        handle.seek(SPOOL_HEADER.size)
        self._index = 0
        self._plain = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._plain and not self._done:
            self._plain = self._next_segment()
        count = min(len(buffer), len(self._plain))
        buffer[:count] = self._plain[:count]
        self._plain = self._plain[count:]
        return count

    def _next_segment(self) -> bytes:
        size = min(SPOOL_SEGMENT + TAG_BYTES, self._remaining)
        last = size == self._remaining
        sealed = self._handle.read(size)
        if len(sealed) != size or size < TAG_BYTES:
            raise SealedDataError("spool file truncated")
        self._remaining -= size
        plain = self._aead.open(self._index, sealed, last)
        self._index += 1
        self._done = last
        return plain

    def close(self) -> None:
        self._handle.close()
        super().close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# ---------------------------------------------------------------------------
# The mail store's cached header columns
# ---------------------------------------------------------------------------

MESSAGE_ID_PLAINTEXT_LIMIT = 700      # sealed, it still fits the 998-character column (RFC 5322 2.1.1 line limit)
_SEALED_TEXT_COLUMNS = ("subject", "from_addr", "to_addr", "cc_addr", "message_id")
# The sealed rendering's associated data names its version: a value is only ever opened as what it is.
ENVELOPE_WIRE_COLUMN = f"envelope-{WIRE_VERSION}"
# The binary ENVELOPE column (``envelope_sealed``) starts with the rendering's version, then the sealed octets.
ENVELOPE_SEALED_TAG = WIRE_VERSION.encode("ascii") + b"\x00"


class HeaderSealer:
    """Seals the header fields the mail store caches for SEARCH and ENVELOPE under the mailbox's data key.

    The cached subject, addresses, Message-ID and ENVELOPE of a message are as
    sensitive as its body; sealed, SEARCH on them decrypts the candidate rows
    (AES-GCM on a few hundred octets per row, see docs/PERFORMANCE.md) instead
    of a SQL LIKE. Sizes, flags and dates stay in clear for SQL.
    """

    def __init__(self, fields: FieldSealer) -> None:
        self.fields = fields

    async def seal(self, owner: str, headers: Any) -> Any:
        """A copy of ``CachedHeaders`` with every text field and the envelope sealed (one ``seal_raw_many``)."""
        plain: list[tuple[str, bytes]] = []
        for column in _SEALED_TEXT_COLUMNS:
            value = getattr(headers, column)
            if column == "message_id" and value is not None:
                value = value[:MESSAGE_ID_PLAINTEXT_LIMIT]
            if value is not None:
                plain.append((column, value.encode("utf-8")))
        # The ENVELOPE as IMAP renders it (gateway.imap.protocol.envelope), not its structure, as raw octets
        # (no JSON, no base64): a FETCH decrypts it and sends it as is.
        plain.append((ENVELOPE_WIRE_COLUMN, headers.envelope_wire()))
        sealed = await self.fields.seal_raw_many(owner, plain)
        values: dict[str, Any] = dict.fromkeys(_SEALED_TEXT_COLUMNS)
        for (column, _), raw in zip(plain[:-1], sealed, strict=False):
            values[column] = sealed_token(raw)
        values["envelope"] = {}
        values["envelope_sealed"] = ENVELOPE_SEALED_TAG + sealed[-1]
        return dataclasses.replace(headers, **values)

    async def open_rows(self, owner: str, rows: Any) -> None:
        """Unseal mail store rows in place (detached rows: nothing is written back)."""
        for row in rows:
            for column in _SEALED_TEXT_COLUMNS:
                setattr(row, column, await self.fields.open(owner, column, getattr(row, column)))
            envelope = row.envelope
            if isinstance(envelope, dict) and set(envelope) == {"sealed"}:
                row.envelope = json.loads(await self.fields.open(owner, "envelope", envelope["sealed"]) or "{}")


@dataclass(frozen=True)
class KeyStatus:
    current_kek: int
    kek_files: tuple[int, ...]
    data_keys_by_kek: dict[int, int]
    destroyed: int
    missing_keks: tuple[int, ...]


async def key_status(db: Database, keys: KeyManager) -> KeyStatus:
    """KEK files on disk, live data keys per KEK, shredded keys; KEKs that rows need but whose file is gone."""
    from gateway.mailstore.tables import DataKey

    async with db.session() as session:
        counts: dict[int, int] = {int(kek): int(count) for kek, count in (await session.execute(
            select(DataKey.kek_id, func.count()).where(DataKey.kek_id.is_not(None)).group_by(DataKey.kek_id))).all()
            if kek is not None}
        destroyed = await session.scalar(select(func.count()).where(DataKey.destroyed_at.is_not(None))) or 0
    files = tuple(keys.keks.ids())
    current = files[-1] if files else 0
    missing = tuple(sorted(kek for kek in counts if kek not in files))
    return KeyStatus(current, files, counts, int(destroyed), missing)

"""The mail store over SQLAlchemy (SQLite or PostgreSQL) and the encrypted blob store.

Invariants (RFC 3501 2.3.1.1, RFC 7162 3.1):

- UIDs strictly ascend and are never reused: UIDNEXT lives in the folder row and
  is bumped in the same transaction as the insert, under a lock of that row
  (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite a first no-op UPDATE takes
  the single write lock before anything is read).
- Every change of a folder's messages takes the next MODSEQ of that folder; all
  messages changed by one command share it; expunges leave a tombstone with it.
- UIDVALIDITY is time-based and strictly greater than any value the mailbox has
  handed out before, so a re-created folder never repeats one.

Each public method is one short transaction. Lock contention is retried a few
times with jittered backoff, then reported as ``StoreBusy`` (451 / NO [UNAVAILABLE]).
Bodies are written (and fsynced) before the transaction, deleted after the
commit that drops their last reference.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

from sqlalchemy import ColumnElement, Select, Table, Text, bindparam, delete, false, func, insert, or_, select, text, type_coerce, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.mailstore import flags as flagcodec
from gateway.mailstore import names
from gateway.mailstore.errors import (
    CannotDeleteInbox,
    FolderExists,
    FolderHasChildren,
    FolderNotFound,
    InvalidFolderName,
    MailboxNotHosted,
    MessageNotFound,
    QuotaExceeded,
    StoreBusy,
    UidValidityChanged,
)
from gateway.mailstore.append_rows import AfterInsert, AppendRows, BeforeInsert, insert_append
from gateway.mailstore.group_commit import GroupCommit, SyncGroupCommit
from gateway.mailstore.index import Columns, FolderIndex, IndexCache, Row, columns_from
from gateway.mailstore.headers import MAX_HEADER_BYTES, CachedHeaders, header_section, parse_headers
from gateway.mailstore.interface import (
    INBOX,
    PERMANENT_FLAGS,
    SPECIAL_USES,
    SYSTEM_FLAGS,
    AddedMessage,
    AppendResult,
    Changes,
    CopyResult,
    ExpungeResult,
    FlagListing,
    FlagUpdate,
    FolderInfo,
    FolderRef,
    FolderSnapshot,
    FolderStatus,
    MailStore,
    MessageBody,
    MessageMeta,
    MessageSource,
    MoveResult,
    QuotaUsage,
    SearchKey,
    StoreMode,
    StoreResult,
    UidSet,
)
from gateway.mailstore.notify import ChangeEvent, ChangeHub, ChangeKind
from gateway.mailstore.blind_index import BlindIndex
from gateway.mailstore.search import MAX_SQL_RANGES, SearchRow, search_folder, uid_clause
from gateway.mailstore.tables import KEYWORDED, Delivery, ExpungedMessage, Folder, MailAccount, Message, Subscription
from gateway.imap.protocol.envelope import WIRE_VERSION
from gateway.mailstore.envelopes import envelope_form, sealed_envelope_octets, sealed_envelope_parts
from gateway.security.at_rest import ENVELOPE_WIRE_COLUMN, HeaderSealer, sealed_octets
from gateway.security.keys import mailbox_owner
from gateway.storage.advisory import lock_key
from gateway.storage.blobs import (
    BlobNotFound,
    BlobReader,
    BlobSource,
    BlobStore,
    StoredBlob,
    delete_inline,
    is_inline,
)
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, utcnow
from gateway.storage.prepared import Prepared

log = logging.getLogger(__name__)

T = TypeVar("T")
SEEN_BIT = flagcodec.SYSTEM_BITS["\\Seen"]
DELETED_BIT = flagcodec.SYSTEM_BITS["\\Deleted"]
# PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock, lock timeout.
RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}
LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class _Prepared:
    headers: CachedHeaders
    source: MessageSource
    known_size: int | None


class _BlobBody(MessageBody):
    def __init__(self, reader: BlobReader) -> None:
        self._reader = reader
        self.size = reader.size

    async def read(self, offset: int = 0, length: int | None = None) -> bytes:
        return await asyncio.to_thread(self._reader.read, offset, length)

    async def chunks(self, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        pieces = self._reader.iter_range(offset, length)
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            yield piece

    async def close(self) -> None:
        self._reader.close()


class _ChainedStream(io.RawIOBase):
    """The bytes already read for header parsing, then the rest of a non-seekable stream."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._head.read(len(buffer)) or self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _prepare(source: MessageSource) -> _Prepared:
    """Parse the header section of any source without loading a big body into memory."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return _Prepared(parse_headers(header_section(data[:MAX_HEADER_BYTES])), data, len(data))
    if isinstance(source, Path):
        with open(source, "rb") as file:
            prefix = file.read(MAX_HEADER_BYTES)
        return _Prepared(parse_headers(header_section(prefix)), source, source.stat().st_size)
    prefix = source.read(MAX_HEADER_BYTES)
    if source.seekable():
        source.seek(-len(prefix), io.SEEK_CUR)
        stream: BinaryIO = source
    else:
        stream = io.BufferedReader(_ChainedStream(prefix, source))
    return _Prepared(parse_headers(header_section(prefix)), stream, None)


def _with_source(prepared: _Prepared) -> tuple[_Prepared, BlobSource]:
    return prepared, prepared.source


def _is_contention(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if sqlstate in RETRYABLE_SQLSTATES:
        return True
    text = str(exc.orig).lower()
    return "database is locked" in text or "database is busy" in text


def _new_uidvalidity(last: int) -> int:
    # RFC 3501 2.3.1.1: a 32-bit value that must grow if a name is reused; seconds since 1970 fit until 2106.
    return max(int(time.time()), last + 1)


class _MetaRow:
    """The columns FETCH needs, as plain attributes: no ORM identity map or instance state per row
    (that bookkeeping was a third of the store's time for UID FETCH 1:* on 100,000 messages)."""

    NAMES = ("uid", "modseq", "system_flags", "keywords", "internaldate", "size", "envelope", "envelope_sealed",
             "message_id", "subject", "from_addr", "to_addr", "cc_addr", "sent_date")
    # envelope_wire: no column, the ENVELOPE column once opened; blob_id: read beside them (``_blob_ids``).
    __slots__ = (*NAMES, "envelope_wire", "blob_id")
    uid: int
    modseq: int
    system_flags: int
    keywords: str
    internaldate: dt.datetime
    size: int
    envelope: dict[str, Any]
    envelope_sealed: bytes | None
    message_id: str | None
    subject: str | None
    from_addr: str | None
    to_addr: str | None
    cc_addr: str | None
    sent_date: dt.datetime | None
    envelope_wire: bytes | None
    blob_id: str | None
    # Without the five sealed header columns (FETCH asks for none of them).
    CLEAR = tuple(name for name in NAMES if name not in ("message_id", "subject", "from_addr", "to_addr", "cc_addr"))

    @classmethod
    def of(cls, names: Sequence[str], values: Sequence[Any]) -> _MetaRow:
        """A row of some of the columns; the others are None (the envelope: empty)."""
        row = cls.__new__(cls)
        given = dict(zip(names, values, strict=True))
        for name in cls.__slots__:
            setattr(row, name, given.get(name, {} if name == "envelope" else None))
        return row


_MESSAGES = Message.__table__     # SQL Core on the hot paths: rows as tuples, no ORM loading
_INDEX_COLUMNS = (_MESSAGES.c.uid, _MESSAGES.c.modseq, _MESSAGES.c.system_flags, _MESSAGES.c.keywords)


def _core_uid_clause(uids: UidSet) -> ColumnElement[bool]:
    """``search.uid_clause`` on the table's column: a statement without ORM attributes runs as plain Core."""
    column = _MESSAGES.c.uid
    if not uids.ranges:
        return false()
    if len(uids.ranges) > MAX_SQL_RANGES:
        return column.between(min(low for low, _ in uids.ranges), max(high for _, high in uids.ranges))
    return or_(*(column == low if low == high else column.between(low, high) for low, high in uids.ranges))


MESSAGES = cast(Table, Message.__table__)   # the tables themselves, for SQL Core statements without the ORM
FOLDERS = cast(Table, Folder.__table__)
EXPUNGED = cast(Table, ExpungedMessage.__table__)


@dataclass(frozen=True)
class _FolderRow:
    """The folder columns the STORE and EXPUNGE paths read, without an ORM object."""

    id: int
    uidvalidity: int
    highestmodseq: int
    keywords: str
    COLUMNS = (FOLDERS.c.id, FOLDERS.c.uidvalidity, FOLDERS.c.highestmodseq, FOLDERS.c.keywords)


_FOLDER_BY_NAME = (FOLDERS.c.mailbox_id == bindparam("folder_mailbox"), FOLDERS.c.name == bindparam("folder_name"))
_LOCK_FOLDER_FOR_UPDATE = select(*_FolderRow.COLUMNS).where(*_FOLDER_BY_NAME).with_for_update()
_STATUS_ROW = Prepared(select(FOLDERS.c.id, FOLDERS.c.name, FOLDERS.c.message_count, FOLDERS.c.uidnext,
                              FOLDERS.c.uidvalidity, FOLDERS.c.highestmodseq, FOLDERS.c.total_bytes,
                              FOLDERS.c.recent_uid).where(*_FOLDER_BY_NAME))
# A folder's unseen and recent messages (RFC 3501 6.3.10), when its index in memory cannot tell.
_STATUS_COUNTS = select(
    select(func.count()).select_from(MESSAGES)
    .where(MESSAGES.c.folder_id == bindparam("folder_id"), MESSAGES.c.system_flags.op("&")(SEEN_BIT) == 0)
    .scalar_subquery(),
    select(func.count()).select_from(MESSAGES)
    .where(MESSAGES.c.folder_id == bindparam("folder_id"), MESSAGES.c.uid > bindparam("recent")).scalar_subquery(),
)
# PostgreSQL: the folder row and its counts in one statement, so one snapshot (READ COMMITTED gives each statement
# its own: a change committed between two statements was in the counts and not in the row's HIGHESTMODSEQ).
_UNSEEN_IN_ROW = (select(func.count()).select_from(MESSAGES)
                  .where(MESSAGES.c.folder_id == FOLDERS.c.id, MESSAGES.c.system_flags.op("&")(SEEN_BIT) == 0)
                  .correlate(FOLDERS).scalar_subquery())
_RECENT_IN_ROW = (select(func.count()).select_from(MESSAGES)
                  .where(MESSAGES.c.folder_id == FOLDERS.c.id, MESSAGES.c.uid > FOLDERS.c.recent_uid)
                  .correlate(FOLDERS).scalar_subquery())
_STATUS_ROW_COUNTED = Prepared(select(FOLDERS.c.id, FOLDERS.c.name, FOLDERS.c.message_count, FOLDERS.c.uidnext,
                                      FOLDERS.c.uidvalidity, FOLDERS.c.highestmodseq, FOLDERS.c.total_bytes,
                                      FOLDERS.c.recent_uid, _UNSEEN_IN_ROW, _RECENT_IN_ROW)
                               .where(*_FOLDER_BY_NAME))


@dataclass(frozen=True, slots=True)
class _FolderCore:
    """The folder columns SELECT and the read paths need, read in SQL Core (no ORM object)."""

    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    recent_uid: int
    special_use: str | None
    keywords: str


_FOLDER_CORE_SELECT = select(FOLDERS.c.id, FOLDERS.c.name, FOLDERS.c.uidvalidity, FOLDERS.c.uidnext,
                             FOLDERS.c.highestmodseq, FOLDERS.c.recent_uid, FOLDERS.c.special_use,
                             FOLDERS.c.keywords).where(*_FOLDER_BY_NAME)
# Every command's first statement (the folder row): on SQLite run on the driver directly (storage/prepared.py).
_FOLDER_CORE = Prepared(_FOLDER_CORE_SELECT)
_FOLDER_CORE_FOR_UPDATE = Prepared(_FOLDER_CORE_SELECT.with_for_update())
_FOLDER_ROW = Prepared(select(*_FolderRow.COLUMNS).where(*_FOLDER_BY_NAME))
_LOCK_FOLDER_ROW = Prepared(_LOCK_FOLDER_FOR_UPDATE)
_HIGHESTMODSEQ = select(FOLDERS.c.highestmodseq).where(FOLDERS.c.id == bindparam("folder_id"))
_WHOLE_INDEX = (select(_MESSAGES.c.uid, _MESSAGES.c.modseq, _MESSAGES.c.system_flags)
                .where(_MESSAGES.c.folder_id == bindparam("folder_id")).order_by(_MESSAGES.c.uid))
_FOLDERS_TO_WARM = (select(FOLDERS.c.id, FOLDERS.c.uidvalidity, FOLDERS.c.message_count)
                    .where(FOLDERS.c.id.in_(bindparam("folder_ids", expanding=True))))
_KEYWORDED = (select(_MESSAGES.c.uid, _MESSAGES.c.keywords)
              .where(_MESSAGES.c.folder_id == bindparam("folder_id"), text(KEYWORDED)).order_by(_MESSAGES.c.uid))
_CHANGED_INDEX_ROWS = Prepared(select(*_INDEX_COLUMNS).where(_MESSAGES.c.folder_id == bindparam("folder_id"),
                                                              _MESSAGES.c.modseq > bindparam("since"))
                               .order_by(_MESSAGES.c.uid))
_EXPUNGED_SINCE = Prepared(select(EXPUNGED.c.uid).where(EXPUNGED.c.folder_id == bindparam("folder_id"),
                                                        EXPUNGED.c.modseq > bindparam("since"))
                           .order_by(EXPUNGED.c.uid))
# STORE and EXPUNGE of one UID range (the usual command), prepared: the rows between its ends, filtered by the
# UidSet in Python; a set of several ranges builds its statement (``_core_uid_clause``).
_IN_RANGE = (_MESSAGES.c.folder_id == bindparam("folder_id"), _MESSAGES.c.uid.between(bindparam("low"), bindparam("high")))
_STORE_CURRENT_COLUMNS = (MESSAGES.c.id, MESSAGES.c.uid, MESSAGES.c.modseq, MESSAGES.c.system_flags,
                          MESSAGES.c.keywords)
_STORE_CURRENT = Prepared(select(*_STORE_CURRENT_COLUMNS).where(*_IN_RANGE).order_by(MESSAGES.c.uid))
_SET_FLAGS_AT = Prepared(update(MESSAGES).where(MESSAGES.c.id == bindparam("row_id")).values(
    system_flags=bindparam("new_bits"), keywords=bindparam("new_keywords"), modseq=bindparam("new_modseq")))
_FOLDER_FLAGS_CHANGED = Prepared(update(FOLDERS).where(FOLDERS.c.id == bindparam("folder_id")).values(
    highestmodseq=bindparam("new_modseq"), keywords=bindparam("new_keywords")))
_DOOMED_COLUMNS = (MESSAGES.c.id, MESSAGES.c.uid, MESSAGES.c.size, MESSAGES.c.blob_id)
_DELETED = MESSAGES.c.system_flags.op("&")(DELETED_BIT) != 0
_DOOMED_IN_RANGE = Prepared(select(*_DOOMED_COLUMNS).where(*_IN_RANGE, _DELETED).order_by(MESSAGES.c.uid))
_DELETE_MESSAGE = Prepared(delete(MESSAGES).where(MESSAGES.c.id == bindparam("row_id")))
_INSERT_TOMBSTONE = Prepared(insert(EXPUNGED))
_FOLDER_EXPUNGED = Prepared(update(FOLDERS).where(FOLDERS.c.id == bindparam("folder_id")).values(
    highestmodseq=bindparam("new_modseq"), message_count=FOLDERS.c.message_count - bindparam("gone_count"),
    total_bytes=FOLDERS.c.total_bytes - bindparam("gone_bytes")))
_BLOB_USED = Prepared(select(MESSAGES.c.id).where(MESSAGES.c.blob_id == bindparam("blob")).limit(1))
_UIDS_ABOVE = select(_MESSAGES.c.uid).where(_MESSAGES.c.folder_id == bindparam("folder_id"),
                                            _MESSAGES.c.uid > bindparam("above")).order_by(_MESSAGES.c.uid)
_SET_RECENT = update(FOLDERS).where(FOLDERS.c.id == bindparam("folder_id")).values(recent_uid=bindparam("recent"))
# uid, envelope_sealed cut in three (key id, nonce, ciphertext || tag: ``sealed_envelope_parts``), the JSON column
_ENVELOPES = select(_MESSAGES.c.uid, *sealed_envelope_parts(), type_coerce(_MESSAGES.c.envelope, Text))
_ENVELOPES_IN_RANGE = Prepared(_ENVELOPES.where(*_IN_RANGE))
_META_IN_RANGE: dict[tuple[str, ...], Prepared] = {}


def _meta_columns(names: tuple[str, ...]) -> list[Any]:
    """The message columns of ``_MetaRow`` ``names``: the ENVELOPE as its raw JSON text (decoded once, later)."""
    return [type_coerce(_MESSAGES.c.envelope, Text) if name == "envelope" else _MESSAGES.c[name] for name in names]


def _meta_in_range(names: tuple[str, ...]) -> Prepared:
    """FETCH's metadata of one UID range, prepared once per set of columns (a handful)."""
    found = _META_IN_RANGE.get(names)
    if found is None:
        found = _META_IN_RANGE[names] = Prepared(select(*_meta_columns(names)).where(*_IN_RANGE)
                                                 .order_by(_MESSAGES.c.uid))
    return found


_BLOB_OF = Prepared(select(_MESSAGES.c.blob_id).where(_MESSAGES.c.folder_id == bindparam("folder_id"),
                                                      _MESSAGES.c.uid == bindparam("uid")))


@dataclass(frozen=True, slots=True)
class _Written:
    """One change a writer of this process committed to a folder: its MODSEQ ``base`` -> ``modseq``, the rows
    it changed or added (index rows) and the UIDs it expunged."""

    folder_id: int
    uidvalidity: int
    base: int
    modseq: int
    changed: Sequence[Row] = ()
    expunged: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class _IndexRead:
    """What a transaction read to bring a folder's shared index up to date (installed on the event loop: the
    arrays sessions read are only ever replaced there). ``since``: the index's MODSEQ the changes are relative
    to; ``columns``: the whole folder instead, when the index held nothing."""

    since: int
    highest: int
    changed: Sequence[Row] = ()
    expunged: Sequence[int] = ()
    columns: Columns | None = None


_LIST_FOLDERS = Prepared(select(FOLDERS.c.name, FOLDERS.c.special_use, FOLDERS.c.uidvalidity)
                         .where(FOLDERS.c.mailbox_id == bindparam("folder_mailbox")).order_by(FOLDERS.c.name))
_SUBSCRIPTIONS = Prepared(select(Subscription.__table__.c.name)
                          .where(Subscription.__table__.c.mailbox_id == bindparam("folder_mailbox"))
                          .order_by(Subscription.__table__.c.name))


FEW_BLOBS = 8
BLOB_IDS_KEPT = 4096


# Bodies are shared by copies (COPY and MOVE copy ``blob_id``), so a body goes with the last row referring to it.
# Nothing acknowledged may lose its body, nor may a body outlive its last row:
# - a row referring to a body is made only by COPY/MOVE, from a source row it reads under its source folder's
#   lock and ``FOR SHARE`` (PostgreSQL; ``_copy``): the source's deletion cannot commit before the copy does;
# - whoever deletes rows (EXPUNGE, DELETE of a folder) deletes them first, then locks their bodies (below) and
#   asks which ones no row refers to any more (``_unreferenced``), in that transaction, each statement a fresh
#   snapshot under READ COMMITTED: of two removers of one body's last rows (two folders expunged at once), the
#   second to take the lock sees the first's deletion committed, where both saw the other's row and kept the
#   body. An inline body is deleted in that transaction, a file after its commit (a rollback keeps it).
# SQLite has one writer: BEGIN IMMEDIATE (or a first write) orders whole transactions, so none of this can
# interleave there.
# A body's lock: one of BODY_LOCKS per mailbox (copies never leave their mailbox), so a transaction holds at most
# that many advisory locks whatever it removes (PostgreSQL's shared lock table is small: 64 per connection by
# default), and removers in other mailboxes never wait for each other; two bodies of one bucket only share a wait.
BODY_LOCKS = 16
_LOCK_BODIES = text("SELECT pg_advisory_xact_lock(body) FROM "
                    "(SELECT DISTINCT unnest(CAST(:bodies AS bigint[])) AS body) AS bodies ORDER BY body")


def _body_lock_key(mailbox_id: int, blob_id: str) -> int:
    """The signed 64-bit advisory lock key of a body of ``mailbox_id`` (``storage.advisory.lock_key`` names)."""
    bucket = hashlib.blake2b(blob_id.encode(), digest_size=4).digest()[0] % BODY_LOCKS
    return lock_key(f"mailstore-body:{mailbox_id}:{bucket}")


def _lock_bodies(connection: Connection, mailbox_id: int, blob_ids: set[str]) -> None:
    """PostgreSQL: lock the bodies until the commit, in one order (no two removers wait on each other in a
    cycle). SQLite: the writer's lock is already held."""
    if blob_ids and connection.dialect.name == "postgresql":
        connection.execute(_LOCK_BODIES, {"bodies": sorted({_body_lock_key(mailbox_id, blob_id)
                                                            for blob_id in blob_ids})})


def _release_bodies(connection: Connection, mailbox_id: int, blob_ids: set[str]) -> list[str]:
    """After this transaction deleted rows referring to ``blob_ids``: the bodies no row refers to any more,
    inline ones deleted now (with the rows); the files among them are returned, to delete after the commit."""
    _lock_bodies(connection, mailbox_id, blob_ids)
    unreferenced = _unreferenced(connection, blob_ids)
    delete_inline(connection, unreferenced)
    return [blob_id for blob_id in unreferenced if not is_inline(blob_id)]


def _unreferenced(connection: Connection, blob_ids: set[str]) -> list[str]:
    """Of ``blob_ids``, those no message row refers to any more (asked in the transaction that removed rows,
    after ``_lock_bodies``)."""
    if not blob_ids:
        return []
    if len(blob_ids) <= FEW_BLOBS:        # the usual EXPUNGE: one statement prepared, one index probe each
        return sorted(blob_id for blob_id in blob_ids if _BLOB_USED.run(connection, {"blob": blob_id}).fetchone() is None)
    used = set(connection.execute(select(MESSAGES.c.blob_id).where(MESSAGES.c.blob_id.in_(blob_ids)).distinct())
               .scalars())
    return sorted(blob_ids - used)


@functools.cache
def _sqlite_text(statement: Select[Any]) -> str:
    """A Core statement as SQLite's SQL text (qmark parameters), for the driver's own cursor."""
    return str(statement.compile(dialect=sqlite_dialect()))


class _NeedsLoad(Exception):
    """The folder's index holds nothing yet: it is loaded first, one load at a time (``_load_index``)."""

    def __init__(self, folder_id: int, uidvalidity: int) -> None:
        self.folder_id = folder_id
        self.uidvalidity = uidvalidity


def _meta(row: Message | _MetaRow) -> MessageMeta:
    return MessageMeta(
        uid=row.uid, modseq=row.modseq, flags=flagcodec.decode(row.system_flags, row.keywords),
        internaldate=row.internaldate, size=row.size, envelope=row.envelope, message_id=row.message_id,
        subject=row.subject, from_addr=row.from_addr, to_addr=row.to_addr, sent_date=row.sent_date,
        envelope_wire=getattr(row, "envelope_wire", None),
    )


def _flag_update(row: Message) -> FlagUpdate:
    return FlagUpdate(row.uid, flagcodec.decode(row.system_flags, row.keywords), row.modseq)


def _next_modseq(folder: Folder) -> int:
    folder.highestmodseq += 1
    return folder.highestmodseq


def _remember_keywords(folder: Folder, keywords: Iterable[str]) -> None:
    folder.keywords = _with_keywords(folder.keywords, keywords)


def _with_keywords(column: str, keywords: Iterable[str]) -> str:
    """A folder's keywords column with ``keywords`` added (the keywords in use, for FLAGS)."""
    known = flagcodec.keywords_of(column)
    return column if known.issuperset(keywords) else flagcodec.keywords_column(known | set(keywords))


class SqlMailStore(MailStore):
    """``MailStore`` on a ``Database`` and a ``BlobStore``; publishes changes to ``hub`` after commits."""

    def __init__(self, database: Database, blobs: BlobStore, hub: ChangeHub | None = None, *,
                 max_attempts: int = 6, headers: HeaderSealer | None = None) -> None:
        self.database = database
        self.blobs = blobs
        self.headers = headers            # seals the cached header columns at rest (gateway.security.at_rest)
        # Sealed columns get a keyed blind index, so that SEARCH need not unseal every row (blind_index.py).
        self.index = BlindIndex(headers.fields.keys) if headers is not None else None
        self.hub = hub or ChangeHub()
        self.max_attempts = max_attempts
        # SQLite: concurrent deliveries/APPENDs share one transaction and one fsync (see group_commit).
        self.group = GroupCommit(self._transaction) if database.is_sqlite else None
        # SQLite: every one-hop writer (deliveries, APPEND, STORE, EXPUNGE, the \Recent claim) queues here, on the
        # event loop: writers arriving while a batch commits share the next transaction, one thread hop and one
        # fsync, and none waits for SQLite's lock in a database thread that the reads need.
        self.append_group = SyncGroupCommit(self._sync_transaction) if database.is_sqlite else None
        # UIDs, MODSEQs and flags of the folders in use, shared by their sessions (gateway.mailstore.index).
        self.indexes = IndexCache()
        # (mailbox id, normalised name) -> folder id, as last read (forgotten at any change of the mailbox's
        # folders): how ``changes_known`` and the writers find a folder's index without reading its row.
        self._folder_ids: dict[tuple[int, str], int] = {}
        # (mailbox id, normalised name, UIDVALIDITY, UID) -> blob id of messages FETCH just listed (bounded).
        self._blob_ids: dict[tuple[int, str, int, int], str] = {}
        # What the hub published, so that an index is trusted only while it holds every change announced: the
        # highest MODSEQ per (mailbox id, folder name); per mailbox, an epoch bumped by an event that names no
        # MODSEQ or no folder (COPY, folders created, renamed, deleted); a global epoch bumped when the first
        # table is emptied (bounded). ``changes_known`` compares, ``_looked`` records.
        self._published: dict[tuple[int, str], int] = {}
        self._mailbox_epochs: dict[int, int] = {}
        self._epoch = 0
        self.hub.observe(self._observed)
        self._folding: set[int] = set()              # mailboxes whose blind index is being folded
        self._fold_tasks: set[asyncio.Task[None]] = set()

    @property
    def shares_commits(self) -> bool:
        return self.group is not None

    # ------------------------------------------------------------------ plumbing

    async def _transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction, retrying lock contention a bounded number of times."""
        async def attempt() -> T:
            async with self.database.session() as session:
                if not self.database.is_sqlite:
                    # Never hang on a lock: fail fast and let the retry loop decide.
                    await session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                return await work(session)

        return await self._retried(attempt)

    async def _run(self, work: Callable[[Connection], T], *, write: bool = False) -> T:
        """``work`` as one transaction in one hop to a database thread (``Database.run_in_transaction``: on SQLite
        a synchronous connection, ``write`` beginning with BEGIN IMMEDIATE), instead of a thread hop and an
        event-loop wake-up per statement; lock contention retried as in ``_transaction``. ``work`` runs off the
        event loop: it may look at the shared indexes (``IndexCache.peek``) but never changes them."""
        def transaction(connection: Connection) -> T:
            if write and not self.database.is_sqlite:
                # Never hang on a lock: fail fast and let the retry loop decide.
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            return work(connection)

        if write and self.append_group is not None:
            # SQLite: the writers of this store take turns in the group commit (see ``__init__``); a writer's
            # refusal (``MailStoreError``) is raised before it writes anything, so it never spoils its batch.
            return cast(T, await self.append_group.run(transaction))
        return await self._retried(lambda: self.database.run_in_transaction(transaction, write=write))

    async def _retried(self, attempt: Callable[[], Awaitable[T]]) -> T:
        for number in range(self.max_attempts):
            try:
                return await attempt()
            except DBAPIError as exc:
                if isinstance(exc, IntegrityError) or not _is_contention(exc):
                    raise
                log.info("mail store contention (attempt %d/%d): %s", number + 1, self.max_attempts, exc.orig)
                await asyncio.sleep(0.02 * 2 ** number * (0.5 + random.random()))
        raise StoreBusy("the mail store is busy; try again shortly")

    async def _sync_transaction(self, work: Callable[[Connection], T]) -> T:
        """``_transaction`` for a synchronous ``work``: one ``run_in_transaction`` (write: BEGIN IMMEDIATE on
        SQLite), the same bounded retries of lock contention."""
        def guarded(connection: Connection) -> T:
            if not self.database.is_sqlite:
                # Never hang on a lock: fail fast and let the retry loop decide.
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            return work(connection)

        return await self._retried(lambda: self.database.run_in_transaction(guarded, write=True))

    # --- in a database thread (``_run``): synchronous, no event loop, no shared state changed

    def _folder_core(self, connection: Connection, ref: FolderRef, *, lock: bool = False) -> _FolderCore:
        """The folder's row (``lock``: for update on PostgreSQL; a SQLite writer holds the lock from BEGIN)."""
        query = _FOLDER_CORE_FOR_UPDATE if lock and not self.database.is_sqlite else _FOLDER_CORE
        return _FolderCore(*_folder_found(connection, query, ref, uidvalidity_at=2))

    def _folder_row_locked(self, connection: Connection, ref: FolderRef) -> _FolderRow:
        """The counters STORE and EXPUNGE need, the folder locked (SQLite: BEGIN IMMEDIATE already holds it)."""
        query = _FOLDER_ROW if self.database.is_sqlite else _LOCK_FOLDER_ROW
        return _FolderRow(*_folder_found(connection, query, ref, uidvalidity_at=1))

    def _index_read(self, connection: Connection, row: _FolderCore, *, load: bool = True,
                    known: tuple[int, Sequence[Row], Sequence[int]] | None = None) -> _IndexRead | None:
        """What brings the folder's shared index to ``row.highestmodseq``: None when it is there already, or
        holds nothing and ``load`` is False; ``_NeedsLoad`` when it holds nothing (loaded apart, once).
        ``known``: changes since some MODSEQ this transaction already read (reused when it is the index's)."""
        index = self.indexes.peek(row.id, row.uidvalidity)
        since = index.modseq if index is not None else -1
        if since >= row.highestmodseq:
            return None
        if since < 0:
            if load:
                raise _NeedsLoad(row.id, row.uidvalidity)
            return None
        if known is not None and known[0] == since:
            return _IndexRead(since, row.highestmodseq, known[1], known[2])
        changed, expunged = _changed_since(connection, row.id, since)
        return _IndexRead(since, row.highestmodseq, changed, expunged)

    def _whole_index(self, connection: Connection, folder_id: int) -> Columns:
        """A folder's UIDs, MODSEQs and flags from two covering indexes (revision 0021), never from the wide
        message rows; on SQLite straight from the driver's cursor (plain tuples, no result-row objects)."""
        if self.database.is_sqlite:
            driver = connection.connection.driver_connection
            assert driver is not None
            rows = driver.execute(_sqlite_text(_WHOLE_INDEX), (folder_id,)).fetchall()
            keyworded = driver.execute(_sqlite_text(_KEYWORDED), (folder_id,)).fetchall()
        else:
            rows = connection.execute(_WHOLE_INDEX, {"folder_id": folder_id}).all()
            keyworded = connection.execute(_KEYWORDED, {"folder_id": folder_id}).all()
        return columns_from(rows, keyworded)

    # --- on the event loop: the shared indexes

    def _install(self, row: _FolderCore, read: _IndexRead | None) -> FolderIndex:
        """Bring the folder's index up with what a transaction read (unless another session's newer read
        already did: the index only moves forward)."""
        index = self.indexes.get(row.id, row.uidvalidity)
        if read is None:
            return index
        if read.columns is not None:
            if index.modseq < read.highest:
                index.install(read.columns, read.highest)
        elif read.since <= index.modseq <= read.highest:   # the changes cover the gap and are not older than it
            index.apply(read.changed, read.expunged, read.highest)
        return index

    def _looked(self, ref: FolderRef, row: _FolderCore, epochs: tuple[int, int]) -> None:
        """After a read of the folder row (the index brought up to it) that began at ``epochs`` (``_epochs``): the
        folder's id and \\Recent mark remembered, and the index verified when it holds at least that row's state
        (``changes_known`` still checks it against the MODSEQs published since)."""
        if len(self._folder_ids) >= 4 * self.indexes.limit:
            self._folder_ids.clear()
        self._folder_ids[(ref.mailbox_id, names.normalise(ref.name))] = row.id
        index = self.indexes.peek(row.id, row.uidvalidity)
        if index is None:
            return
        index.recent_mark = max(index.recent_mark, row.recent_uid)
        if index.modseq >= row.highestmodseq:
            index.verified = epochs

    def _known_index(self, ref: FolderRef) -> FolderIndex | None:
        """The index of the folder ``ref`` names, found without reading its row (None: not known here)."""
        folder_id = self._folder_ids.get((ref.mailbox_id, names.normalise(ref.name)))
        return None if folder_id is None else self.indexes.peek(folder_id, ref.uidvalidity)

    def _committed(self, ref: FolderRef, written: _Written, kind: ChangeKind, *, delivered: bool = False) -> None:
        """After this process committed one change of a folder (MODSEQ ``base`` -> ``modseq``, under the folder
        row's lock: no other commit between the two): the change applied to the folder's index when the index
        holds exactly ``base``, then published (an index left behind is read up by the next look)."""
        index = self.indexes.peek(written.folder_id, written.uidvalidity)
        if index is not None and index.modseq == written.base:
            index.apply(written.changed, written.expunged, written.modseq)
        self._publish(ref.mailbox_id, names.normalise(ref.name), kind, written.modseq, delivered=delivered)

    def _claimed(self, row: _FolderCore) -> None:
        """A \\Recent claim committed up to ``row.recent_uid``."""
        index = self.indexes.peek(row.id, row.uidvalidity)
        if index is not None:
            index.recent_mark = max(index.recent_mark, row.recent_uid)

    async def _load_index(self, need: _NeedsLoad) -> None:
        """A folder's index, read whole once (concurrent first SELECTs wait for the one load); the arrays are
        built in the database thread, the event loop only installs them."""
        index = self.indexes.get(need.folder_id, need.uidvalidity)
        async with index.lock:
            if index.loaded:
                return

            def work(connection: Connection) -> tuple[int | None, Columns]:
                highest = connection.execute(_HIGHESTMODSEQ, {"folder_id": need.folder_id}).scalar()
                return highest, self._whole_index(connection, need.folder_id)

            highest, columns = await self._run(work)
            if highest is not None and index.modseq < highest:
                index.install(columns, int(highest))

    def indexed_folders(self) -> list[int]:
        return self.indexes.recently_used()

    async def largest_folders(self, limit: int) -> list[int]:
        query = select(FOLDERS.c.id).where(FOLDERS.c.message_count > 0).order_by(
            FOLDERS.c.message_count.desc(), FOLDERS.c.id).limit(limit)
        return await self._run(lambda connection: list(connection.execute(query).scalars()))

    async def warm_indexes(self, folder_ids: Sequence[int], max_messages: int) -> tuple[int, int]:
        """Each folder's index loaded as its first SELECT would (``_load_index``: one load at a time, a SELECT
        arriving meanwhile waits for that load instead of starting another), in the order given, while the
        messages loaded stay within ``max_messages``; folders gone since are skipped. Correctness is the
        index's own: every later use catches up from the folder's HIGHESTMODSEQ."""
        wanted = list(dict.fromkeys(folder_ids))[:self.indexes.limit]
        if not wanted or max_messages <= 0:
            return 0, 0
        rows = await self._run(lambda connection: connection.execute(
            _FOLDERS_TO_WARM, {"folder_ids": wanted}).all())
        found = {folder_id: (uidvalidity, count) for folder_id, uidvalidity, count in rows}
        loaded: list[tuple[int, int]] = []
        messages = 0
        for folder_id in wanted:
            if folder_id not in found or messages + found[folder_id][1] > max_messages:
                continue
            uidvalidity, count = found[folder_id]
            await self._load_index(_NeedsLoad(folder_id, uidvalidity))
            loaded.append((folder_id, uidvalidity))
            messages += count
        for folder_id, uidvalidity in reversed(loaded):      # the most wanted ends the most recently used
            if self.indexes.peek(folder_id, uidvalidity) is not None:
                self.indexes.get(folder_id, uidvalidity)
        return len(loaded), messages

    async def _read_with_index(self, ref: FolderRef) -> tuple[_FolderCore, FolderIndex]:
        """The folder's row and its index brought up to that row's HIGHESTMODSEQ, in one read transaction
        (two on the first use of the folder: the load)."""
        for _ in range(8):
            epochs = self._epochs(ref.mailbox_id)          # before the read: a later event counts
            try:
                row, read = await self._run(lambda connection: self._row_and_index(connection, ref))
            except _NeedsLoad as need:
                await self._load_index(need)
                continue
            index = self._install(row, read)
            self._looked(ref, row, epochs)
            if index.modseq >= row.highestmodseq:
                return row, index
        raise StoreBusy("the folder changed too fast to be read; try again shortly")

    def _row_and_index(self, connection: Connection, ref: FolderRef) -> tuple[_FolderCore, _IndexRead | None]:
        row = self._folder_core(connection, ref)
        return row, self._index_read(connection, row)

    async def _take_write_lock(self, session: AsyncSession, mailbox_id: int) -> None:
        """On SQLite, a no-op write first: later reads then belong to the write transaction."""
        if self.database.is_sqlite:
            await session.execute(
                update(MailAccount).where(MailAccount.mailbox_id == mailbox_id)
                .values(last_uidvalidity=MailAccount.last_uidvalidity)
                .execution_options(synchronize_session=False)
            )

    async def _lock_folder(self, session: AsyncSession, ref: FolderRef) -> Folder:
        await self._take_write_lock(session, ref.mailbox_id)
        query = select(Folder).where(Folder.mailbox_id == ref.mailbox_id, Folder.name == names.normalise(ref.name))
        if not self.database.is_sqlite:
            query = query.with_for_update()
        return self._checked(await session.scalar(query.execution_options(populate_existing=True)), ref)

    async def _lock_folders(self, session: AsyncSession, refs: Sequence[FolderRef]) -> list[Folder]:
        """Lock several folders in id order, so two commands never wait on each other in a cycle."""
        found = [await self._find_folder(session, ref) for ref in refs]
        order = sorted({folder.id for folder in found})
        await self._take_write_lock(session, refs[0].mailbox_id)
        query = select(Folder).where(Folder.id.in_(order)).order_by(Folder.id)
        if not self.database.is_sqlite:
            query = query.with_for_update()
        locked = {folder.id: folder for folder in await session.scalars(query.execution_options(populate_existing=True))}
        return [self._checked(locked.get(folder.id), ref) for folder, ref in zip(found, refs, strict=True)]

    async def _find_folder(self, session: AsyncSession, ref: FolderRef) -> Folder:
        folder = await session.scalar(
            select(Folder).where(Folder.mailbox_id == ref.mailbox_id, Folder.name == names.normalise(ref.name))
        )
        return self._checked(folder, ref)

    @staticmethod
    def _checked(folder: Folder | None, ref: FolderRef) -> Folder:
        if folder is None:
            raise FolderNotFound(f"no folder {ref.name!r}")
        if ref.uidvalidity is not None and folder.uidvalidity != ref.uidvalidity:
            raise UidValidityChanged(f"folder {ref.name!r} was re-created")
        return folder

    async def _lock_account(self, session: AsyncSession, mailbox_id: int) -> MailAccount:
        hosted = await session.scalar(select(Mailbox.hosted).where(Mailbox.id == mailbox_id))
        if not hosted:
            raise MailboxNotHosted(f"mailbox {mailbox_id} is not hosted here")
        # Concurrent first uses of a mailbox (provision racing a delivery) must not collide on the key.
        dialect_insert = sqlite_insert if self.database.is_sqlite else pg_insert
        await session.execute(dialect_insert(MailAccount).values(mailbox_id=mailbox_id, last_uidvalidity=0)
                              .on_conflict_do_nothing(index_elements=[MailAccount.mailbox_id]))
        await self._take_write_lock(session, mailbox_id)
        query = select(MailAccount).where(MailAccount.mailbox_id == mailbox_id)
        if not self.database.is_sqlite:
            query = query.with_for_update()
        account = await session.scalar(query.execution_options(populate_existing=True))
        assert account is not None
        return account

    def _publish(self, mailbox_id: int, folder: str | None, kind: ChangeKind, modseq: int = 0, *,
                 delivered: bool = False) -> None:
        self.hub.publish(ChangeEvent(mailbox_id, folder, kind, modseq, delivered))

    def _observed(self, event: ChangeEvent) -> None:
        """Every event of the hub (this store's and any other writer's of this process): see ``__init__``."""
        if event.kind is ChangeKind.FOLDERS or event.folder is None or event.modseq <= 0:
            self._mailbox_epochs[event.mailbox_id] = self._mailbox_epochs.get(event.mailbox_id, 0) + 1
            if event.kind is ChangeKind.FOLDERS or event.folder is None:   # names may mean other folders now
                for key in [key for key in self._folder_ids if key[0] == event.mailbox_id]:
                    del self._folder_ids[key]
            return
        key = (event.mailbox_id, event.folder)
        if key not in self._published and len(self._published) >= 16 * self.indexes.limit:
            self._published.clear()
            self._epoch += 1
        self._published[key] = max(self._published.get(key, 0), event.modseq)

    def _epochs(self, mailbox_id: int) -> tuple[int, int]:
        return self._epoch, self._mailbox_epochs.get(mailbox_id, 0)

    # ------------------------------------------------------------------ folders

    async def list_folders(self, mailbox_id: int) -> list[FolderInfo]:
        return (await self.folders_and_subscriptions(mailbox_id))[0]

    async def folders_and_subscriptions(self, mailbox_id: int) -> tuple[list[FolderInfo], list[str]]:
        """Both in one read transaction, prepared statements on the driver."""
        def work(connection: Connection) -> tuple[Sequence[Any], list[str]]:
            wanted = {"folder_mailbox": mailbox_id}
            folders = _LIST_FOLDERS.run(connection, wanted).fetchall()
            return folders, [name for name, in _SUBSCRIPTIONS.run(connection, wanted).fetchall()]

        folders, subscriptions = await self._run(work)
        subscribed = set(subscriptions)
        all_names = [name for name, _, _ in folders]
        return [
            FolderInfo(name, special_use, name in subscribed, any(names.is_inside(other, name) for other in all_names),
                       uidvalidity)
            for name, special_use, uidvalidity in folders
        ], subscriptions

    async def list_subscriptions(self, mailbox_id: int) -> list[str]:
        return await self._run(lambda connection: [
            name for name, in _SUBSCRIPTIONS.run(connection, {"folder_mailbox": mailbox_id}).fetchall()])

    async def create_folder(self, mailbox_id: int, name: str, *, special_use: str | None = None,
                            subscribe: bool = False) -> FolderInfo:
        name = names.new_folder_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise InvalidFolderName(f"unknown special use {special_use}")  # RFC 6154 3: NO [USEATTR]

        async def work(session: AsyncSession) -> FolderInfo:
            account = await self._lock_account(session, mailbox_id)
            existing = set(await session.scalars(select(Folder.name).where(Folder.mailbox_id == mailbox_id)))
            if name in existing:
                raise FolderExists(f"folder {name!r} already exists")
            for parent in names.parents(name):
                if parent not in existing:
                    await self._insert_folder(session, account, parent, None, subscribe)
            folder = await self._insert_folder(session, account, name, special_use, subscribe)
            return FolderInfo(name, special_use, subscribe, False, folder.uidvalidity)

        info = await self._transaction(work)
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)
        return info

    async def _insert_folder(self, session: AsyncSession, account: MailAccount, name: str,
                             special_use: str | None, subscribe: bool) -> Folder:
        account.last_uidvalidity = _new_uidvalidity(account.last_uidvalidity)
        folder = Folder(mailbox_id=account.mailbox_id, name=name, special_use=special_use,
                        uidvalidity=account.last_uidvalidity, uidnext=1, highestmodseq=1, recent_uid=0,
                        message_count=0, total_bytes=0, keywords=" ")
        session.add(folder)
        if subscribe:
            await self._add_subscription(session, account.mailbox_id, name)
        await session.flush()
        return folder

    async def _add_subscription(self, session: AsyncSession, mailbox_id: int, name: str) -> None:
        known = await session.scalar(
            select(Subscription.id).where(Subscription.mailbox_id == mailbox_id, Subscription.name == name)
        )
        if known is None:
            session.add(Subscription(mailbox_id=mailbox_id, name=name))

    async def delete_folder(self, mailbox_id: int, name: str) -> None:
        name = names.normalise(name)
        if name == INBOX:
            raise CannotDeleteInbox("INBOX cannot be deleted")

        async def work(session: AsyncSession) -> list[str]:
            folder = await self._lock_folder(session, FolderRef(mailbox_id, name))
            children = await session.scalar(select(func.count()).select_from(Folder).where(
                Folder.mailbox_id == mailbox_id, Folder.name.startswith(name + "/", autoescape=True)))
            if children:
                raise FolderHasChildren(f"folder {name!r} has subfolders: delete or move them first")
            blob_ids = set(await session.scalars(delete(Message).where(Message.folder_id == folder.id)
                                                 .returning(Message.blob_id)))
            await session.execute(delete(ExpungedMessage).where(ExpungedMessage.folder_id == folder.id))
            await session.execute(delete(Folder).where(Folder.id == folder.id))
            # The bodies only these messages used go too (see ``_release_bodies``).
            return await session.run_sync(lambda sync: _release_bodies(sync.connection(), mailbox_id, blob_ids))

        files = await self._transaction(work)
        for blob_id in files:
            await self.blobs.delete(blob_id)   # after the commit: a rollback leaves every body in place
        self._publish(mailbox_id, name, ChangeKind.FOLDERS)

    async def rename_folder(self, mailbox_id: int, old: str, new: str) -> None:
        old, new = names.normalise(old), names.new_folder_name(new)
        if new == INBOX or names.is_inside(new, old) or old == new:
            raise InvalidFolderName(f"cannot rename {old!r} to {new!r}")

        async def work(session: AsyncSession) -> None:
            account = await self._lock_account(session, mailbox_id)
            folders = {folder.name: folder for folder in await session.scalars(
                select(Folder).where(Folder.mailbox_id == mailbox_id))}
            if old not in folders:
                raise FolderNotFound(f"no folder {old!r}")
            if new in folders:
                raise FolderExists(f"folder {new!r} already exists")
            for parent in names.parents(new):
                if parent not in folders:
                    folders[parent] = await self._insert_folder(session, account, parent, None, False)
            if old == INBOX:
                await self._rename_inbox(session, account, folders[INBOX], new)
            else:
                self._rename_tree(folders, old, new)

        await self._transaction(work)
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)
        self._publish(mailbox_id, old, ChangeKind.EXPUNGE)

    @staticmethod
    def _rename_tree(folders: dict[str, Folder], old: str, new: str) -> None:
        """RFC 3501 6.3.5: inferior names are renamed too; UIDVALIDITY may stay (UIDs do not change)."""
        moving = [name for name in folders if name == old or names.is_inside(name, old)]
        targets = {name: new + name[len(old):] for name in moving}
        clash = [target for target in targets.values() if target in folders]
        if clash:
            raise FolderExists(f"folder {clash[0]!r} already exists")
        for name in moving:
            folders[name].name = targets[name]

    async def _rename_inbox(self, session: AsyncSession, account: MailAccount, inbox: Folder, new: str) -> None:
        """RFC 3501 6.3.5: renaming INBOX moves its messages to a new folder and leaves INBOX empty.

        The messages keep their UIDs in the new folder (which has its own UIDVALIDITY);
        INBOX keeps its UIDVALIDITY and records the moved UIDs as expunged.
        """
        target = await self._insert_folder(session, account, new, None, False)
        target.uidnext, target.highestmodseq = inbox.uidnext, inbox.highestmodseq
        target.message_count, target.total_bytes, target.keywords = inbox.message_count, inbox.total_bytes, inbox.keywords
        target.recent_uid = inbox.recent_uid
        uids = list(await session.scalars(select(Message.uid).where(Message.folder_id == inbox.id)))
        await session.execute(update(Message).where(Message.folder_id == inbox.id).values(folder_id=target.id)
                              .execution_options(synchronize_session=False))
        modseq = _next_modseq(inbox)
        await self._add_tombstones(session, inbox.id, uids, modseq)
        inbox.message_count, inbox.total_bytes = 0, 0

    async def subscribe(self, mailbox_id: int, name: str) -> None:
        name = names.normalise(name)

        async def work(session: AsyncSession) -> None:
            await self._lock_account(session, mailbox_id)
            await self._add_subscription(session, mailbox_id, name)

        await self._transaction(work)
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)

    async def unsubscribe(self, mailbox_id: int, name: str) -> None:
        name = names.normalise(name)

        async def work(session: AsyncSession) -> None:
            await session.execute(delete(Subscription).where(Subscription.mailbox_id == mailbox_id,
                                                             Subscription.name == name))

        await self._transaction(work)
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)

    async def status(self, folder: FolderRef) -> FolderStatus:
        """The folder row (prepared); its unseen and recent messages counted from the folder's shared index when
        that holds exactly the row's state (same HIGHESTMODSEQ: the same messages and flags), else counted by
        the database in the same transaction (one statement, built once).

        PostgreSQL: always the database, row and counts in one statement. Its READ COMMITTED gives each
        statement a snapshot of its own, so an index read there may hold changes newer than the HIGHESTMODSEQ it
        is filed under (read a moment after the folder row), and a count apart from the row may hold a change
        the row's HIGHESTMODSEQ does not: either gave UNSEEN of one state with HIGHESTMODSEQ of an older one."""
        if not self.database.is_sqlite:
            return await self._status_in_one_statement(folder)
        wanted = {"folder_mailbox": folder.mailbox_id, "folder_name": names.normalise(folder.name)}
        for _ in range(2):
            row, counted = await self._run(lambda connection: self._status_read(connection, wanted))
            if row is None:
                raise FolderNotFound(f"no folder {folder.name!r}")
            folder_id, name, messages, uidnext, uidvalidity, highestmodseq, size, recent_uid = row
            if folder.uidvalidity is not None and uidvalidity != folder.uidvalidity:
                raise UidValidityChanged(f"folder {folder.name!r} was re-created")
            if counted is not None:
                return FolderStatus(name, messages, counted[1], uidnext, uidvalidity, counted[0], highestmodseq, size)
            index = self.indexes.peek(folder_id, uidvalidity)
            if index is not None and index.modseq == highestmodseq and len(index.uids) == messages:
                recent = len(index.uids) - bisect.bisect_right(index.uids, recent_uid)
                return FolderStatus(name, messages, recent, uidnext, uidvalidity, index.unseen()[0], highestmodseq,
                                    size)
            wanted["count"] = True          # the index moved on during the read (rare): count in the database
        raise StoreBusy("the folder changed too fast to be read; try again shortly")

    async def _status_in_one_statement(self, folder: FolderRef) -> FolderStatus:
        wanted = {"folder_mailbox": folder.mailbox_id, "folder_name": names.normalise(folder.name)}
        row = await self._run(lambda connection: _STATUS_ROW_COUNTED.run(connection, wanted).fetchone())
        if row is None:
            raise FolderNotFound(f"no folder {folder.name!r}")
        _, name, messages, uidnext, uidvalidity, highestmodseq, size, _, unseen, recent = row
        if folder.uidvalidity is not None and uidvalidity != folder.uidvalidity:
            raise UidValidityChanged(f"folder {folder.name!r} was re-created")
        return FolderStatus(name, messages, int(recent or 0), uidnext, uidvalidity, int(unseen or 0), highestmodseq,
                            size)

    def _status_read(self, connection: Connection, wanted: dict[str, Any]) -> tuple[Any, tuple[int, int] | None]:
        """(the folder row, None) when its shared index holds the row's state, else (the row, (unseen, recent))."""
        row = _STATUS_ROW.run(connection, wanted).fetchone()
        if row is None:
            return None, None
        index = self.indexes.peek(row[0], row[4])
        if not wanted.get("count") and index is not None and index.modseq == row[5]:
            return row, None
        counted = connection.execute(_STATUS_COUNTS, {"folder_id": row[0], "recent": row[7]}).one()
        return row, (int(counted[0] or 0), int(counted[1] or 0))

    async def select(self, folder: FolderRef, *, read_only: bool = False) -> FolderSnapshot:
        """A read transaction (the folder row and its shared index brought up to date, one thread hop); a write
        only when there is ``\\Recent`` to claim."""
        row, index = await self._read_with_index(folder)
        uids = index.uids          # the index's array itself: sessions share it until theirs diverges
        fresh = uids[bisect.bisect_right(uids, row.recent_uid):]
        if read_only:
            return self._snapshot(folder, row, index, frozenset(fresh), read_only)
        if row.recent_uid >= row.uidnext - 1 and not fresh:
            return self._snapshot(folder, row, index, frozenset(), read_only)   # nothing arrived since the claim
        claimed_row, recent = await self._run(lambda connection: self._claim(connection, folder), write=True)
        self._claimed(claimed_row)
        if index.modseq < claimed_row.highestmodseq:     # messages came in between the two transactions
            row, index = await self._read_with_index(folder)
        return self._snapshot(folder, row, index, recent, read_only)

    def _claim(self, connection: Connection, folder: FolderRef) -> tuple[_FolderCore, frozenset[int]]:
        """RFC 3501 2.3.2: \\Recent belongs to the first session that sees a message, and to no other (the folder
        row locked: two sessions never claim the same UID)."""
        row = self._folder_core(connection, folder, lock=True)
        mark = row.uidnext - 1
        if row.recent_uid >= mark:
            return row, frozenset()
        claimed = connection.execute(_UIDS_ABOVE, {"folder_id": row.id, "above": row.recent_uid}).scalars().all()
        connection.execute(_SET_RECENT, {"folder_id": row.id, "recent": mark})
        return dataclasses.replace(row, recent_uid=mark), frozenset(claimed)

    def _snapshot(self, ref: FolderRef, row: _FolderCore, index: FolderIndex, recent: frozenset[int],
                  read_only: bool) -> FolderSnapshot:
        unseen, first_unseen = index.unseen()
        keywords = sorted(flagcodec.keywords_of(row.keywords))
        # The index may be a little ahead of this transaction's folder row (another session refreshed it since).
        uidnext = max(row.uidnext, index.uids[-1] + 1 if index.uids else 1)
        return FolderSnapshot(
            ref=FolderRef(ref.mailbox_id, row.name, row.uidvalidity), special_use=row.special_use,
            uidvalidity=row.uidvalidity, uidnext=uidnext, highestmodseq=max(row.highestmodseq, index.modseq),
            uids=index.uids, recent_uids=recent, unseen=unseen, first_unseen=first_unseen,
            flags=(*SYSTEM_FLAGS, *keywords),
            permanent_flags=() if read_only else (*PERMANENT_FLAGS[:-1], *keywords, PERMANENT_FLAGS[-1]),
            read_only=read_only,
        )

    async def claim_recent(self, folder: FolderRef, *, among: Collection[int] = ()) -> frozenset[int]:
        """Nothing to do when this process saw a claim past ``among`` committed (another session saw them
        first); else a read first (when every message was claimed already, no write), unless the folder's index
        is known current: then this process's claims are all in its mark and the claim's own read decides."""
        index = self._known_index(folder)
        if among and index is not None and index.recent_mark >= max(among):
            return frozenset()
        if self._current_index(folder) is None:      # else every claim of this process is in ``recent_mark``
            epochs = self._epochs(folder.mailbox_id)
            row = await self._run(lambda connection: self._folder_core(connection, folder))
            self._looked(folder, row, epochs)
            if row.recent_uid >= row.uidnext - 1:
                return frozenset()
        claimed_row, claimed = await self._run(lambda connection: self._claim(connection, folder), write=True)
        self._claimed(claimed_row)
        return claimed

    # ------------------------------------------------------------------ messages

    async def fetch(self, folder: FolderRef, uids: UidSet, *, changed_since: int | None = None) -> list[MessageMeta]:
        return await self.fetch_meta(folder, uids, changed_since=changed_since)

    async def fetch_meta(self, folder: FolderRef, uids: UidSet, *, changed_since: int | None = None,
                         envelope: bool = True, headers: bool = True) -> list[MessageMeta]:
        """Only the sealed columns asked for are read and unsealed (an ENVELOPE: one decryption per message).
        SQL Core columns (no ORM loading); the ENVELOPE column as its raw JSON text, decoded once here."""
        names = _MetaRow.NAMES if headers else _MetaRow.CLEAR
        if not envelope:
            names = tuple(name for name in names if name not in ("envelope", "envelope_sealed"))
        names = (*names, "blob_id")
        columns = _meta_columns(names)

        def work(connection: Connection) -> list[_MetaRow]:
            row = self._folder_core(connection, folder)
            if changed_since is None and len(uids.ranges) == 1:     # the usual FETCH: one range, prepared
                low, high = uids.ranges[0]
                found = _meta_in_range(names).rows(connection, {"folder_id": row.id, "low": low, "high": high})
                return [_MetaRow.of(names, values) for values in found]
            query = (select(*columns).where(_MESSAGES.c.folder_id == row.id, _core_uid_clause(uids))
                     .order_by(_MESSAGES.c.uid))
            if changed_since is not None:
                query = query.where(_MESSAGES.c.modseq > changed_since)  # RFC 7162 3.1.4.1 CHANGEDSINCE
            return [_MetaRow.of(names, values) for values in connection.execute(query).all()]

        rows = await self._run(work)
        self._remember_blobs(folder, rows)
        if envelope:
            await self._open_envelopes(folder.mailbox_id, rows)
        if headers:
            await self._unseal(folder.mailbox_id, rows)
        if len(uids.ranges) > 1:               # uid_clause may be a coarser range (search.MAX_SQL_RANGES)
            rows = [message for message in rows if message.uid in uids]
        return [_meta(message) for message in rows]

    async def fetch_envelopes(self, folder: FolderRef, uids: UidSet) -> dict[int, bytes | dict[str, Any]]:
        """The ENVELOPE columns of the listed messages in one SQL Core statement (one transaction), the sealed
        octets cut in their parts by the database, then every sealed rendering opened in one loop: no row
        object, no structure decoded or rendered."""
        def work(connection: Connection) -> list[tuple[int, Any, Any, Any, Any]]:
            row = self._folder_core(connection, folder)
            if len(uids.ranges) == 1:
                low, high = uids.ranges[0]
                return list(_ENVELOPES_IN_RANGE.run(connection, {"folder_id": row.id, "low": low,
                                                                 "high": high}).fetchall())
            query = _ENVELOPES.where(_MESSAGES.c.folder_id == row.id, _core_uid_clause(uids))
            return list(connection.execute(query))

        rows = await self._run(work)
        if len(uids.ranges) > 1:               # the clause may be a coarser range (search.MAX_SQL_RANGES)
            rows = [row for row in rows if row[0] in uids]
        opened = await self._opened_envelope_parts(folder.mailbox_id, rows)
        return dict(zip([row[0] for row in rows], opened, strict=True))

    async def _opened_envelope_parts(self, mailbox_id: int,
                                     rows: Sequence[tuple[int, Any, Any, Any, Any]]) -> list[bytes | dict[str, Any]]:
        """``fetch_envelopes``' rows (uid, key id, nonce, ciphertext, JSON column) opened: the usual case, every
        row in the binary form, in one call; rows of earlier forms as ``_opened_envelopes`` opens them."""
        if self.headers is None:
            return await self._opened_envelopes(mailbox_id, [None] * len(rows), [row[4] for row in rows])
        owner = mailbox_owner(mailbox_id)
        current = [position for position, row in enumerate(rows) if row[1] is not None]
        if len(current) == len(rows):
            return list(await self.headers.fields.open_many_parts(
                owner, ENVELOPE_WIRE_COLUMN, [row[1] for row in rows], [row[2] for row in rows],
                [row[3] for row in rows]))
        opened = await self._opened_envelopes(mailbox_id, [None] * len(rows), [row[4] for row in rows])
        wires = await self.headers.fields.open_many_parts(
            owner, ENVELOPE_WIRE_COLUMN, [rows[i][1] for i in current], [rows[i][2] for i in current],
            [rows[i][3] for i in current])
        for position, wire in zip(current, wires, strict=True):
            opened[position] = wire
        return opened

    async def fetch_flags(self, folder: FolderRef, uids: UidSet, *,
                          changed_since: int | None = None) -> FlagListing:
        _, index = await self._read_with_index(folder)
        return index.listing(uids, changed_since)

    async def _unseal(self, mailbox_id: int, rows: Sequence[Message] | Sequence[_MetaRow]) -> None:
        if self.headers is not None:
            await self.headers.open_rows(mailbox_owner(mailbox_id), rows)

    async def _open_envelopes(self, mailbox_id: int, rows: Sequence[_MetaRow]) -> None:
        """The ENVELOPE columns of each row, opened (``_opened_envelopes``): a rendering into ``envelope_wire``
        (the structure then empty), else the structure."""
        opened = await self._opened_envelopes(mailbox_id, [row.envelope_sealed for row in rows],
                                              [row.envelope for row in rows])
        for row, envelope in zip(rows, opened, strict=True):
            if isinstance(envelope, bytes):
                row.envelope, row.envelope_wire = {}, envelope
            else:
                row.envelope = envelope

    async def _opened_envelopes(self, mailbox_id: int, sealed: Sequence[bytes | None],
                                stored: Sequence[Any]) -> list[bytes | dict[str, Any]]:
        """ENVELOPE columns opened. The rendering sealed as raw octets (``envelope_sealed``, see
        gateway.mailstore.envelopes) or, in rows stored before, as a token in JSON (``{"imap1": token}``): all
        decrypted in one loop, as bytes. Else the structure (JSON text on SQLite, decoded by PostgreSQL's
        driver), unsealed first when sealed in the earliest form (``{"sealed": token}``). Without the key (a
        store opened without its sealer), or another version's rendering: an empty structure, and the IMAP
        side parses the message's header."""
        owner = mailbox_owner(mailbox_id)
        opened: list[bytes | dict[str, Any]] = [{} for _ in stored]
        raws, raw_positions = [], []
        for position, value in enumerate(sealed):
            raw = None if value is None else sealed_envelope_octets(value)
            if raw is not None:
                raws.append(raw)
                raw_positions.append(position)
            elif value is None:
                await self._open_envelope_json(owner, stored[position], opened, position, raws, raw_positions)
        if raws and self.headers is not None:
            wires = await self.headers.fields.open_many_raw(owner, ENVELOPE_WIRE_COLUMN, raws)
            for position, wire in zip(raw_positions, wires, strict=True):
                opened[position] = wire
        return opened

    async def _open_envelope_json(self, owner: str, value: Any, opened: list[bytes | dict[str, Any]],
                                  position: int, raws: list[bytes], raw_positions: list[int]) -> None:
        """An ENVELOPE column in an earlier form: its structure into ``opened``, or its sealed rendering's
        octets added to those to decrypt."""
        form, content = envelope_form(value)
        if form == "clear":
            opened[position] = content
        elif self.headers is None:
            return
        elif form == WIRE_VERSION:
            raws.append(sealed_octets(owner, ENVELOPE_WIRE_COLUMN, content))
            raw_positions.append(position)
        elif form == "sealed":
            opened[position] = json.loads(await self.headers.fields.open(owner, "envelope", content) or "{}")

    def _remember_blobs(self, folder: FolderRef, rows: Sequence[_MetaRow]) -> None:
        """The blob ids of messages just listed, so that the FETCH of their bodies that follows needs no read:
        a message of a folder name and UIDVALIDITY never changes body (RFC 3501 2.3.1.1: UIDs are not reused)."""
        if folder.uidvalidity is None:
            return
        if len(self._blob_ids) + len(rows) > BLOB_IDS_KEPT:
            self._blob_ids.clear()
        name = names.normalise(folder.name)
        for row in rows[:BLOB_IDS_KEPT]:
            if row.blob_id is not None:
                self._blob_ids[(folder.mailbox_id, name, folder.uidvalidity, row.uid)] = row.blob_id

    async def _blob_of(self, folder: FolderRef, uid: int) -> str:
        if folder.uidvalidity is not None:
            known = self._blob_ids.get((folder.mailbox_id, names.normalise(folder.name), folder.uidvalidity, uid))
            if known is not None:
                return known

        def work(connection: Connection) -> str | None:
            row = self._folder_core(connection, folder)
            found = _BLOB_OF.run(connection, {"folder_id": row.id, "uid": uid}).fetchone()
            return None if found is None else cast(str, found[0])

        blob_id = await self._run(work)
        if blob_id is None:
            raise MessageNotFound(f"no message with UID {uid}")
        return blob_id

    async def open_message(self, folder: FolderRef, uid: int) -> MessageBody:
        blob_id = await self._blob_of(folder, uid)
        try:
            return _BlobBody(await self.blobs.open(mailbox_owner(folder.mailbox_id), blob_id))
        except (FileNotFoundError, BlobNotFound):
            # Expunged by another session between the query and the open (its blob deleted after the commit).
            raise MessageNotFound(f"no message with UID {uid}") from None

    async def message_bytes(self, folder: FolderRef, uid: int) -> bytes:
        """Two hops: the blob id read, then the blob opened and read in one worker-thread hop."""
        blob_id = await self._blob_of(folder, uid)
        try:
            return await self.blobs.read_whole(mailbox_owner(folder.mailbox_id), blob_id)
        except (FileNotFoundError, BlobNotFound):
            raise MessageNotFound(f"no message with UID {uid}") from None

    async def append(self, folder: FolderRef, message: MessageSource, *, flags: Iterable[str] = (),
                     internaldate: dt.datetime | None = None) -> AppendResult:
        added = await self.add_message(folder, message, flags=flags, internaldate=internaldate)
        return added.result

    async def add_message(self, folder: FolderRef, message: MessageSource, *, flags: Iterable[str] = (),
                          internaldate: dt.datetime | None = None, delivery_key: str | None = None,
                          headers: CachedHeaders | None = None, after: AfterInsert | None = None,
                          before: BeforeInsert | None = None, filing_due: bool = True) -> AddedMessage:
        """APPEND and local delivery: write the blob durably, then commit the row (idempotent per delivery key).

        ``headers``: the message's header fields already parsed (``parse_headers``), saving a parse.
        ``after(connection, delivery_row_id)`` runs in the transaction that adds the message (not for a duplicate),
        synchronously in the database thread (append_rows): the caller's rows (the queue's outcome, the filing
        job) are committed with the delivery, or not at all. ``before(connection)`` runs first in that
        transaction, before any row: the caller's last check (raising a ``MailStoreError`` refuses).
        ``filing_due``: the delivery's filing job is still to run (the change event wakes the filing worker);
        False when it ended at delivery.
        """
        bits, keywords = flagcodec.encode(flags)
        replayable = isinstance(message, bytes | bytearray | memoryview | Path)
        if not replayable:
            # A stream cannot be read twice: refuse a duplicate, a missing folder or a full mailbox before
            # consuming it (a retry of the caller then starts over). Bytes skip this read transaction: the
            # write transaction checks the same things.
            async with self.database.session() as session:
                if delivery_key is not None and (done := await self._delivered_in(session, folder.mailbox_id,
                                                                                  delivery_key)):
                    return AddedMessage(done, duplicate=True)
                await self._find_folder(session, folder)
        owner = mailbox_owner(folder.mailbox_id)
        # A small body is sealed in memory and inserted with its row (``inline_blobs``): durable with the
        # transaction's commit, no file of its own (``storage/blobs.py``).
        if headers is None and isinstance(message, bytes | bytearray | memoryview):
            # Parsed and sealed in one worker-thread hop (the quota is checked by the write transaction).
            prepared, stored = await self.blobs.put_prepared(owner, lambda: _with_source(_prepare(message)),
                                                             inline=True)
        else:
            prepared = await asyncio.to_thread(_prepare, message) if headers is None \
                else _Prepared(headers, message, None)
            if prepared.known_size is not None and not isinstance(message, bytes | bytearray | memoryview):
                await self._check_quota(folder.mailbox_id, prepared.known_size)  # refuse before writing 50 MB
            stored = await self.blobs.put(owner, prepared.source, inline=True)
        when = internaldate or utcnow()
        tokens = await self.index.tokens_for(folder.mailbox_id, prepared.headers) if self.index is not None else None
        sealed = await self.headers.seal(owner, prepared.headers) if self.headers is not None else prepared.headers

        rows = AppendRows(folder, stored, sealed, bits, keywords, when, delivery_key, tokens, after, before)

        def work(connection: Connection) -> AppendResult:
            return insert_append(connection, rows)

        try:
            result = await (self.append_group.run(work) if self.append_group is not None
                            else self._sync_transaction(work))
        except IntegrityError:
            await self.blobs.discard(stored)
            done = await self._delivered(folder.mailbox_id, delivery_key) if delivery_key else None
            if done is None:
                raise
            return AddedMessage(done, duplicate=True)  # a concurrent redelivery won the race
        except BaseException as exc:
            if not getattr(exc, "committed", False):  # a row committed by its group still needs its blob
                await self.blobs.discard(stored)
            raise
        folder_id = self._folder_ids.get((folder.mailbox_id, names.normalise(folder.name)))
        self._committed(folder, _Written(-1 if folder_id is None else folder_id, result.uidvalidity, result.modseq - 1,
                                         result.modseq, [(result.uid, result.modseq, bits,
                                                          flagcodec.keywords_column(keywords))]),
                        ChangeKind.EXISTS, delivered=delivery_key is not None and filing_due)
        if tokens:
            self._indexed(folder.mailbox_id)
        return AddedMessage(result, duplicate=False)

    def _indexed(self, mailbox_id: int, count: int = 1) -> None:
        """``count`` messages of the mailbox were committed with unposted index tokens: once enough wait,
        fold them into the posting lists in the background (``blind_index.fold``). SEARCH reads unposted
        messages too, so a fold late or failed only makes it slower, never incomplete."""
        if self.index is None or not self.index.note_unposted(mailbox_id, count) or mailbox_id in self._folding:
            return
        self._folding.add(mailbox_id)
        task = asyncio.get_running_loop().create_task(self._fold(mailbox_id), name="mailstore-index-fold")
        self._fold_tasks.add(task)
        task.add_done_callback(self._fold_tasks.discard)

    async def _fold(self, mailbox_id: int) -> None:
        index = self.index
        assert index is not None
        try:
            await index.maintain(mailbox_id, self._sync_transaction, self._run)
        except Exception:   # noqa: BLE001 - the messages stay unposted, SEARCH still finds them; next fold retries
            log.exception("folding the search index of mailbox %d failed", mailbox_id)
        finally:
            self._folding.discard(mailbox_id)

    def _insert_message(self, session: AsyncSession, folder: Folder, stored: StoredBlob, headers: CachedHeaders,
                        bits: int, keywords: frozenset[str], internaldate: dt.datetime) -> AppendResult:
        uid = folder.uidnext
        folder.uidnext += 1
        modseq = _next_modseq(folder)
        folder.message_count += 1
        folder.total_bytes += stored.size
        _remember_keywords(folder, keywords)
        session.add(Message(
            folder_id=folder.id, uid=uid, modseq=modseq, system_flags=bits,
            keywords=flagcodec.keywords_column(keywords), internaldate=internaldate, size=stored.size,
            blob_id=stored.blob_id, message_id=headers.message_id, subject=headers.subject,
            from_addr=headers.from_addr, to_addr=headers.to_addr, cc_addr=headers.cc_addr,
            sent_date=headers.sent_date, envelope=headers.envelope, envelope_sealed=headers.envelope_sealed,
        ))
        return AppendResult(folder.uidvalidity, uid, modseq)

    async def _delivered(self, mailbox_id: int, delivery_key: str) -> AppendResult | None:
        async with self.database.session() as session:
            return await self._delivered_in(session, mailbox_id, delivery_key)

    @staticmethod
    async def _delivered_in(session: AsyncSession, mailbox_id: int, delivery_key: str) -> AppendResult | None:
        done = (await session.execute(select(Delivery.uidvalidity, Delivery.uid).where(
            Delivery.mailbox_id == mailbox_id, Delivery.delivery_key == delivery_key))).first()
        return None if done is None else AppendResult(done[0], done[1], 0)

    async def _usage(self, session: AsyncSession, mailbox_id: int) -> tuple[int, int, int]:
        """(bytes used, messages, quota in bytes; 0 means unlimited)."""
        used, count = (await session.execute(
            select(func.coalesce(func.sum(Folder.total_bytes), 0), func.coalesce(func.sum(Folder.message_count), 0))
            .where(Folder.mailbox_id == mailbox_id)
        )).one()
        limit = await session.scalar(select(Mailbox.quota_bytes).where(Mailbox.id == mailbox_id))
        if limit is None:
            raise MailboxNotHosted(f"mailbox {mailbox_id} does not exist")
        return int(used), int(count), int(limit)

    async def _enforce_quota(self, session: AsyncSession, mailbox_id: int, adding: int) -> None:
        # One statement: the quota and what the folders hold (every delivery asks).
        used_now = (select(func.coalesce(func.sum(Folder.total_bytes), 0)).where(Folder.mailbox_id == mailbox_id)
                    .scalar_subquery())
        row = (await session.execute(select(Mailbox.quota_bytes, used_now).where(Mailbox.id == mailbox_id))).first()
        if row is None or row[0] is None:
            raise MailboxNotHosted(f"mailbox {mailbox_id} does not exist")
        limit, used = int(row[0]), int(row[1])
        if limit and used + adding > limit:
            # RFC 9208 4.3 / SMTP 552 5.2.2 (RFC 3463 3.3).
            raise QuotaExceeded(f"mailbox over quota ({used + adding} > {limit} octets)")

    async def _check_quota(self, mailbox_id: int, adding: int) -> None:
        async with self.database.session() as session:
            await self._enforce_quota(session, mailbox_id, adding)

    async def store_flags(self, folder: FolderRef, uids: UidSet, mode: StoreMode, flags: Iterable[str], *,
                          unchanged_since: int | None = None) -> StoreResult:
        """One transaction in SQL Core, in one thread hop: lock the folder row, read the flags of the set, write the
        changed rows (one executemany) and the folder's MODSEQ; no ORM objects, no envelope or header column read."""
        bits, keywords = flagcodec.encode(flags)
        written: list[_Written] = []

        def work(connection: Connection) -> StoreResult:
            written.clear()
            row = self._folder_row_locked(connection, folder)
            if len(uids.ranges) == 1:
                low, high = uids.ranges[0]
                current = _STORE_CURRENT.run(connection, {"folder_id": row.id, "low": low, "high": high}).fetchall()
            else:
                current = connection.execute(select(*_STORE_CURRENT_COLUMNS).where(
                    MESSAGES.c.folder_id == row.id, _core_uid_clause(uids)).order_by(MESSAGES.c.uid)).all()
            conflicts: list[int] = []
            unchanged: list[FlagUpdate] = []
            changed: list[tuple[int, int, int, str]] = []
            for message_id, uid, modseq, old_bits, old_keywords in current:
                if uid not in uids:
                    continue
                if unchanged_since is not None and modseq > unchanged_since:
                    conflicts.append(uid)
                    continue
                new_bits, new_keywords = flagcodec.apply(mode, old_bits, flagcodec.keywords_of(old_keywords),
                                                         bits, keywords)
                column = flagcodec.keywords_column(new_keywords)
                if new_bits == old_bits and column == old_keywords:
                    unchanged.append(FlagUpdate(uid, flagcodec.decode(old_bits, old_keywords), modseq))
                else:
                    changed.append((message_id, uid, new_bits, column))
            if not changed:
                return StoreResult((), tuple(conflicts), row.highestmodseq, tuple(unchanged))
            # RFC 7162 3.1.3: one new MODSEQ for the messages this command changed; unchanged ones keep theirs.
            modseq = row.highestmodseq + 1
            _SET_FLAGS_AT.run_many(connection, [
                {"row_id": message_id, "new_bits": new_bits, "new_keywords": column, "new_modseq": modseq}
                for message_id, _, new_bits, column in changed])
            _FOLDER_FLAGS_CHANGED.run(connection, {"folder_id": row.id, "new_modseq": modseq,
                                                   "new_keywords": _with_keywords(row.keywords, keywords)})
            updated = tuple(FlagUpdate(uid, flagcodec.decode(new_bits, column), modseq)
                            for _, uid, new_bits, column in changed)
            written.append(_Written(row.id, row.uidvalidity, row.highestmodseq, modseq,
                                    [(uid, modseq, new_bits, column) for _, uid, new_bits, column in changed]))
            return StoreResult(updated, tuple(conflicts), modseq, tuple(unchanged))

        result = await self._run(work, write=True)
        if result.updated:
            self._committed(folder, written[-1], ChangeKind.FLAGS)
        return result

    async def copy(self, folder: FolderRef, uids: UidSet, destination: FolderRef) -> CopyResult:
        result = await self._transaction(lambda session: self._copy(session, folder, uids, destination, move=False))
        copied, _ = result
        if copied.dest_uids:
            self._publish(destination.mailbox_id, names.normalise(destination.name), ChangeKind.EXISTS)
            self._indexed(destination.mailbox_id, len(copied.dest_uids))
        return copied

    async def move(self, folder: FolderRef, uids: UidSet, destination: FolderRef) -> MoveResult:
        """RFC 6851: copy then expunge the originals, atomically (one transaction)."""
        copied, expunged = await self._transaction(
            lambda session: self._copy(session, folder, uids, destination, move=True))
        assert expunged is not None
        if copied.dest_uids:
            self._publish(destination.mailbox_id, names.normalise(destination.name), ChangeKind.EXISTS)
            self._publish(folder.mailbox_id, names.normalise(folder.name), ChangeKind.EXPUNGE, expunged.highestmodseq)
            self._indexed(destination.mailbox_id, len(copied.dest_uids))
        return MoveResult(copied, expunged)

    async def _copy(self, session: AsyncSession, ref: FolderRef, uids: UidSet, destination: FolderRef, *,
                    move: bool) -> tuple[CopyResult, ExpungeResult | None]:
        if destination.mailbox_id != ref.mailbox_id:
            raise FolderNotFound("copying between mailboxes is not supported")  # their blobs use other keys
        # RFC 6851 3.3 allows a MOVE into the source folder itself (as Dovecot does): the copies take new UIDs
        # (UIDNEXT and a MODSEQ first), then the originals are expunged under the next MODSEQ.
        source, target = await self._lock_folders(session, [ref, destination])
        # The copies share their sources' bodies: the source rows are read FOR SHARE (PostgreSQL), so no
        # deletion of theirs (an EXPUNGE elsewhere) commits before the copies do, and whoever then drops a body
        # sees the copies (see ``_release_bodies``). A source expunged before is not found, hence not copied:
        # COPYUID names only the messages copied (RFC 4315 3; RFC 2180 4.4: the others were expunged meanwhile).
        query = select(Message).where(Message.folder_id == source.id, uid_clause(uids)).order_by(Message.uid)
        if not self.database.is_sqlite:
            query = query.with_for_update(read=True)
        messages = [m for m in await session.scalars(query) if m.uid in uids]
        if not move:
            await self._enforce_quota(session, ref.mailbox_id, sum(m.size for m in messages))
        dest_uids = self._insert_copies(session, target, messages) if messages else ()
        if self.index is not None and dest_uids:
            await self._index_copies(session, target.id, messages, dest_uids)
        copied = CopyResult(target.uidvalidity, tuple(m.uid for m in messages), dest_uids)
        expunged = await self._remove(session, source, messages) if move else None
        return copied, expunged

    def _insert_copies(self, session: AsyncSession, target: Folder, messages: Sequence[Message]) -> tuple[int, ...]:
        modseq = _next_modseq(target)
        first = target.uidnext
        session.add_all(Message(
            folder_id=target.id, uid=first + index, modseq=modseq, system_flags=m.system_flags, keywords=m.keywords,
            internaldate=m.internaldate, size=m.size, blob_id=m.blob_id, message_id=m.message_id, subject=m.subject,
            from_addr=m.from_addr, to_addr=m.to_addr, cc_addr=m.cc_addr, sent_date=m.sent_date, envelope=m.envelope,
            envelope_sealed=m.envelope_sealed,
        ) for index, m in enumerate(messages))
        target.uidnext = first + len(messages)
        target.message_count += len(messages)
        target.total_bytes += sum(m.size for m in messages)
        _remember_keywords(target, set().union(*(flagcodec.keywords_of(m.keywords) for m in messages)))
        return tuple(range(first, first + len(messages)))

    @staticmethod
    async def _index_copies(session: AsyncSession, target_id: int, messages: Sequence[Message],
                            dest_uids: Sequence[int]) -> None:
        """Copies share their originals' blind index tokens (same mailbox, same owner key)."""
        await session.flush()
        copy_ids = {uid: message_id for uid, message_id in (await session.execute(select(Message.uid, Message.id).where(
            Message.folder_id == target_id, Message.uid.between(dest_uids[0], dest_uids[-1])))).all()}
        await BlindIndex.copy(session, [(m.id, copy_ids[uid]) for m, uid in zip(messages, dest_uids, strict=True)])

    async def _remove(self, session: AsyncSession, folder: Folder, messages: Sequence[Message]) -> ExpungeResult:
        if not messages:
            return ExpungeResult((), folder.highestmodseq)
        modseq = _next_modseq(folder)
        uids = [m.uid for m in messages]
        await session.execute(delete(Message).where(Message.id.in_([m.id for m in messages])))
        await self._add_tombstones(session, folder.id, uids, modseq)
        folder.message_count -= len(messages)
        folder.total_bytes -= sum(m.size for m in messages)
        return ExpungeResult(tuple(uids), modseq)

    async def _add_tombstones(self, session: AsyncSession, folder_id: int, uids: Sequence[int], modseq: int) -> None:
        if uids:
            await session.execute(insert(ExpungedMessage),
                                  [{"folder_id": folder_id, "uid": uid, "modseq": modseq} for uid in uids])

    async def expunge(self, folder: FolderRef, uids: UidSet | None = None) -> ExpungeResult:
        """One transaction in SQL Core, in one thread hop: the \\Deleted messages (of ``uids``), their rows deleted,
        tombstones written, the folder's counters and MODSEQ updated; their bodies dropped after the commit."""
        written: list[_Written] = []

        def work(connection: Connection) -> tuple[ExpungeResult, list[str]]:
            written.clear()
            row = self._folder_row_locked(connection, folder)
            if uids is None or len(uids.ranges) == 1:
                low, high = uids.ranges[0] if uids is not None else (0, 2**32)
                found = _DOOMED_IN_RANGE.run(connection, {"folder_id": row.id, "low": low, "high": high}).fetchall()
            else:
                found = connection.execute(select(*_DOOMED_COLUMNS).where(
                    MESSAGES.c.folder_id == row.id, _DELETED, _core_uid_clause(uids)).order_by(MESSAGES.c.uid)).all()
            doomed = [message for message in found if uids is None or message[1] in uids]
            if not doomed:
                return ExpungeResult((), row.highestmodseq), []
            modseq = row.highestmodseq + 1
            gone = [uid for _, uid, _, _ in doomed]
            _DELETE_MESSAGE.run_many(connection, [{"row_id": message[0]} for message in doomed])
            _INSERT_TOMBSTONE.run_many(connection, [{"folder_id": row.id, "uid": uid, "modseq": modseq} for uid in gone])
            _FOLDER_EXPUNGED.run(connection, {"folder_id": row.id, "new_modseq": modseq, "gone_count": len(doomed),
                                              "gone_bytes": sum(size for _, _, size, _ in doomed)})
            written.append(_Written(row.id, row.uidvalidity, row.highestmodseq, modseq, expunged=gone))
            files = _release_bodies(connection, folder.mailbox_id, {blob_id for *_, blob_id in doomed})
            return ExpungeResult(tuple(gone), modseq), files

        result, blob_ids = await self._run(work, write=True)
        if result.uids:
            self._committed(folder, written[-1], ChangeKind.EXPUNGE)
        for blob_id in blob_ids:
            await self.blobs.delete(blob_id)   # after the commit: a rollback leaves every body in place
        return result

    async def changes_since(self, folder: FolderRef, modseq: int) -> Changes:
        """One read transaction: the folder row (the usual answer after a command: nothing newer), else the
        messages and tombstones above ``modseq``, which also bring the shared index up when it was there."""
        def work(connection: Connection) -> tuple[_FolderCore, int, Sequence[Row], Sequence[int], _IndexRead | None]:
            row = self._folder_core(connection, folder)
            if row.highestmodseq <= modseq:
                return row, row.highestmodseq, (), (), None
            updated, expunged = _changed_since(connection, row.id, modseq)
            # PostgreSQL's READ COMMITTED: the rows (a later snapshot) may be newer than the folder row read. Every
            # change up to the highest MODSEQ among them was committed before they were read (a folder's MODSEQs
            # are taken under its row's lock, so they commit in order): that is the MODSEQ this answer holds. Not
            # the folder's MODSEQ read again after them: a change committed in between would be below it, unseen.
            highest = max(row.highestmodseq, max((changed[1] for changed in updated), default=0))
            return row, highest, updated, expunged, self._index_read(connection, row, load=False,
                                                                     known=(modseq, updated, expunged))

        epochs = self._epochs(folder.mailbox_id)
        row, highest, updated, expunged, read = await self._run(work)
        if read is not None:
            self._install(row, read)
        self._looked(folder, row, epochs)
        index = self.indexes.peek(row.id, row.uidvalidity)
        return Changes(highest, tuple(FlagUpdate(uid, flagcodec.decode(bits, keywords), message_modseq)
                                      for uid, message_modseq, bits, keywords in updated), tuple(expunged),
                       uids=index.uids if index is not None and index.modseq == highest else None)

    def _current_index(self, folder: FolderRef) -> FolderIndex | None:
        """The folder's index when it holds every change this process's hub accounts for (see ``changes_known``)."""
        # SQLite only, where a read transaction is one snapshot. A folder's MODSEQs commit in order on both (taken
        # under its row's lock), but PostgreSQL's READ COMMITTED gives each statement its own snapshot: an index
        # read there may hold changes newer than the MODSEQ it is filed under, and its log then files a tombstone
        # read ahead under that older MODSEQ (``FolderIndex._log``), so ``changes_after`` would miss the expunge.
        if not self.hub.sees_every_change or not self.database.is_sqlite:
            return None
        index = self._known_index(folder)
        if (index is None or index.verified != self._epochs(folder.mailbox_id)
                or index.modseq < self._published.get((folder.mailbox_id, names.normalise(folder.name)), 0)):
            return None
        return index

    def flags_known(self, folder: FolderRef, uids: UidSet, *, changed_since: int | None = None) -> FlagListing | None:
        index = self._current_index(folder)
        return None if index is None else index.listing(uids, changed_since)

    def changes_known(self, folder: FolderRef, modseq: int) -> Changes | None:
        """From the folder's shared index alone, when it holds every change: verified by a look at the folder row
        (``_looked``) with no event since that names no MODSEQ, and at or above every MODSEQ published for the
        folder since (this process's writers apply their own change there first, ``_committed``); and when its
        log of changed UIDs reaches back to ``modseq``. A commit not published yet is a command still running:
        answering without it is answering just before it."""
        index = self._current_index(folder)
        if index is None or modseq > index.modseq:
            return None
        found = index.changes_after(modseq)
        if found is None:
            return None
        updated, expunged = found
        return Changes(index.modseq, tuple(FlagUpdate(uid, flags, message_modseq)
                                           for uid, message_modseq, flags in updated),
                       tuple(expunged), uids=index.uids)

    async def search(self, folder: FolderRef, key: SearchKey, *,
                     recent_uids: frozenset[int] = frozenset()) -> list[int]:
        row = await self._run(lambda connection: self._folder_core(connection, folder))
        owner = mailbox_owner(folder.mailbox_id)
        return await search_folder(
            self._run, row.id, folder.mailbox_id, owner, key, recent_uids,
            fields=self.headers.fields if self.headers is not None else None, index=self.index,
            read_headers=lambda m: self._read_head(owner, m),
            scan_body=lambda m, text, headers: self._body_contains(owner, m, text, headers))

    async def _read_head(self, owner: str, message: SearchRow) -> bytes:
        return await self.blobs.read(owner, message.blob_id, 0, MAX_HEADER_BYTES)

    async def _body_contains(self, owner: str, message: SearchRow, needle: str, include_headers: bool) -> bool:
        """Scan a body chunk by chunk (bounded memory), keeping an overlap for matches across chunks."""
        wanted = needle.casefold()
        reader = await self.blobs.open(owner, message.blob_id)
        try:
            start = 0 if include_headers else len(header_section(await asyncio.to_thread(reader.read, 0, MAX_HEADER_BYTES)))
            body = _BlobBody(reader)
            tail = ""
            async for chunk in body.chunks(start):
                text = tail + chunk.decode("utf-8", errors="replace").casefold()
                if wanted in text:
                    return True
                tail = text[-len(wanted):] if wanted else ""
            return wanted == ""
        finally:
            reader.close()

    async def quota(self, mailbox_id: int) -> QuotaUsage:
        async with self.database.session() as session:
            used, count, limit = await self._usage(session, mailbox_id)
        kib = -(-used // 1024)  # RFC 9208 5.1: STORAGE in units of 1024 octets, rounded up
        return QuotaUsage(kib, limit // 1024 if limit else None, count, None)


def _changed_since(connection: Connection, folder_id: int, since: int) -> tuple[Sequence[Row], list[int]]:
    """The messages whose MODSEQ is above ``since`` (index rows) and the UIDs expunged above it."""
    params = {"folder_id": folder_id, "since": since}
    changed = cast(Sequence[Row], _CHANGED_INDEX_ROWS.run(connection, params).fetchall())
    return changed, [uid for uid, in _EXPUNGED_SINCE.run(connection, params).fetchall()]


def _folder_found(connection: Connection, query: Prepared, ref: FolderRef, *, uidvalidity_at: int) -> Any:
    """The folder row ``query`` selects for ``ref`` (its uidvalidity column, at ``uidvalidity_at``, checked
    against the ref's)."""
    found = query.run(connection, {"folder_mailbox": ref.mailbox_id, "folder_name": names.normalise(ref.name)}).fetchone()
    if found is None:
        raise FolderNotFound(f"no folder {ref.name!r}")
    if ref.uidvalidity is not None and found[uidvalidity_at] != ref.uidvalidity:
        raise UidValidityChanged(f"folder {ref.name!r} was re-created")
    return found

"""SEARCH (RFC 3501 6.4.4): compile keys to SQL where the columns answer, scan bodies otherwise.

``to_sql`` returns None for a key that needs the body or an uncached header.
The store then narrows candidates with the SQL-able conjuncts and evaluates the
whole key in Python, opening a body only when a key needs it.

When the cached header columns are sealed at rest, SQL cannot read them: the keyed
blind index (``blind_index.py``) narrows each header key on them to the messages
holding every trigram of its string (plus the messages not indexed yet), and the
evaluator unseals a column only for a row the index could not rule out. The index
only ever rules rows out; the answer is always the exact substring check.
"""

from __future__ import annotations

import collections
import datetime as dt
import email.parser
import email.policy
import functools
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, cast

from sqlalchemy import ColumnElement, Table, and_, bindparam, false, func, not_, or_, select, true
from sqlalchemy.engine import Connection

from gateway.mailstore import flags as flagcodec
from gateway.mailstore.blind_index import (
    BlindIndex,
    IndexKey,
    MailboxPostings,
    candidates,
    chunked,
    indexed_counts,
    unindexed_in,
    wanted_tokens,
)
from gateway.mailstore.headers import (
    ADDRESS_HEADERS, address_search_text, decode_text, field_texts, header_section,
)
from gateway.mailstore.interface import (
    All,
    AnyOf,
    BodyContains,
    DateBefore,
    DateField,
    DateOn,
    DateSince,
    HasFlag,
    Header,
    Larger,
    ModSeqAtLeast,
    Not,
    Recent,
    SearchKey,
    Smaller,
    UidIn,
    UidSet,
)
from gateway.mailstore.tables import Message
from gateway.security.at_rest import FieldSealer

CACHED_HEADERS = {"from": "from_addr", "to": "to_addr", "cc": "cc_addr", "subject": "subject",
                  "message-id": "message_id"}
MAX_SQL_RANGES = 50  # SQLite limits expression depth; beyond this, filter UIDs in Python
MAX_IDS_PER_QUERY = 5000  # candidate ids bound per statement (SQLite's and drivers' parameter limits)


class SearchRow(Protocol):
    """The columns SEARCH reads of one message (a result row: no ORM entity), header columns as stored."""

    @property
    def id(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def modseq(self) -> int: ...
    @property
    def system_flags(self) -> int: ...
    @property
    def keywords(self) -> str: ...
    @property
    def internaldate(self) -> dt.datetime: ...
    @property
    def sent_date(self) -> dt.datetime | None: ...
    @property
    def size(self) -> int: ...
    @property
    def blob_id(self) -> str: ...


HeaderReader = Callable[[SearchRow], Awaitable[bytes]]
ChunkScanner = Callable[[SearchRow, str, bool], Awaitable[bool]]
ColumnReader = Callable[[SearchRow, str], Awaitable[str | None]]
RuledOut = Callable[[SearchRow, str, str], bool]
ReadTransaction = Callable[[Callable[[Connection], Any]], Awaitable[Any]]


async def _as_stored(row: SearchRow, column: str) -> str | None:
    value: str | None = getattr(row, column)
    return value


def _never(row: SearchRow, column: str, value: str) -> bool:
    return False


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_pattern(value: str) -> str:
    return f"%{_escape_like(value)}%"


def uid_clause(uids: UidSet) -> ColumnElement[bool]:
    if not uids.ranges:
        return false()
    if len(uids.ranges) > MAX_SQL_RANGES:
        low = min(first for first, _ in uids.ranges)
        high = max(last for _, last in uids.ranges)
        return Message.uid.between(low, high)  # the caller filters the exact set
    return or_(*(Message.uid == low if low == high else Message.uid.between(low, high) for low, high in uids.ranges))


def _day_start(day: dt.date) -> dt.datetime:
    # RFC 3501 6.4.4: date keys disregard time and timezone.  Internal dates are compared as UTC days; the
    # sent date is stored as the Date field's own wall clock (headers._sent_date), so its day is the header's.
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)


def _date_column(field: DateField) -> ColumnElement[dt.datetime]:
    return Message.internaldate if field is DateField.INTERNAL else Message.sent_date  # type: ignore[return-value]


def _flag_clause(flag: str) -> ColumnElement[bool]:
    stored = flagcodec.canonical(flag)
    if stored is None:
        return false()
    bit = flagcodec.SYSTEM_BITS.get(stored)
    if bit is not None:
        return Message.system_flags.op("&")(bit) != 0
    return Message.keywords.like(f"% {_escape_like(stored)} %", escape="\\")


def to_sql(key: SearchKey, recent_uids: frozenset[int], *, header_columns: bool = True) -> ColumnElement[bool] | None:
    """The SQL condition for ``key``, or None if some part of it needs the message body (or, with
    ``header_columns`` false, a cached header column: they are sealed at rest and only Python can read them)."""
    match key:
        case All(keys):
            parts = [to_sql(part, recent_uids, header_columns=header_columns) for part in keys]
            return None if any(part is None for part in parts) else and_(true(), *parts)  # type: ignore[arg-type]
        case AnyOf(keys):
            parts = [to_sql(part, recent_uids, header_columns=header_columns) for part in keys]
            return None if any(part is None for part in parts) else or_(false(), *parts)  # type: ignore[arg-type]
        case Not(inner):
            compiled = to_sql(inner, recent_uids, header_columns=header_columns)
            # SQL's NOT of an unknown (a NULL column: no Cc, no Date) is unknown, which filters the row out;
            # RFC 3501 6.4.4 NOT wants it: a message that does not match the key matches its negation.
            return None if compiled is None else not_(func.coalesce(compiled, false()))
        case HasFlag(flag):
            return _flag_clause(flag)
        case Recent():
            return Message.uid.in_(sorted(recent_uids)) if recent_uids else false()
        case UidIn(uids):
            return uid_clause(uids) if len(uids.ranges) <= MAX_SQL_RANGES else None
        case DateBefore(field, day):
            return _date_column(field) < _day_start(day)
        case DateOn(field, day):
            column = _date_column(field)
            return and_(column >= _day_start(day), column < _day_start(day + dt.timedelta(days=1)))
        case DateSince(field, day):
            return _date_column(field) >= _day_start(day)
        case Larger(size):
            return Message.size > size
        case Smaller(size):
            return Message.size < size
        case ModSeqAtLeast(modseq):
            return Message.modseq >= modseq
        case Header(name, value) if header_columns and name.lower() in CACHED_HEADERS and value.isascii():
            # Non-ASCII needles go to the evaluator: SQL ILIKE folds ASCII case only (SQLite), Python folds
            # Unicode case, and the sealed store (Python only) must answer as the clear one does.
            cached: ColumnElement[str] = getattr(Message, CACHED_HEADERS[name.lower()])
            # RFC 3501 6.4.4 HEADER: an empty string matches every message that has the field.
            return cached.is_not(None) if value == "" else cached.ilike(_like_pattern(value), escape="\\")
        case Header() | BodyContains():
            return None
    raise TypeError(f"unknown search key {key!r}")


def prefilter(key: SearchKey, recent_uids: frozenset[int], *, header_columns: bool = True) -> ColumnElement[bool]:
    """A SQL condition every match satisfies: the SQL-able conjuncts of a top-level All."""
    if isinstance(key, All):
        compiled = [to_sql(part, recent_uids, header_columns=header_columns) for part in key.keys]
        return and_(true(), *(part for part in compiled if part is not None))
    return to_sql(key, recent_uids, header_columns=header_columns) or true()


def _contains(haystack: str | None, needle: str) -> bool:
    return haystack is not None and needle.casefold() in haystack.casefold()


def _on_day(value: dt.datetime | None, day: dt.date, compare: Callable[[dt.date, dt.date], bool]) -> bool:
    return value is not None and compare(value.astimezone(dt.timezone.utc).date(), day)


class Evaluator:
    """Evaluates any key against one message row, reading the body only when asked.

    ``ruled_out(row, column, value)`` says the blind index proved that the cached ``column`` of ``row``
    does not contain ``value``; ``read_column`` gives a cached column in clear (unsealing it)."""

    def __init__(self, recent_uids: frozenset[int], read_headers: HeaderReader, scan_body: ChunkScanner, *,
                 read_column: ColumnReader = _as_stored, ruled_out: RuledOut = _never) -> None:
        self.recent_uids = recent_uids
        self._read_headers = read_headers
        self._scan_body = scan_body
        self._read_column = read_column
        self._ruled_out = ruled_out

    async def matches(self, key: SearchKey, row: SearchRow) -> bool:
        match key:
            case All(keys):
                for part in keys:
                    if not await self.matches(part, row):
                        return False
                return True
            case AnyOf(keys):
                for part in keys:
                    if await self.matches(part, row):
                        return True
                return False
            case Not(inner):
                return not await self.matches(inner, row)
            case Header(name, value):
                return await self._header_matches(row, name, value)
            case BodyContains(value, include_headers):
                return await self._scan_body(row, value, include_headers)
        return self._metadata_matches(key, row)

    def _metadata_matches(self, key: SearchKey, row: SearchRow) -> bool:
        def date_of(field: DateField) -> dt.datetime | None:  # only the columns the key needs were loaded
            return row.internaldate if field is DateField.INTERNAL else row.sent_date

        match key:
            case HasFlag(flag):
                stored = flagcodec.canonical(flag)
                return stored is not None and stored in flagcodec.decode(row.system_flags, row.keywords)
            case Recent():
                return row.uid in self.recent_uids
            case UidIn(uids):
                return row.uid in uids
            case DateBefore(field, day):
                return _on_day(date_of(field), day, lambda a, b: a < b)
            case DateOn(field, day):
                return _on_day(date_of(field), day, lambda a, b: a == b)
            case DateSince(field, day):
                return _on_day(date_of(field), day, lambda a, b: a >= b)
            case Larger(size):
                return row.size > size
            case Smaller(size):
                return row.size < size
            case ModSeqAtLeast(modseq):
                return row.modseq >= modseq
        raise TypeError(f"unknown search key {key!r}")

    async def _header_matches(self, row: SearchRow, name: str, value: str) -> bool:
        cached = CACHED_HEADERS.get(name.lower())
        if cached is not None:
            if self._ruled_out(row, cached, value):
                return False
            field = await self._read_column(row, cached)
            return field is not None if value == "" else _contains(field, value)
        raw = await self._read_headers(row)
        section = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header_section(raw))
        searchable = address_search_text if name.lower() in ADDRESS_HEADERS else decode_text
        values = [searchable(text) for text in field_texts(section, name)]
        return bool(values) if value == "" else any(_contains(item, value) for item in values)



def cached_columns(key: SearchKey) -> set[str]:
    """The cached header columns a SEARCH key compares (the evaluator reads no other sealed column)."""
    match key:
        case All(keys) | AnyOf(keys):
            return set().union(*(cached_columns(part) for part in keys))
        case Not(inner):
            return cached_columns(inner)
        case Header(name, _):
            column = CACHED_HEADERS.get(name.lower())
            return {column} if column else set()
    return set()


def _row_columns(key: SearchKey) -> set[str]:
    """The columns the evaluator reads for ``key`` (each converted per row: a date column costs)."""
    match key:
        case All(keys) | AnyOf(keys):
            return set().union(*(_row_columns(part) for part in keys))
        case Not(inner):
            return _row_columns(inner)
        case Header(name, _) if name.lower() in CACHED_HEADERS:
            return {CACHED_HEADERS[name.lower()]}
        case Header() | BodyContains():
            return {"blob_id"}
        case HasFlag():
            return {"system_flags", "keywords"}
        case DateBefore(field, _) | DateOn(field, _) | DateSince(field, _):
            return {"internaldate" if field is DateField.INTERNAL else "sent_date"}
        case Larger() | Smaller():
            return {"size"}
        case ModSeqAtLeast():
            return {"modseq"}
    return set()


def _cached_leaves(key: SearchKey) -> set[tuple[str, str]]:
    """(column, string) of every header key on a cached column."""
    match key:
        case All(keys) | AnyOf(keys):
            return set().union(*(_cached_leaves(part) for part in keys))
        case Not(inner):
            return _cached_leaves(inner)
        case Header(name, value) if name.lower() in CACHED_HEADERS:
            return {(CACHED_HEADERS[name.lower()], value)}
    return set()


class IndexNarrowing:
    """What the blind index says about one SEARCH in one folder: per header key, the ids that may match."""

    def __init__(self, possible: dict[tuple[str, str], frozenset[int]], not_indexed: frozenset[int]) -> None:
        self.possible = possible          # (column, string) -> indexed ids holding every token; absent: no narrowing
        self.not_indexed = not_indexed    # the folder's messages without index rows: never ruled out

    @classmethod
    def read(cls, connection: Connection, index_key: IndexKey, mailbox_id: int, folder_id: int,
             key: SearchKey) -> IndexNarrowing:
        """In the SEARCH's read transaction: the posting lists of every token the key's header strings need
        and the mailbox's unposted messages, read once for all of them."""
        leaves = _cached_leaves(key)
        possible: dict[tuple[str, str], frozenset[int]] = {}
        if not leaves:
            return cls(possible, frozenset())
        counts = indexed_counts(connection, mailbox_id)
        postings = MailboxPostings.read(connection, mailbox_id, wanted_tokens(index_key, leaves), counts[0])
        for column, value in sorted(leaves):
            found = candidates(index_key, postings, column, value)
            if found is not None:
                possible[(column, value)] = found
        not_indexed = unindexed_in(connection, folder_id, counts) if possible else frozenset()
        return cls(possible, not_indexed)

    def ruled_out(self, row: SearchRow, column: str, value: str) -> bool:
        ids = self.possible.get((column, value))
        return ids is not None and row.id not in ids and row.id not in self.not_indexed

    def bound(self, key: SearchKey) -> frozenset[int] | None:
        """A superset of the ids matching ``key`` (None: no bound known): the rows worth loading."""
        match key:
            case All(keys):
                bounds = [found for part in keys if (found := self.bound(part)) is not None]
                return frozenset.intersection(*bounds) if bounds else None
            case AnyOf(keys):
                parts = [self.bound(part) for part in keys]
                if not parts or any(part is None for part in parts):
                    return None
                return frozenset().union(*parts)  # type: ignore[arg-type]
            case Header(name, value) if (CACHED_HEADERS.get(name.lower()), value) in self.possible:
                return self.possible[(CACHED_HEADERS[name.lower()], value)] | self.not_indexed
        return None


@functools.cache
def _row_type(names: tuple[str, ...]) -> Any:
    """A named tuple of these columns: SQLAlchemy's Row resolved ``row.id`` by name at about 10 µs a row the
    first time a statement ran in the process (112 ms over 10,000 candidates), a named tuple's field is an index."""
    return collections.namedtuple("SearchRow", names)   # the names are only known at run time


def load_rows(connection: Connection, folder_id: int, key: SearchKey, recent_uids: frozenset[int], *,
              header_columns: bool, bound: frozenset[int] | None) -> list[SearchRow]:
    """The folder's rows the SQL prefilter keeps (and, with a bound, only those ids), in UID order."""
    names = ["id", "uid", "folder_id", *sorted(_row_columns(key))]
    query = select(*(getattr(Message, name) for name in names)).where(
        prefilter(key, recent_uids, header_columns=header_columns))
    rows: list[Any] = []  # attribute access by column name, as SearchRow describes
    as_row = _row_type(tuple(names))._make
    driver = _sqlite_driver(connection)
    if bound is not None and driver is not None and _cached_headers_only(key):
        return _rows_by_id(driver, folder_id, tuple(names), bound, as_row)
    if bound is None:
        rows.extend(map(as_row, connection.execute(query.where(Message.folder_id == folder_id)).all()))
    else:
        # The ids by their primary key, one expanding parameter (compiled once, not thousands of literals).
        # The folder is checked here, not in SQL: with it, SQLite walks the folder's index over every row of
        # the folder (100,000 rows for 10,000 ids). The bound holds ids of all the owner's folders: those of
        # other folders are read and dropped (a lookup by primary key each).
        query = query.where(Message.id.in_(bindparam("ids", expanding=True)))
        for ids in chunked(sorted(bound), MAX_IDS_PER_QUERY):
            rows.extend(row for row in map(as_row, connection.execute(query, {"ids": list(ids)}).all())
                        if row.folder_id == folder_id)
    rows.sort(key=lambda row: row.uid)
    return rows


ID_BUCKETS = (16, 256, 1024, MAX_IDS_PER_QUERY)  # placeholders per statement: a few statements, each compiled once


def _sqlite_driver(connection: Connection) -> sqlite3.Connection | None:
    driver = connection.connection.driver_connection if connection.dialect.name == "sqlite" else None
    return driver if isinstance(driver, sqlite3.Connection) else None   # not aiosqlite's (async engine)


def _cached_headers_only(key: SearchKey) -> bool:
    """Every leaf of ``key`` compares a cached (sealed) header column: no SQL condition, plain columns."""
    match key:
        case All(keys) | AnyOf(keys):
            return all(_cached_headers_only(part) for part in keys)
        case Not(inner):
            return _cached_headers_only(inner)
        case Header(name, _):
            return name.lower() in CACHED_HEADERS
    return False


@functools.cache
def _by_id_sql(names: tuple[str, ...], count: int) -> str:
    """The SELECT of these columns of ``count`` messages by primary key (one placeholder each)."""
    table = cast(Table, Message.__table__)
    columns = ", ".join(table.c[name].name for name in names)
    return f"SELECT {columns} FROM {table.name} WHERE {table.c.id.name} IN ({', '.join('?' * count)})"


def _rows_by_id(driver: sqlite3.Connection, folder_id: int, names: tuple[str, ...], bound: frozenset[int],
                as_row: Callable[[Any], Any]) -> list[SearchRow]:
    """``load_rows`` for a key on cached header columns alone (SEARCH SUBJECT x) on SQLite: the bound's rows
    on the driver, without SQLAlchemy's rendering of thousands of parameters and its row objects (a third
    of the time of 10,000 rows). The columns are integers and text, which need no conversion. Each chunk is
    padded to one of ``ID_BUCKETS`` with its last id (IN ignores the repeats)."""
    folder_at = names.index("folder_id")
    rows: list[Any] = []
    for ids in chunked(sorted(bound), MAX_IDS_PER_QUERY):
        size = next(bucket for bucket in ID_BUCKETS if bucket >= len(ids))
        padded = [*ids, *([ids[-1]] * (size - len(ids)))]
        cursor = driver.execute(_by_id_sql(names, size), padded)
        rows.extend(as_row(row) for row in cursor.fetchall() if row[folder_at] == folder_id)
        cursor.close()
    rows.sort(key=lambda row: row.uid)
    return rows


async def _open_candidates(fields: FieldSealer, owner: str, key: SearchKey, rows: Sequence[SearchRow],
                           narrowing: IndexNarrowing) -> dict[tuple[int, str], str | None]:
    """The sealed columns the evaluator will compare, opened ahead in one loop per column (not one awaited
    decryption per row): for each cached column, the rows the blind index leaves possible for one of the
    key's strings on it. The evaluator still decides; what it reads beyond these it opens itself."""
    opened: dict[tuple[int, str], str | None] = {}
    strings: dict[str, list[str]] = {}
    for column, value in _cached_leaves(key):
        strings.setdefault(column, []).append(value)
    for column, values in sorted(strings.items()):
        wanted = [row for row in rows if not all(narrowing.ruled_out(row, column, value) for value in values)]
        clear = await fields.open_many(owner, column, [getattr(row, column) for row in wanted])
        opened.update(((row.id, column), value) for row, value in zip(wanted, clear, strict=True))
    return opened


async def search_folder(run: ReadTransaction, folder_id: int, mailbox_id: int, owner: str,
                        key: SearchKey, recent_uids: frozenset[int], *, fields: FieldSealer | None,
                        index: BlindIndex | None, read_headers: HeaderReader, scan_body: ChunkScanner) -> list[int]:
    """SEARCH in one folder: SQL where the columns answer; else the blind index narrows, SQL prefilters,
    and the evaluator checks each remaining row exactly, unsealing only the columns it must. ``run``: one
    read transaction in one hop to the database (``SqlMailStore._run``)."""
    header_columns = fields is None                 # sealed columns cannot answer a SQL LIKE
    compiled = to_sql(key, recent_uids, header_columns=header_columns)
    if compiled is not None:
        query = select(Message.uid).where(Message.folder_id == folder_id, compiled).order_by(Message.uid)
        uids: list[int] = await run(lambda connection: list(connection.execute(query).scalars()))
        return uids
    index_key = await index.key_for(mailbox_id) if index is not None and fields is not None else None

    def read(connection: Connection) -> tuple[IndexNarrowing, list[SearchRow]]:
        # One transaction: the index and the rows it bounds are of the same snapshot (SQLite).
        narrowing = (IndexNarrowing.read(connection, index_key, mailbox_id, folder_id, key)
                     if index_key is not None else IndexNarrowing({}, frozenset()))
        return narrowing, load_rows(connection, folder_id, key, recent_uids, header_columns=header_columns,
                                    bound=narrowing.bound(key))

    narrowing, rows = await run(read)
    opened = await _open_candidates(fields, owner, key, rows, narrowing) if fields is not None else {}
    if fields is not None and isinstance(key, Header) and key.name.lower() in CACHED_HEADERS:
        # One string on one cached column (SEARCH SUBJECT x): every row the index left possible is open, the
        # others are ruled out; the evaluator's answer without a coroutine per row.
        column, value = CACHED_HEADERS[key.name.lower()], key.value
        found = ((row.uid, opened[(row.id, column)]) for row in rows if (row.id, column) in opened)
        if value == "":
            return [uid for uid, field in found if field is not None]
        needle = value.casefold()
        return [uid for uid, field in found if field is not None and needle in field.casefold()]

    async def read_column(row: SearchRow, column: str) -> str | None:
        value: str | None = getattr(row, column)
        if fields is None:
            return value
        if (row.id, column) not in opened:  # unsealed once per row and column, only when the index cannot decide
            opened[(row.id, column)] = await fields.open(owner, column, value)
        return opened[(row.id, column)]

    evaluator = Evaluator(recent_uids, read_headers, scan_body, read_column=read_column,
                          ruled_out=narrowing.ruled_out)
    return [row.uid for row in rows if await evaluator.matches(key, row)]


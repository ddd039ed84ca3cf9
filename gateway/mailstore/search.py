"""SEARCH (RFC 3501 6.4.4): compile keys to SQL where the columns answer, scan bodies otherwise.

``to_sql`` returns None for a key that needs the body or an uncached header.
The store then narrows candidates with the SQL-able conjuncts and evaluates the
whole key in Python, opening a body only when a key needs it.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import email.policy
from collections.abc import Awaitable, Callable

from sqlalchemy import ColumnElement, and_, false, func, not_, or_, true

from gateway.mailstore import flags as flagcodec
from gateway.mailstore.headers import ADDRESS_HEADERS, address_search_text, decode_text, header_section
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

CACHED_HEADERS = {"from": "from_addr", "to": "to_addr", "cc": "cc_addr", "subject": "subject",
                  "message-id": "message_id"}
MAX_SQL_RANGES = 50  # SQLite limits expression depth; beyond this, filter UIDs in Python

HeaderReader = Callable[[Message], Awaitable[bytes]]
ChunkScanner = Callable[[Message, str, bool], Awaitable[bool]]


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
    """Evaluates any key against one message row, reading the body only when asked."""

    def __init__(self, recent_uids: frozenset[int], read_headers: HeaderReader, scan_body: ChunkScanner) -> None:
        self.recent_uids = recent_uids
        self._read_headers = read_headers
        self._scan_body = scan_body

    async def matches(self, key: SearchKey, row: Message) -> bool:
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

    def _metadata_matches(self, key: SearchKey, row: Message) -> bool:
        date_of = {DateField.INTERNAL: row.internaldate, DateField.SENT: row.sent_date}
        match key:
            case HasFlag(flag):
                stored = flagcodec.canonical(flag)
                return stored is not None and stored in flagcodec.decode(row.system_flags, row.keywords)
            case Recent():
                return row.uid in self.recent_uids
            case UidIn(uids):
                return row.uid in uids
            case DateBefore(field, day):
                return _on_day(date_of[field], day, lambda a, b: a < b)
            case DateOn(field, day):
                return _on_day(date_of[field], day, lambda a, b: a == b)
            case DateSince(field, day):
                return _on_day(date_of[field], day, lambda a, b: a >= b)
            case Larger(size):
                return row.size > size
            case Smaller(size):
                return row.size < size
            case ModSeqAtLeast(modseq):
                return row.modseq >= modseq
        raise TypeError(f"unknown search key {key!r}")

    async def _header_matches(self, row: Message, name: str, value: str) -> bool:
        cached = CACHED_HEADERS.get(name.lower())
        if cached is not None:
            field = getattr(row, cached)
            return field is not None if value == "" else _contains(field, value)
        raw = await self._read_headers(row)
        section = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header_section(raw))
        searchable = address_search_text if name.lower() in ADDRESS_HEADERS else decode_text
        values = [searchable(str(item)) for item in section.get_all(name, [])]
        return bool(values) if value == "" else any(_contains(item, value) for item in values)


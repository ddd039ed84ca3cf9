"""SQL Core statements of the hot paths, run straight on SQLite's driver.

A ``Prepared`` wraps one Core statement (the one source of its SQL, for both databases). Inside
``Database.run_in_transaction`` on a SQLite file, ``run`` executes it on the pysqlite connection itself:
compiled once per set of parameter names, its parameters a tuple built with the columns' own bind
processors and Python-side defaults. That skips what SQLAlchemy does per execution (cache key, compiled
cache lookup, execution context, parameter dictionaries, result wrapping): about 200 µs a statement on the
benchmark machine against 10-20 for the driver, and a delivery runs ten. Elsewhere (PostgreSQL,
in-memory SQLite through the async engine) ``run`` is ``Connection.execute``.

What ``run`` returns is every row, read at once (``fetchone``, ``fetchall``, ``rowcount``): column values as
the driver returns them, plain integers and strings (ids, counters); ``rows`` converts each selected column
with its type's result processor as Core does (timestamps back as aware datetimes). Driver errors are raised as SQLAlchemy's own
(``IntegrityError``, ``OperationalError``...), as ``Connection.execute`` raises them.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import LargeBinary
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement

from gateway.storage.models import UTCDateTime


class Rows(Protocol):
    """What a statement's execution offers (a DBAPI cursor, or SQLAlchemy's ``CursorResult``)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Sequence[Any]: ...


class _Fetched:
    """A statement's rows, all read, and its row count."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> Sequence[Any]:
        rows, self._rows = self._rows, []
        return rows


@dataclass(frozen=True)
class _Plan:
    sql: str
    names: tuple[str, ...]                        # the positional parameters, in order
    fixed: dict[str, Any]                         # values compiled into the statement (literals)
    defaults: dict[str, Callable[[], Any]]        # Python-side column defaults the caller did not give
    processors: dict[str, Callable[[Any], Any]]   # the columns' bind processors (timestamps...)
    results: tuple[Callable[[Any], Any] | None, ...] = ()   # the selected columns' result processors

    blobs: frozenset[str] = frozenset()          # binary columns: octets go to the driver as they are

    def __post_init__(self) -> None:
        # The positions whose value a bind processor converts, found once (a delivery's statements build
        # about 40 parameters); octets of a binary column skip its processor: SQLite's driver takes bytes
        # as a BLOB, what the processor's ``sqlite3.Binary`` (a memoryview) hands it.
        converted = tuple((index, self.processors[name], bytes if name in self.blobs else None)
                          for index, name in enumerate(self.names) if name in self.processors)
        object.__setattr__(self, "_converted", converted)

    def _missing(self, name: str) -> Any:
        default = self.defaults.get(name)
        return default() if default is not None else self.fixed[name]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        out = [values[name] if name in values else self._missing(name) for name in self.names]
        converted: tuple[tuple[int, Callable[[Any], Any], type | None], ...] = self._converted  # type: ignore[attr-defined]
        for index, processor, as_is in converted:
            value = out[index]
            if as_is is None or type(value) is not as_is:
                out[index] = processor(value)
        return tuple(out)


class Prepared:
    """One Core statement, executed on SQLite's driver directly (see the module docstring)."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def run(self, connection: Connection, values: Mapping[str, Any]) -> Rows:
        raw = _sqlite_driver(connection)
        if raw is None:
            return connection.execute(self.statement, dict(values))
        plan = self._plan(connection.dialect, values)
        parameters = plan.parameters(values)
        try:
            cursor = raw.execute(plan.sql, parameters)
            # Every row fetched now: a statement left stepping (RETURNING, a SELECT) would make the
            # transaction's COMMIT fail ("SQL statements in progress").
            fetched = _Fetched(cursor.fetchall(), cursor.rowcount)
            cursor.close()
            return fetched
        except sqlite3.Error as exc:
            raise _wrapped(plan.sql, parameters, exc) from exc

    def rows(self, connection: Connection, values: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """A SELECT's rows as tuples, each value converted as Core converts it (its column type's result
        processor: timestamps back as datetimes), which ``run`` does not do."""
        raw = _sqlite_driver(connection)
        if raw is None:
            return [tuple(row) for row in connection.execute(self.statement, dict(values))]
        plan = self._plan(connection.dialect, values)
        rows = self.run(connection, values).fetchall()
        if not any(plan.results):
            return [tuple(row) for row in rows]
        return [tuple(value if convert is None else convert(value) for convert, value in zip(plan.results, row))
                for row in rows]

    def run_many(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """One executemany per set of parameter names (one for rows that all name the same columns)."""
        raw = _sqlite_driver(connection)
        by_names: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in rows:
            by_names.setdefault(tuple(sorted(row)), []).append(row)
        for alike in by_names.values():
            if raw is None:                   # Core's executemany takes the first row's names for all
                connection.execute(self.statement, [dict(row) for row in alike])
                continue
            plan = self._plan(connection.dialect, alike[0])
            parameters = [plan.parameters(row) for row in alike]
            try:
                raw.executemany(plan.sql, parameters)
            except sqlite3.Error as exc:
                raise _wrapped(plan.sql, parameters, exc) from exc

    def run_many_rows(self, connection: Connection, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> None:
        """``run_many`` for many narrow rows given as tuples in ``columns``' order: on SQLite, when the columns
        need no conversion and no default, the tuples go to the driver's executemany as they are (no
        dictionary, no parameter tuple built per row: the blind index writes about 140 rows a message)."""
        raw = _sqlite_driver(connection)
        if raw is not None:
            plan = self._plan(connection.dialect, dict.fromkeys(columns))
            if not plan.defaults and not plan.processors and sorted(plan.names) == sorted(columns):
                order = [columns.index(name) for name in plan.names]
                parameters = rows if order == list(range(len(columns))) else [
                    tuple(row[position] for position in order) for row in rows]
                try:
                    raw.executemany(plan.sql, parameters)
                except sqlite3.Error as exc:
                    raise _wrapped(plan.sql, parameters, exc) from exc
                return
        self.run_many(connection, [dict(zip(columns, row, strict=True)) for row in rows])

    def _plan(self, dialect: Dialect, values: Mapping[str, Any]) -> _Plan:
        keys = tuple(sorted(values))
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plans[keys] = _compile(self.statement, dialect, keys)
        return plan


def _sqlite_driver(connection: Connection) -> sqlite3.Connection | None:
    if connection.dialect.name != "sqlite":
        return None
    driver = connection.connection.driver_connection
    return driver if isinstance(driver, sqlite3.Connection) else None   # not aiosqlite's (async engine)


def _compile(statement: Executable, dialect: Dialect, keys: tuple[str, ...]) -> _Plan:
    assert isinstance(statement, ClauseElement)
    compiled: Any = statement.compile(dialect=dialect, column_keys=list(keys))
    if compiled.positiontup is None or "POSTCOMPILE" in compiled.string:
        raise TypeError("Prepared needs a positional paramstyle (SQLite's qmark) and no expanding IN")
    defaults: dict[str, Callable[[], Any]] = {}
    for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
        default = column.default if column in compiled.insert_prefetch else column.onupdate
        if default is None or not (default.is_callable or default.is_scalar):
            raise TypeError(f"Prepared cannot evaluate the default of {column}")
        defaults[column.key] = _default_of(default.arg, default.is_callable)
    processors = {name: processor for name, processor in compiled._bind_processors.items()
                  if name in compiled.positiontup}
    if dialect.name == "sqlite":
        for name in processors:
            if name in compiled.binds and isinstance(compiled.binds[name].type, UTCDateTime):
                processors[name] = _sqlite_utc_datetime(processors[name])
    fixed = compiled.construct_params(_check=False)         # literals compiled in; None for the caller's
    results = tuple(entry[3].dialect_impl(dialect).result_processor(dialect, None) for entry in compiled._result_columns)
    blobs = frozenset(name for name in processors if dialect.name == "sqlite" and name in compiled.binds
                      and isinstance(compiled.binds[name].type, LargeBinary))
    return _Plan(compiled.string, tuple(compiled.positiontup), dict(fixed), defaults, processors, results, blobs)


_UTC = dt.timezone.utc
# Timestamps whose text ``_sqlite_utc_datetime`` must give exactly as SQLAlchemy does (checked when a plan is made).
_SAMPLE_TIMESTAMPS = (dt.datetime(2026, 12, 5, 6, 22, 0, 123456, tzinfo=_UTC), dt.datetime(2026, 1, 1, tzinfo=_UTC),
                      dt.datetime(999, 3, 4, 5, 6, 7, 8, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
                      dt.datetime(2026, 6, 30, 23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=2))))


def _sqlite_utc_datetime(core: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A ``UTCDateTime``'s bind processor on SQLite, the same text for less: Core's runs the type's
    ``process_bind_param`` (to UTC) and then SQLite's DATETIME, which formats ``%(year)04d-...%(microsecond)06d``
    from a dictionary of seven attributes (a few microseconds a timestamp; a delivery binds several). Here the
    UTC value's own ``isoformat(" ", "microseconds")``, which writes the same characters (the stored text, which
    SQLite compares and sorts as text, is unchanged). Anything but an aware datetime goes to Core's (None,
    errors). Core's is kept if the two disagree on a sample."""

    def process(value: Any) -> Any:
        if type(value) is dt.datetime and value.tzinfo is not None:
            return value.astimezone(_UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        return core(value)

    if any(process(sample) != core(sample) for sample in _SAMPLE_TIMESTAMPS):
        return core
    return process


def _default_of(arg: Any, is_callable: bool) -> Callable[[], Any]:
    """A column default as a function of nothing (SQLAlchemy wraps a callable default to take a context)."""
    if is_callable:
        return lambda: arg(None)
    return lambda: arg


def _wrapped(sql: str, parameters: Any, exc: sqlite3.Error) -> Exception:
    return DBAPIError.instance(sql, parameters, exc, sqlite3.Error)

"""``Prepared``: a Core statement run on SQLite's driver directly writes exactly what ``Connection.execute``
writes (bind processors, Python-side defaults), raises SQLAlchemy's errors, and falls back to
``Connection.execute`` on PostgreSQL. The same tests on both databases."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gateway.storage.db import Database
from gateway.storage.models import UTCDateTime
from gateway.storage.prepared import Prepared

pytestmark = pytest.mark.asyncio

_meta = MetaData()
ITEMS = Table("prepared_items", _meta,
              Column("id", Integer, primary_key=True),
              Column("name", String(20), nullable=False, unique=True),
              Column("state", String(10), nullable=False, default="new"),
              Column("seen_at", UTCDateTime(), nullable=True),
              Column("created_at", DateTime(timezone=True), nullable=False,
                     default=lambda: dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)))
PAIRS = Table("prepared_pairs", _meta, Column("left", Integer, primary_key=True, autoincrement=False),
              Column("right", BigInteger, primary_key=True, autoincrement=False))
INSERT = Prepared(insert(ITEMS).returning(ITEMS.c.id))
INSERT_PAIRS = Prepared(insert(PAIRS))
INSERT_MANY = Prepared(insert(ITEMS))
SEEN = Prepared(update(ITEMS).where(ITEMS.c.name == bindparam("who"), ITEMS.c.state != "gone")
                .values(seen_at=bindparam("when"), state="seen"))
WHEN = dt.datetime(2026, 12, 4, 17, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))


async def _create(database: Database) -> None:
    await database.run_in_transaction(lambda conn: _meta.create_all(conn), write=True)


def _rows(conn: Connection) -> list[tuple[object, ...]]:
    return [tuple(row) for row in conn.execute(select(ITEMS.c.name, ITEMS.c.state, ITEMS.c.seen_at,
                                                      ITEMS.c.created_at).order_by(ITEMS.c.name))]


async def test_rows_written_through_the_driver_read_back_as_core_wrote_them(database: Database) -> None:
    await _create(database)

    def write(conn: Connection) -> tuple[int, int]:
        first = INSERT.run(conn, {"name": "a", "seen_at": WHEN}).fetchone()[0]
        conn.execute(insert(ITEMS), {"name": "b", "seen_at": WHEN})            # the same row through Core
        INSERT_MANY.run_many(conn, [{"name": "c"}, {"name": "d", "state": "kept"}, {"name": "e"}])
        return first, SEEN.run(conn, {"who": "c", "when": WHEN}).rowcount

    first, seen = await database.run_in_transaction(write, write=True)
    assert first >= 1 and seen == 1
    rows = await database.run_in_transaction(_rows)
    by_name = {row[0]: row[1:] for row in rows}
    assert by_name["a"] == by_name["b"]                       # timestamp processor and defaults as Core's
    assert by_name["a"][1] == WHEN                            # stored in UTC, read back as the same instant
    assert by_name["a"][2].replace(tzinfo=dt.timezone.utc) == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert by_name["c"][:2] == ("seen", WHEN) and by_name["d"][0] == "kept" and by_name["e"][0] == "new"


async def test_a_constraint_failure_is_sqlalchemys_integrity_error_and_rolls_back(database: Database) -> None:
    await _create(database)
    await database.run_in_transaction(lambda conn: INSERT.run(conn, {"name": "x"}), write=True)

    def duplicate(conn: Connection) -> None:
        INSERT.run(conn, {"name": "y"})
        INSERT.run(conn, {"name": "x"})

    with pytest.raises(IntegrityError):
        await database.run_in_transaction(duplicate, write=True)
    assert [row[0] for row in await database.run_in_transaction(_rows)] == ["x"]


async def test_rows_given_as_tuples_write_what_run_many_writes(database: Database) -> None:
    """``run_many_rows``: tuples straight to the driver when no column converts or defaults (the pairs, in
    either column order), else through ``run_many`` (created_at's default, seen_at's timestamp processor)."""
    await _create(database)

    def write(conn: Connection) -> None:
        INSERT_PAIRS.run_many_rows(conn, ("left", "right"), [(1, -2**63), (1, 2**63 - 1)])
        INSERT_PAIRS.run_many_rows(conn, ("right", "left"), [(7, 2), (8, 2)])
        INSERT_MANY.run_many_rows(conn, ("name", "seen_at"), [("r", WHEN), ("s", None)])  # converted, defaulted
        INSERT_MANY.run_many(conn, [{"name": "t", "seen_at": WHEN}])

    await database.run_in_transaction(write, write=True)
    pairs = await database.run_in_transaction(
        lambda conn: [tuple(row) for row in conn.execute(select(PAIRS).order_by(PAIRS.c.left, PAIRS.c.right))])
    assert pairs == [(1, -2**63), (1, 2**63 - 1), (2, 7), (2, 8)]
    by_name = {row[0]: row[1:] for row in await database.run_in_transaction(_rows)}
    assert by_name["r"] == by_name["t"] and by_name["r"][1] == WHEN and by_name["s"][:2] == ("new", None)
    with pytest.raises(IntegrityError):
        await database.run_in_transaction(
            lambda conn: INSERT_PAIRS.run_many_rows(conn, ("left", "right"), [(3, 3), (3, 3)]), write=True)
    assert (3, 3) not in await database.run_in_transaction(lambda conn: [tuple(r) for r in conn.execute(select(PAIRS))])


async def test_rows_read_back_converted_as_core_reads_them(database: Database) -> None:
    """``Prepared.rows``: the selected columns through their types' result processors on the driver path too
    (an aware UTC datetime, not SQLite's text), equal to what ``Connection.execute`` returns."""
    await _create(database)
    await database.run_in_transaction(lambda conn: INSERT.run(conn, {"name": "w", "seen_at": WHEN}), write=True)
    query = Prepared(select(ITEMS.c.name, ITEMS.c.seen_at, ITEMS.c.id).where(ITEMS.c.name == bindparam("who")))

    def read(conn: Connection) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        return query.rows(conn, {"who": "w"}), [tuple(row) for row in conn.execute(query.statement, {"who": "w"})]

    prepared, core = await database.run_in_transaction(read)
    assert prepared == core and prepared[0][1] == WHEN and isinstance(prepared[0][2], int)

"""``Prepared`` binds a ``UTCDateTime`` on SQLite with its own processor: the very text Core writes (SQLite
compares and sorts these columns as text), for any aware datetime whatever its zone; None and naive values
as Core treats them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, Table, insert
from sqlalchemy.dialects import sqlite

from gateway.storage.models import UTCDateTime
from gateway.storage.prepared import Prepared

_meta = MetaData()
STAMPS = Table("prepared_stamps", _meta, Column("id", Integer, primary_key=True), Column("at", UTCDateTime()))
INSERT = Prepared(insert(STAMPS))
DIALECT = sqlite.dialect()
CORE = cast(Callable[[Any], Any], insert(STAMPS).compile(dialect=DIALECT, column_keys=["at"])._bind_processors["at"])
PREPARED = INSERT._plan(DIALECT, {"at": None}).processors["at"]
ZONES = st.builds(dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59),
                                             max_value=dt.timedelta(hours=23, minutes=59)))


def test_prepared_has_its_own_processor() -> None:
    assert PREPARED is not CORE


@given(st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=ZONES))
def test_the_text_bound_is_cores(value: dt.datetime) -> None:
    assert PREPARED(value) == CORE(value)


def test_none_and_naive_values_as_core() -> None:
    assert PREPARED(None) is None and CORE(None) is None
    for processor in (PREPARED, CORE):
        with pytest.raises(ValueError, match="naive datetime"):
            processor(dt.datetime(2026, 1, 1))

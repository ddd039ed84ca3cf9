"""What we write, our own grammar reads back: strings, fetch items, flags, date-times."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from gateway.imap.protocol import response as r
from gateway.imap.protocol.dates import format_date_time, parse_date_time
from gateway.imap.protocol.fetch import BodySection, FetchAttribute, parse_fetch_attribute
from gateway.imap.protocol.mailbox_name import parse_mailbox
from gateway.imap.protocol.primitives import parse_astring, parse_nstring

octets = st.binary(max_size=200).filter(lambda value: b"\x00" not in value)


@given(octets)
def test_astring_round_trip(value: bytes) -> None:
    """RFC 3501 9: atom, quoted or literal; whichever we choose must read back identically."""
    decoded, rest = parse_astring(memoryview(r.astring(value)))
    assert decoded == value and not len(rest)


@given(st.none() | octets)
def test_nstring_round_trip(value: bytes | None) -> None:
    decoded, rest = parse_nstring(memoryview(r.nstring(value)))
    assert decoded == value and not len(rest)


@given(st.text(min_size=1, max_size=40).filter(lambda name: all(ord(ch) >= 0x20 and ord(ch) != 0x7F for ch in name)
                                              and name.upper() != "INBOX"),
       st.booleans())
def test_mailbox_name_round_trip(name: str, utf8: bool) -> None:
    """RFC 3501 5.1.3 / RFC 6855 3: encode for the wire, parse back to the same name."""
    decoded, rest = parse_mailbox(memoryview(r.mailbox(name, utf8=utf8)), utf8=utf8)
    assert decoded == name and not len(rest)


field_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z")
sections = st.one_of(
    st.just(BodySection()),
    st.builds(BodySection, st.lists(st.integers(1, 99), min_size=1, max_size=4).map(tuple)),
    st.builds(BodySection, st.lists(st.integers(1, 99), max_size=3).map(tuple),
              st.sampled_from(["HEADER", "TEXT"])),
    st.builds(BodySection, st.lists(st.integers(1, 99), min_size=1, max_size=3).map(tuple), st.just("MIME")),
    st.builds(BodySection, st.lists(st.integers(1, 99), max_size=3).map(tuple),
              st.sampled_from(["HEADER.FIELDS", "HEADER.FIELDS.NOT"]),
              st.lists(field_names, min_size=1, max_size=5).map(tuple)),
)
partials = st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1))


@given(sections, partials, st.booleans())
def test_fetch_item_round_trip(section: BodySection, partial: tuple[int, int] | None, peek: bool) -> None:
    item = FetchAttribute("BODY", section, partial, peek)
    parsed, rest = parse_fetch_attribute(memoryview(item.request_name().encode()))
    assert parsed == item and not len(rest)


@given(st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(9999, 12, 31)),
       st.integers(-23 * 60 - 59, 23 * 60 + 59))
def test_date_time_round_trip(moment: dt.datetime, offset_minutes: int) -> None:
    """RFC 3501 9 date-time keeps seconds and the zone."""
    value = moment.replace(microsecond=0, tzinfo=dt.timezone(dt.timedelta(minutes=offset_minutes)))
    parsed, rest = parse_date_time(memoryview(format_date_time(value).encode()))
    assert parsed == value and parsed.utcoffset() == value.utcoffset() and not len(rest)

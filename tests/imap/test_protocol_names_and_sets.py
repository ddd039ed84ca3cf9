"""Sequence sets (RFC 3501 9, RFC 5182) and mailbox names (RFC 3501 5.1.3, RFC 6855)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.imap.protocol.dates import format_date_time, parse_date, parse_date_time
from gateway.imap.protocol.errors import ParseError
from gateway.imap.protocol.mailbox_name import (
    InvalidMailboxName, decode_mailbox_octets, decode_modified_utf7, encode_modified_utf7, normalise_inbox,
)
from gateway.imap.protocol.sequence import SequenceRange, SequenceSet, sequence_set_from_text

_numbers = st.integers(1, 2**32 - 1) | st.none()
sequence_sets = st.lists(st.tuples(_numbers, _numbers).map(lambda pair: SequenceRange(*pair)),
                         min_size=1, max_size=10).map(lambda ranges: SequenceSet(tuple(ranges)))


@given(sequence_sets)
def test_sequence_set_round_trip(value: SequenceSet) -> None:
    assert sequence_set_from_text(value.format()) == value


@given(sequence_sets, st.integers(0, 500))
def test_resolution_matches_membership(value: SequenceSet, largest: int) -> None:
    intervals = value.resolve(largest)
    assert intervals == sorted(intervals)
    for (_, high), (low, _) in zip(intervals, intervals[1:], strict=False):
        assert low > high + 1                      # merged and disjoint
    for number in range(1, min(largest, 60) + 1):
        expected = any(item.bounds(largest)[0] <= number <= item.bounds(largest)[1] for item in value.ranges)
        assert value.contains(number, largest) == expected


def test_star_and_reversed_ranges() -> None:
    """RFC 3501 9: "*" is the largest number in use; "4:2" equals "2:4"; RFC 3501 6.4.8 n:* with n > max."""
    assert sequence_set_from_text("4:2,7:*").resolve(9) == [(2, 4), (7, 9)]
    assert sequence_set_from_text("15:*").resolve(10) == [(10, 15)]
    assert sequence_set_from_text("*").resolve(0) == []
    assert list(sequence_set_from_text("1,3:4").iter_values(10)) == [1, 3, 4]
    assert sequence_set_from_text("$").saved
    with pytest.raises(ValueError):
        sequence_set_from_text("$").resolve(5)


@pytest.mark.parametrize("text", ["", "0", "1:", ":1", "1::2", "1,,2", "a", "1:2:3", "4294967296"])
def test_invalid_sequence_sets(text: str) -> None:
    with pytest.raises(ParseError):
        sequence_set_from_text(text)


MUTF7_EXAMPLES = [
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),   # RFC 3501 5.1.3
    ("&", "&-"),
    ("Éléments envoyés", "&AMk-l&AOk-ments envoy&AOk-s"),
    ("Corbeille", "Corbeille"),
    ("😀", "&2D3eAA-"),
]


@pytest.mark.parametrize(("name", "wire"), MUTF7_EXAMPLES)
def test_modified_utf7_examples(name: str, wire: str) -> None:
    assert encode_modified_utf7(name) == wire
    assert decode_modified_utf7(wire) == name


@given(st.text(max_size=40))
def test_modified_utf7_round_trip(name: str) -> None:
    wire = encode_modified_utf7(name)
    assert wire.isascii()
    assert decode_modified_utf7(wire) == name


@pytest.mark.parametrize("wire", ["&", "a&b", "&U,BTFw", "&AGE-", "&U,BTFw-&ZeVnLIqe-", "&2D0-", "&AM-",
                                  "&!!-", "caf\u00e9", "&AOl-"])
def test_invalid_modified_utf7(wire: str) -> None:
    """Unterminated, printable ASCII encoded, adjacent runs, lone surrogates, odd lengths, 8-bit."""
    with pytest.raises(ParseError):
        decode_modified_utf7(wire)


def test_invalid_modified_utf7_name_is_no_and_pattern_kept_as_written() -> None:
    """An invalid name is a NO [CANNOT] (the command is well formed); a LIST pattern keeps its text."""
    with pytest.raises(InvalidMailboxName) as caught:
        decode_mailbox_octets(b"Rapports&Jjo", utf8=False)
    assert caught.value.response(b"a".decode()).startswith(b"a NO [CANNOT]")
    assert decode_mailbox_octets(b"!#$&'+,-.%*", utf8=False, pattern=True) == "!#$&'+,-.%*"


def test_inbox_is_case_insensitive_and_control_characters_refused() -> None:
    assert normalise_inbox("inBox") == "INBOX"
    assert normalise_inbox("INBOX/sub") == "INBOX/sub"
    with pytest.raises(InvalidMailboxName):
        decode_mailbox_octets(b"a\rb", utf8=True)
    assert decode_mailbox_octets("é".encode(), utf8=True) == "é"


def test_dates() -> None:
    """RFC 3501 9: date and date-time (date-day-fixed with a leading space)."""
    assert parse_date(memoryview(b"1-Feb-1994"))[0] == dt.date(1994, 2, 1)
    assert parse_date(memoryview(b'"25-dec-2020"'))[0] == dt.date(2020, 12, 25)
    value, _ = parse_date_time(memoryview(b'" 7-Feb-1994 21:52:25 -0800"'))
    assert value == dt.datetime(1994, 2, 8, 5, 52, 25, tzinfo=dt.timezone.utc)
    assert format_date_time(value) == "\" 7-Feb-1994 21:52:25 -0800\""
    with pytest.raises(ParseError):
        parse_date_time(memoryview(b'"7-Feb-1994 25:52:25 -0800"'))
    with pytest.raises(ParseError):
        parse_date_time(memoryview(b'"7-Feb-1994 21:52:25 +9999"'))

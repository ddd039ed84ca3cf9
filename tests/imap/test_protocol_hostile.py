"""Hostile and random input: only ImapError subclasses, with a reason, and bounded work."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.imap.protocol.errors import ImapError, ParseError
from gateway.imap.protocol.parser import ParserOptions, parse_command
from gateway.imap.protocol.reader import NEED_DATA, CommandAssembler, RawCommand, ReaderLimits
from gateway.imap.protocol.search import (
    SearchAll, SearchAnd, SearchDate, SearchFlag, SearchHeader, SearchKey, SearchNot, SearchOr,
    SearchSequence, SearchSize, SearchText,
)
from gateway.imap.protocol.sequence import SequenceRange, SequenceSet
from gateway.directory.demo import DemoAccount
from tests.imap.imap_server import Conversation, RunningImap, imap  # noqa: F401 (fixture)


def assert_bad(wire: bytes) -> ParseError:
    with pytest.raises(ParseError) as caught:
        parse_command(wire)
    assert caught.value.text
    return caught.value


def test_ten_thousand_nested_parentheses_in_search() -> None:
    error = assert_bad(b"a SEARCH " + b"(" * 10_000 + b"ALL" + b")" * 10_000)
    assert "nested too deeply" in error.text


def test_deep_not_and_or_chains() -> None:
    assert_bad(b"a SEARCH " + b"NOT " * 10_000 + b"ALL")
    assert_bad(b"a SEARCH " + b"OR ALL " * 10_000 + b"ALL")


def test_unterminated_quotes() -> None:
    assert_bad(b'a LOGIN "fred secret')
    assert_bad(b'a SEARCH SUBJECT "abc')


def test_nul_bytes() -> None:
    assert_bad(b"a LOGIN fr\x00ed secret")
    assert_bad(b'a LOGIN "fr\x00ed" secret')
    assert_bad(b"a NOOP\x00")


def test_invalid_utf8_where_text_is_required() -> None:
    assert "UTF-8" in assert_bad(b'a LOGIN "\xff\xfe" pw').text
    assert "UTF-8" in assert_bad(b'a SEARCH SUBJECT "\xc3\x28"').text
    with pytest.raises(ParseError):
        parse_command(b'a SELECT "\xc3\x28"', ParserOptions(utf8=True))


def test_huge_numbers() -> None:
    assert_bad(b"a FETCH 1:" + b"9" * 10_000 + b" FLAGS")
    assert_bad(b"a SEARCH LARGER " + b"9" * 10_000)
    assert_bad(b"a STORE 1 (UNCHANGEDSINCE 99999999999999999999) FLAGS ()")


def test_literal_announced_longer_than_present() -> None:
    assert "shorter" in assert_bad(b"a LOGIN {10}\r\nabc def").text


def test_overlong_line_in_reader() -> None:
    assembler = CommandAssembler(ReaderLimits(max_line_length=1024))
    assembler.feed(b"a SEARCH " + b"ALL " * 100_000)
    with pytest.raises(ImapError) as caught:
        assembler.next_event()
    assert caught.value.tag == "a"


# --- hypothesis ------------------------------------------------------------------------

@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        parse_command(data)
    except ImapError:
        pass


TOKENS = [b"a", b"UID", b"FETCH", b"SEARCH", b"STORE", b"LIST", b"SELECT", b"APPEND", b"LOGIN", b"ID",
          b"BODY[", b"]", b"(", b")", b"<", b">", b".", b"1", b"*", b":", b",", b"$", b"\"", b"\\", b"{3}\r\nabc",
          b"{2+}\r\n", b"~{1}\r\n\x00", b"NIL", b"NOT", b"OR", b"HEADER", b"FLAGS", b"+FLAGS", b"\\Seen",
          b"CHARSET", b"UTF-8", b"RETURN", b"INBOX", b"&", b"-", b"&AOk-", b"1-Jan-2020", b"\xff", b"\x00",
          b"MODSEQ", b"CHANGEDSINCE", b"QRESYNC", b"HEADER.FIELDS", b"MIME", b"TEXT", b"%", b"\r\n"]


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=30), st.lists(st.sampled_from([b" ", b""]), max_size=30),
       st.booleans())
def test_token_soup_never_raises_anything_else(tokens: list[bytes], spaces: list[bytes], utf8: bool) -> None:
    wire = b"t1 " + b"".join(token + (spaces[i] if i < len(spaces) else b" ") for i, token in enumerate(tokens))
    try:
        parse_command(wire, ParserOptions(utf8=utf8))
    except ImapError as error:
        assert error.response().endswith(b"\r\n")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64) | st.sampled_from([b"{5}\r\n", b"{3+}\r\n", b"\r\n", b"~{2}\r\n",
                                                          b"{99999999999}\r\n"]), max_size=40))
def test_reader_on_random_chunks_only_raises_imap_errors(chunks: list[bytes]) -> None:
    assembler = CommandAssembler(ReaderLimits(max_line_length=128, max_literal_size=64, max_command_size=512,
                                              max_literals=4, max_skip_size=256))
    for chunk in chunks:
        assembler.feed(chunk)
        for _ in range(100):
            try:
                event = assembler.next_event()
            except ImapError:
                continue
            if event is NEED_DATA:
                break
            if isinstance(event, RawCommand):
                assert len(event.data) <= 512
        assert assembler.buffered <= 128 + 64 + 2 + max((len(c) for c in chunks), default=0)


# --- generated valid SEARCH programs -------------------------------------------------------

_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 éü\"\\", min_size=0, max_size=12)
_dates = st.dates(min_value=dt.date(1970, 1, 1), max_value=dt.date(2099, 12, 31))
_months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _date(value: dt.date) -> str:
    return f"{value.day}-{_months[value.month - 1]}-{value.year}"


def _leaf() -> st.SearchStrategy[tuple[str, SearchKey]]:
    flags = st.sampled_from([("SEEN", SearchFlag("\\Seen")), ("UNSEEN", SearchFlag("\\Seen", False)),
                             ("DELETED", SearchFlag("\\Deleted")), ("OLD", SearchFlag("\\Recent", False)),
                             ("ALL", SearchAll()), ("UNDRAFT", SearchFlag("\\Draft", False))])
    headers = st.tuples(st.sampled_from(["FROM", "TO", "CC", "BCC", "SUBJECT"]), _words).map(
        lambda pair: (f"{pair[0]} {_quote(pair[1])}", SearchHeader(pair[0].lower(), pair[1])))
    texts = st.tuples(st.sampled_from(["BODY", "TEXT"]), _words).map(
        lambda pair: (f"{pair[0]} {_quote(pair[1])}", SearchText(pair[0].lower(), pair[1])))  # type: ignore[arg-type]
    dates = st.tuples(st.sampled_from(["BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"]), _dates).map(
        lambda pair: (f"{pair[0]} {_date(pair[1])}", SearchDate(
            "sent" if pair[0].startswith("SENT") else "internal",
            pair[0].removeprefix("SENT").lower(), pair[1])))  # type: ignore[arg-type]
    sizes = st.tuples(st.sampled_from(["LARGER", "SMALLER"]), st.integers(0, 2**32 - 1)).map(
        lambda pair: (f"{pair[0]} {pair[1]}", SearchSize(pair[0].lower(), pair[1])))  # type: ignore[arg-type]
    keywords = st.from_regex(r"\A\$?[A-Za-z][A-Za-z0-9_]{0,10}\Z").map(
        lambda word: (f"KEYWORD {word}", SearchFlag(word)))
    uids = sequence_sets.map(lambda s: (f"UID {s.format()}", SearchSequence(s, uid=True)))
    return st.one_of(flags, headers, texts, dates, sizes, keywords, uids)


def _compose(children: st.SearchStrategy[tuple[str, SearchKey]]) -> st.SearchStrategy[tuple[str, SearchKey]]:
    negations = children.map(lambda child: (f"NOT {child[0]}", SearchNot(child[1])))
    disjunctions = st.tuples(children, children).map(
        lambda pair: (f"OR {pair[0][0]} {pair[1][0]}", SearchOr(pair[0][1], pair[1][1])))
    groups = st.lists(children, min_size=2, max_size=4).map(
        lambda items: ("(" + " ".join(w for w, _ in items) + ")", SearchAnd(tuple(k for _, k in items))))
    return st.one_of(negations, disjunctions, groups)


_numbers = st.integers(1, 2**32 - 1) | st.none()
sequence_sets = st.lists(
    st.one_of(st.integers(1, 2**32 - 1).map(lambda n: SequenceRange(n, n)),
              st.tuples(_numbers, _numbers).map(lambda pair: SequenceRange(*pair))),
    min_size=1, max_size=8).map(lambda ranges: SequenceSet(tuple(ranges)))
search_keys = st.recursive(_leaf(), _compose, max_leaves=12)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(search_keys, st.booleans())
def test_generated_search_programs_parse(program: tuple[str, SearchKey], uid: bool) -> None:
    text, expected = program
    prefix = "t UID SEARCH CHARSET UTF-8 " if uid else "t SEARCH CHARSET UTF-8 "
    command = parse_command((prefix + text).encode("utf-8"))
    assert command.criteria == expected   # type: ignore[attr-defined]


# --- printable mailbox names and patterns through a real session ------------------------------------------

PRINTABLE_NAME_PIECES = st.sampled_from(list("!#$&'+,-.0123456789:;<=>?@^_`|}~ []/%*aZ") + ["&-", "&AOk-", "INBOX"])


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PRINTABLE_NAME_PIECES, min_size=1, max_size=12).map("".join))
def test_printable_names_and_patterns_never_end_the_session(imap: RunningImap, name: str) -> None:  # noqa: F811
    """Any printable name or pattern (RFC 3501 5.1, 6.3.8) gets a tagged OK, NO or BAD, and the session
    goes on: LIST "" "!#$&'+,-.0123456789:;<=>?@^_`|}%*" once ended it (an invalid modified UTF-7 pattern)."""
    conversation = Conversation(imap, _HOSTILE_ACCOUNT.setdefault("account", imap.new_account()))
    try:
        for command in (f'LIST "" {_quoted(name)}', f"LIST {_quoted(name)} %", f'LSUB "" {_quoted(name)}',
                        f'LIST (SUBSCRIBED RECURSIVEMATCH) "" {_quoted(name)} RETURN (CHILDREN STATUS (MESSAGES))',
                        f"CREATE {_quoted(name)}", f"STATUS {_quoted(name)} (MESSAGES)",
                        f"SUBSCRIBE {_quoted(name)}", f"EXAMINE {_quoted(name)}", "UNSELECT",
                        f"DELETE {_quoted(name)}"):
            conversation.send(f"h {command}")
            while not (line := conversation.line()).startswith("h "):
                assert line.startswith(("* ", "+ ")), (command, line)
            assert line.split(" ")[1] in ("OK", "NO", "BAD"), (command, line)
            assert "SERVERBUG" not in line, (command, line)
        conversation.command("NOOP")                  # still served
    finally:
        conversation.close()


_HOSTILE_ACCOUNT: dict[str, DemoAccount] = {}

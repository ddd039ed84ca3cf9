"""The command reader: literals, continuation requests, limits, recovery (RFC 3501 4.3, 7.5; RFC 7888)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.imap.protocol.errors import TRYCREATE, BadCommand, ImapError, ImapNo, LiteralTooLarge
from gateway.imap.protocol.reader import (
    NEED_DATA, ClientDisconnected, CommandAssembler, CommandReader, ContinuationRequest, RawCommand,
    ReaderLimits, ReaderEvent,
)

SMALL = ReaderLimits(max_line_length=200, max_literal_size=100, max_append_size=1000,
                     max_command_size=2000, max_literals=3, max_skip_size=5000)


def events(assembler: CommandAssembler, data: bytes) -> list[ReaderEvent]:
    """Feed ``data`` and collect events until more data is needed."""
    assembler.feed(data)
    collected: list[ReaderEvent] = []
    while (event := assembler.next_event()) is not NEED_DATA:
        collected.append(event)
    return collected


def test_one_line_command() -> None:
    assert events(CommandAssembler(), b"a1 NOOP\r\n") == [RawCommand(b"a1 NOOP", "a1", 0)]


def test_partial_line_waits_for_more() -> None:
    assembler = CommandAssembler()
    assert events(assembler, b"a1 NO") == []
    assert events(assembler, b"OP\r") == []
    assert events(assembler, b"\n") == [RawCommand(b"a1 NOOP", "a1", 0)]


def test_pipelined_commands_come_out_one_by_one() -> None:
    assert events(CommandAssembler(), b"a NOOP\r\nb NOOP\r\n") == [
        RawCommand(b"a NOOP", "a", 0), RawCommand(b"b NOOP", "b", 0)]


def test_synchronising_literal_asks_for_continuation() -> None:
    """RFC 3501 7.5: the server sends "+" before the client sends the literal."""
    assembler = CommandAssembler()
    first = events(assembler, b"A003 APPEND INBOX {5}\r\n")
    assert len(first) == 1 and isinstance(first[0], ContinuationRequest) and first[0].size == 5
    assert events(assembler, b"hel") == []
    assert events(assembler, b"lo\r\n") == [RawCommand(b"A003 APPEND INBOX {5}\r\nhello", "A003", 1)]


def test_non_synchronising_literal_needs_no_continuation() -> None:
    """RFC 7888 3: {n+} is sent at once."""
    wire = b"A001 LOGIN {11+}\r\nFRED FOOBAR {7+}\r\nfat man\r\n"
    assert events(CommandAssembler(), wire) == [RawCommand(wire[:-2], "A001", 2)]


def test_literal_may_contain_crlf_and_braces() -> None:
    wire = b"a APPEND x {7}\r\n{2}\r\n\r\n\r\n"
    result = events(CommandAssembler(), wire)
    assert result[-1] == RawCommand(b"a APPEND x {7}\r\n{2}\r\n\r\n", "a", 1)


def test_literal8_marker() -> None:
    wire = b"a APPEND x ~{3+}\r\n\x00\x01\x02\r\n"
    assert events(CommandAssembler(), wire) == [RawCommand(wire[:-2], "a", 1)]


def test_overlong_line_while_idling_is_refused_then_skipped() -> None:
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"z" * 300)
    with pytest.raises(BadCommand):
        assembler.next_line()
    assembler.feed(b"zz\r\nDONE\r\n")
    assert assembler.next_line() == b"DONE"


def test_idle_done_line() -> None:
    assembler = CommandAssembler()
    assembler.feed(b"DO")
    assert assembler.next_line() is None
    assembler.feed(b"NE\r\na NOOP\r\n")
    assert assembler.next_line() == b"DONE"
    assert assembler.next_event() == RawCommand(b"a NOOP", "a", 0)


def test_overlong_line_is_refused_then_skipped() -> None:
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"t1 NOOP " + b"x" * 300)
    with pytest.raises(BadCommand) as caught:
        assembler.next_event()
    assert caught.value.response() == b"t1 BAD Command line too long\r\n"
    assert events(assembler, b"y" * 1000 + b"\r\nt2 NOOP\r\n") == [RawCommand(b"t2 NOOP", "t2", 0)]


def test_synchronising_literal_too_large_is_no_toobig_before_reading() -> None:
    """RFC 7888 4 / RFC 4469: refuse before "+"; the client sends nothing more for this command."""
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"t1 LOGIN {101}\r\n")
    with pytest.raises(LiteralTooLarge) as caught:
        assembler.next_event()
    assert caught.value.response() == b"t1 NO [TOOBIG] Literal too large (101 octets, limit 100)\r\n"
    assert not caught.value.fatal
    assert events(assembler, b"t2 NOOP\r\n") == [RawCommand(b"t2 NOOP", "t2", 0)]


def test_append_has_its_own_literal_limit() -> None:
    assembler = CommandAssembler(SMALL)
    assert isinstance(events(assembler, b"a APPEND INBOX {900}\r\n")[0], ContinuationRequest)


def test_huge_literal_announcement() -> None:
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"t1 APPEND INBOX {99999999999}\r\n")
    with pytest.raises(LiteralTooLarge) as caught:
        assembler.next_event()
    assert caught.value.synchronising and caught.value.response().startswith(b"t1 NO [TOOBIG]")


def test_absurd_digit_count_is_refused_without_conversion() -> None:
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"t1 LOGIN {" + b"9" * 20 + b"+}\r\n")
    with pytest.raises(LiteralTooLarge) as caught:
        assembler.next_event()
    assert caught.value.fatal and caught.value.response().startswith(b"t1 BAD [TOOBIG]")


def test_non_synchronising_literal_too_large_is_skipped() -> None:
    """RFC 7888 4: BAD [TOOBIG]; the literal's octets must not be read as commands."""
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"t1 LOGIN {150+}\r\n")
    with pytest.raises(LiteralTooLarge) as caught:
        assembler.next_event()
    assert not caught.value.fatal
    injected = b"t9 DELETE INBOX\r\n".ljust(150, b"x")
    assert events(assembler, injected + b" pw\r\nt2 NOOP\r\n") == [RawCommand(b"t2 NOOP", "t2", 0)]


def test_too_many_literals() -> None:
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"t ID ({1+}\r\na {1+}\r\nb {1+}\r\nc {1+}\r\nd)\r\nt2 NOOP\r\n")
    with pytest.raises(BadCommand) as caught:
        assembler.next_event()
    assert caught.value.tag == "t"
    assert events(assembler, b"") == [RawCommand(b"t2 NOOP", "t2", 0)]


def test_total_command_size_is_bounded() -> None:
    limits = ReaderLimits(max_line_length=200, max_literal_size=100, max_command_size=250, max_literals=10)
    assembler = CommandAssembler(limits)
    with pytest.raises(ImapError):
        events(assembler, b"t LOGIN {90+}\r\n" + b"a" * 90 + b" {90+}\r\n" + b"b" * 90 + b" {90+}\r\n")


def test_untagged_error_when_no_tag() -> None:
    assembler = CommandAssembler(SMALL)
    assembler.feed(b"(" * 300)
    with pytest.raises(BadCommand) as caught:
        assembler.next_event()
    assert caught.value.response().startswith(b"* BAD ")


def test_memory_stays_bounded_for_an_endless_line() -> None:
    assembler = CommandAssembler(SMALL)
    with pytest.raises(BadCommand):
        events(assembler, b"a" * 500)
    for _ in range(100):
        assert events(assembler, b"b" * 10_000) == []
        assert assembler.buffered <= 10_000


# --- the asyncio driver -----------------------------------------------------------------

async def _run_reader(wire: bytes) -> tuple[list[RawCommand], list[int]]:
    stream = asyncio.StreamReader()
    stream.feed_data(wire)
    stream.feed_eof()
    reader = CommandReader(stream, SMALL, chunk_size=7)
    continuations: list[int] = []

    async def send_continuation(request: ContinuationRequest) -> None:
        continuations.append(request.size)

    commands: list[RawCommand] = []
    try:
        while True:
            commands.append(await reader.read_command(send_continuation))
    except ClientDisconnected:
        return commands, continuations


async def test_async_reader_drives_the_core() -> None:
    commands, continuations = await _run_reader(b"a LOGIN {3}\r\nbob {2}\r\npw\r\nb NOOP\r\n")
    assert commands == [RawCommand(b"a LOGIN {3}\r\nbob {2}\r\npw", "a", 2), RawCommand(b"b NOOP", "b", 0)]
    assert continuations == [3, 2]


async def test_async_read_line() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(b"DONE\r\n")
    assert await CommandReader(stream).read_line() == b"DONE"


async def test_session_may_refuse_a_literal_before_it_is_sent() -> None:
    """RFC 3501 7.5: a tagged NO instead of "+" (e.g. APPEND to a missing mailbox, [TRYCREATE])."""
    stream = asyncio.StreamReader()
    stream.feed_data(b"a1 APPEND Missing {5}\r\na2 NOOP\r\n")
    reader = CommandReader(stream, SMALL)
    seen: list[bytes] = []

    async def refuse(request: ContinuationRequest) -> None:
        seen.append(request.command_so_far)
        raise ImapNo("No such mailbox", TRYCREATE)

    with pytest.raises(ImapNo) as caught:
        await reader.read_command(refuse)
    assert caught.value.response() == b"a1 NO [TRYCREATE] No such mailbox\r\n"
    assert seen == [b"a1 APPEND Missing {5}\r\n"]
    assert await reader.read_command(refuse) == RawCommand(b"a2 NOOP", "a2", 0)


def test_log_form_hides_credentials_and_literals() -> None:
    assembler = CommandAssembler()
    login = events(assembler, b"a LOGIN {3+}\r\nbob {6+}\r\nsecret\r\n")[0]
    assert isinstance(login, RawCommand)
    assert login.for_log() == "a LOGIN ***" and "secret" not in repr(login)
    append = events(assembler, b"b APPEND INBOX {2+}\r\nhi\r\n")[0]
    assert isinstance(append, RawCommand)
    assert append.for_log() == "b APPEND INBOX {2+} (+1 literal(s), 23 octets)"

"""The block DATA reader (gateway.smtp.body) against the line reader it replaced, on arbitrary input.

The line reader below is the one ``GatewaySMTP._receive_body`` used until the block reader (one
``readuntil(b"\\n")`` per line, the checks per line), kept here as the reference. Both read the same octets
from a real ``asyncio.StreamReader`` fed in arbitrary pieces (as TLS records come), with small limits so that
every rule is reached: bare CR and bare LF, ``<CRLF>.<CRLF>`` split across reads, look-alike ends,
dot-stuffing, long lines, 8-bit octets, the size limit, and what follows the end of DATA (the next
commands: never read). They must give the same reply, the same message octets and leave the same octets in
the stream.

A line longer than the stream's limit is where they part: the line reader's ``LimitOverrunError`` cut it
where the read happened to end, and judged the line's end from what came after the cut. Those inputs are
checked against ``model`` instead, which judges the end of such a line from the line itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mail import codes
from gateway.mail.codes import Reply
from gateway.smtp.body import BodyReader, bare_line_ending

END = b"\r\n.\r\n"
NEXT_COMMANDS = b"QUIT\r\n"


@dataclass
class Outcome:
    problem: Reply | None
    content: bytes | None          # what the sink got, when the message is not refused
    size: int | None               # octets counted, when the message is not refused
    left: bytes                    # what the stream still holds after the reader
    incomplete: bool = False       # the stream ended before the end of DATA


@dataclass
class Sink:
    chunks: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))


@dataclass
class _LineReading:
    size: int = 0
    problem: Reply | None = None
    buffer: bytearray = field(default_factory=bytearray)
    inside_overlong_line: bool = False
    after_crlf: bool = True


async def line_reader(stream: asyncio.StreamReader, sink: Sink, max_line_length: int, max_message_size: int,
                      flush_bytes: int) -> _LineReading:
    """The line reader of ``GatewaySMTP._receive_body`` / ``_take_line`` before the block reader."""
    reading = _LineReading()
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.LimitOverrunError as overrun:
            await stream.read(overrun.consumed)
            reading.inside_overlong_line = True
            reading.problem = reading.problem or codes.DATA_LINE_TOO_LONG.format(limit=max_line_length)
            continue
        if reading.inside_overlong_line:
            reading.inside_overlong_line = False
            reading.after_crlf = line.endswith(b"\r\n")
            continue
        if line == b".\r\n" and reading.after_crlf:
            break
        reading.after_crlf = line.endswith(b"\r\n")
        if line.startswith(b"."):
            line = line[1:]
        reading.size += len(line)
        if reading.problem is not None:
            continue
        bare = bare_line_ending(line)
        if bare is not None:
            reading.problem = bare
        elif len(line) - 2 > max_line_length:
            reading.problem = codes.DATA_LINE_TOO_LONG.format(limit=max_line_length)
        elif reading.size > max_message_size:
            reading.problem = codes.SIZE_EXCEEDED.format(limit=max_message_size)
        if reading.problem is not None:
            reading.buffer.clear()
            continue
        reading.buffer += line
        if len(reading.buffer) >= flush_bytes:
            sink.write(bytes(reading.buffer))
            reading.buffer.clear()
    if reading.problem is None and reading.buffer:
        sink.write(bytes(reading.buffer))
    return reading


def model(data: bytes, max_line_length: int, max_message_size: int, stream_limit: int) -> Outcome:
    """The rules as a function of the whole input (a line longer than the stream limit: judged by its own end)."""
    position, after_crlf, problem, size, content = 0, True, None, 0, bytearray()
    while True:
        newline = data.find(b"\n", position)
        if newline < 0:
            return Outcome(None, None, None, b"", incomplete=True)
        line, position = data[position:newline + 1], newline + 1
        if len(line) > stream_limit + 1:
            problem = problem or codes.DATA_LINE_TOO_LONG.format(limit=max_line_length)
            after_crlf = line.endswith(b"\r\n")
            continue
        if line == b".\r\n" and after_crlf:
            break
        after_crlf = line.endswith(b"\r\n")
        line = line[1:] if line.startswith(b".") else line
        size += len(line)
        if problem is not None:
            continue
        problem = bare_line_ending(line)
        if problem is None and len(line) - 2 > max_line_length:
            problem = codes.DATA_LINE_TOO_LONG.format(limit=max_line_length)
        if problem is None and size > max_message_size:
            problem = codes.SIZE_EXCEEDED.format(limit=max_message_size)
        content += line
    return Outcome(problem, None if problem else bytes(content), None if problem else size, data[position:])


async def _read(data: bytes, cuts: list[int], stream_limit: int, reader: str, max_line_length: int,
                max_message_size: int, flush_bytes: int) -> Outcome:
    stream = asyncio.StreamReader(limit=stream_limit)
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]

    async def feed() -> None:
        for piece in pieces:
            stream.feed_data(piece)
            await asyncio.sleep(0)
        stream.feed_eof()

    feeder = asyncio.create_task(feed())
    sink = Sink()
    try:
        if reader == "block":
            block = BodyReader(stream, sink, max_line_length=max_line_length, max_message_size=max_message_size,
                               stream_limit=stream_limit, on_flush=lambda: None, flush_bytes=flush_bytes)
            reading = await block.read()
            problem, size = reading.problem, reading.size
        else:
            line_reading = await line_reader(stream, sink, max_line_length, max_message_size, flush_bytes)
            problem, size = line_reading.problem, line_reading.size
    except asyncio.IncompleteReadError:
        await feeder
        return Outcome(None, None, None, b"", incomplete=True)
    await feeder
    left = await stream.read()
    content = b"".join(sink.chunks)
    return Outcome(problem, None if problem else content, None if problem else size, left)


def _run(data: bytes, cuts: list[int], stream_limit: int, reader: str, max_line_length: int,
         max_message_size: int, flush_bytes: int) -> Outcome:
    return asyncio.run(_read(data, cuts, stream_limit, reader, max_line_length, max_message_size, flush_bytes))


# Pieces that meet the rules' edges, joined at random (and raw octets, for what they did not think of).
PIECES = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"Subject: x", b"\xe9\xff\x00", b" ",
                          b"\x0b\x0c\x1c\x1d\x1e\x85", b"\xe2\x80\xa8",
                          END, b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\n.\n", b".\r\n", b"x" * 30, b"y" * 90])
BODIES = st.one_of(st.lists(PIECES, max_size=40).map(b"".join), st.binary(max_size=300))


@st.composite
def transfers(draw: st.DrawFn) -> tuple[bytes, list[int], int, int, int, int]:
    body = draw(BODIES)
    ending = draw(st.sampled_from([END + NEXT_COMMANDS, END, b".\r\n" + NEXT_COMMANDS, b"", END + END]))
    data = body + ending
    stream_limit = draw(st.integers(min_value=8, max_value=120))
    max_line_length = draw(st.integers(min_value=1, max_value=stream_limit - 3))
    max_message_size = draw(st.integers(min_value=0, max_value=400))
    flush_bytes = draw(st.integers(min_value=1, max_value=200))
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=max(1, len(data) - 1)), max_size=12)))
    return data, [c for c in cuts if c < len(data)], stream_limit, max_line_length, max_message_size, flush_bytes


def _has_overlong_line(data: bytes, stream_limit: int) -> bool:
    return any(len(line) + 1 > stream_limit + 1 for line in data.split(b"\n")[:-1]) or \
        len(data.rsplit(b"\n", 1)[-1]) > stream_limit


@settings(max_examples=1500)
@given(transfers())
def test_block_reader_reads_as_the_line_reader(transfer: tuple[bytes, list[int], int, int, int, int]) -> None:
    data, cuts, stream_limit, max_line_length, max_message_size, flush_bytes = transfer
    block = _run(data, cuts, stream_limit, "block", max_line_length, max_message_size, flush_bytes)
    expected = model(data, max_line_length, max_message_size, stream_limit)
    assert block == expected
    if not _has_overlong_line(data, stream_limit):
        assert block == _run(data, cuts, stream_limit, "line", max_line_length, max_message_size, flush_bytes)


@settings(max_examples=300)
@given(st.lists(st.binary(min_size=0, max_size=120), max_size=30), st.integers(min_value=0, max_value=20))
def test_dot_stuffed_lines_come_back_unstuffed(lines: list[bytes], every: int) -> None:
    """RFC 5321 4.5.2: a client's dot-stuffed lines, any 8-bit content, read back as they were."""
    clean = [line.replace(b"\r", b"").replace(b"\n", b"") for line in lines]
    body = b"".join(line + b"\r\n" for line in clean)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in clean)
    data = stuffed + b".\r\n" + NEXT_COMMANDS
    cuts = list(range(every, len(data), every)) if every else []
    outcome = _run(data, cuts, 16384, "block", 998, 10_000, 1024)
    assert outcome == Outcome(None, body, len(body), NEXT_COMMANDS)


def test_an_end_split_across_reads_ends_the_message() -> None:
    data = b"Subject: a\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(data)):
        outcome = _run(data, [cut], 64, "block", 40, 1000, 1000)
        assert outcome == Outcome(None, b"Subject: a\r\n\r\nbody\r\n", 20, b"QUIT\r\n"), cut


def test_an_overlong_line_then_the_end_in_one_read() -> None:
    """A line longer than the stream limit, its CRLF and the end of DATA in one read: refused, and the end is
    seen (the line reader cut such a line before its LF and took the end for content: the client waited)."""
    data = b"a" * 100 + b"\r\n.\r\nQUIT\r\n"
    outcome = _run(data, [], 32, "block", 20, 1000, 1000)
    assert outcome == Outcome(codes.DATA_LINE_TOO_LONG.format(limit=20), None, None, b"QUIT\r\n")

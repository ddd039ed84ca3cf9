"""Assemble one complete IMAP command from the byte stream (RFC 3501 2.2, 4.3, 7.5).

A command is one or more CRLF-terminated lines; a line that ends with a literal
announcement (``{n}``, LITERAL+ ``{n+}`` of RFC 7888, or literal8 ``~{n}`` of
RFC 3516 4.2) is followed by exactly ``n`` octets and then the rest of the
command.  For a synchronising literal the server must first send a command
continuation request (RFC 3501 7.5), so the sans-IO core ``CommandAssembler``
reports that as an event and the async driver ``CommandReader`` calls back.

Everything is bounded: line length, literal size (APPEND gets its own, larger
limit, RFC 7889), total command size and number of literals.  A refusal is an
``ImapError`` carrying the tag when one could be read; after it the rest of the
refused command is skipped so that its bytes are never taken as commands.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import NoReturn

from gateway.imap.protocol.errors import BadCommand, ImapError, LiteralTooLarge

CRLF = b"\r\n"
# RFC 3501 9: literal = "{" number "}" CRLF; RFC 7888 3: "{" number "+}"; RFC 3516 4.2: "~{" number "}".
_LITERAL_MARKER = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")
# RFC 3501 9: tag = 1*<any ASTRING-CHAR except "+">; we only need it to label errors.
_TAG = re.compile(rb"([\x21\x23\x24\x26\x27\x2C-\x5B\x5D-\x7A\x7C-\x7E]+) ")
_COMMAND_NAME = re.compile(rb"[^ ]+ (UID )?([A-Za-z]+)", re.IGNORECASE)
_MARKER_TAIL = 32   # longest literal marker we keep while skipping a line


@dataclass(frozen=True)
class ReaderLimits:
    """Bounds on what one command may make us hold in memory."""

    # One line, without literals.  Clients send long UID sets on one line
    # (Dovecot's imap_max_line_length is 64k for that reason).
    max_line_length: int = 64 * 1024
    max_literal_size: int = 64 * 1024         # any literal outside APPEND
    max_append_size: int = 25 * 1024 * 1024   # APPEND message literal (RFC 7889 APPENDLIMIT)
    max_command_size: int = 26 * 1024 * 1024  # everything, lines and literals
    max_literals: int = 64                    # literals in one command
    max_skip_size: int = 26 * 1024 * 1024     # bytes we will read and drop after a refused command
    before_login: bool = False                # said in refusals: these are the limits of a stranger


PRE_AUTH_LITERAL_SIZE = 8 * 1024


def pre_auth_limits(max_literal_size: int = PRE_AUTH_LITERAL_SIZE,
                    max_line_length: int = 64 * 1024) -> ReaderLimits:
    """What a connection that has not logged in may make us hold (Dovecot's imap-login refuses
    literals beyond a few KiB the same way): one small literal at a time, nothing skipped for it.

    A synchronising literal beyond the limit is refused with NO [TOOBIG] before the client sends
    it (RFC 3501 7.5: no "+"); a LITERAL+ one is already on its way, and reading megabytes for a
    stranger is what we refuse, so the connection is closed with BYE (``max_skip_size`` 0).
    """
    return ReaderLimits(max_line_length=max_line_length, max_literal_size=max_literal_size,
                        max_append_size=max_literal_size, max_command_size=max_line_length + 4 * max_literal_size,
                        max_literals=8, max_skip_size=0, before_login=True)


_SECRET_COMMANDS = re.compile(rb"[^ ]+ (LOGIN|AUTHENTICATE) ", re.IGNORECASE)


@dataclass(frozen=True)
class RawCommand:
    """One complete command as sent: lines and literals, literal markers kept, final CRLF removed."""

    data: bytes = field(repr=False)
    tag: str | None
    literal_count: int

    def for_log(self, limit: int = 200) -> str:
        """A one-line, printable form for logs; LOGIN/AUTHENTICATE arguments and literal contents hidden."""
        secret = _SECRET_COMMANDS.match(self.data)
        if secret:
            return secret.group(0).decode("ascii") + "***"
        first_line = self.data.split(b"\r\n", 1)[0]
        shown = first_line[:limit].decode("ascii", "replace")
        more = f" (+{self.literal_count} literal(s), {len(self.data)} octets)" if self.literal_count else ""
        return "".join(ch if ch.isprintable() else "?" for ch in shown) + more


class ContinuationRequest:
    """The session must send ``+ ...`` (RFC 3501 7.5) before the client sends the literal.

    ``command_so_far`` lets the session refuse before the upload (RFC 3501 7.5
    allows a tagged NO/BAD instead of "+"), e.g. APPEND to a missing mailbox
    with [TRYCREATE] or over quota: it then calls ``abandon_command``.
    """

    __slots__ = ("size", "command_so_far", "tag")

    def __init__(self, size: int, command_so_far: bytes = b"", tag: str | None = None) -> None:
        self.size = size
        self.command_so_far = command_so_far
        self.tag = tag

    def __repr__(self) -> str:
        return f"ContinuationRequest({self.size})"


class NeedData(Enum):
    """More bytes are needed before anything can be returned."""

    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA
ReaderEvent = RawCommand | ContinuationRequest | NeedData


@dataclass(frozen=True)
class _Marker:
    size: int | None       # None when the number has too many digits
    synchronising: bool
    binary: bool


def _literal_marker(line: bytes) -> _Marker | None:
    match = _LITERAL_MARKER.search(line[-_MARKER_TAIL:])
    if match is None:
        return None
    digits = match.group(2)
    size = int(digits) if len(digits) <= 12 else None
    return _Marker(size, synchronising=not match.group(3), binary=bool(match.group(1)))


def read_tag(data: bytes) -> str | None:
    """The tag at the start of a command, if the first bytes form one (for error replies)."""
    match = _TAG.match(data[:256])
    if match is None:
        return None
    return match.group(1).decode("ascii")


class CommandAssembler:
    """Sans-IO core: ``feed`` bytes, then call ``next_event`` until it says ``NEED_DATA``."""

    def __init__(self, limits: ReaderLimits | None = None) -> None:
        self.limits = limits or ReaderLimits()
        self._buffer = bytearray()
        self._scanned = 0                  # bytes of _buffer already searched for CRLF
        self._parts: list[bytes] = []
        self._size = 0
        self._literals = 0
        self._literal_remaining = 0
        self._tag: str | None = None
        self._skipping = False             # dropping the rest of a refused command
        self._skip_tail = b""
        self._skip_remaining = 0

    # -- input ------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- output -----------------------------------------------------------
    def next_event(self) -> ReaderEvent:
        """The next thing the session must do; raises ``ImapError`` for a refused command."""
        while True:
            if self._skipping:
                if not self._skip_some():
                    return NEED_DATA
                continue
            if self._literal_remaining:
                if not self._take_literal_bytes():
                    return NEED_DATA
                continue
            line = self._take_line()
            if line is None:
                return NEED_DATA
            event = self._after_line(line)
            if event is not None:
                return event

    def next_line(self) -> bytes | None:
        """One bare CRLF-terminated line (IDLE's DONE, an AUTHENTICATE response), or None if incomplete."""
        if self._parts or self._literal_remaining:
            raise RuntimeError("next_line called in the middle of a command")
        while self._skipping:
            if not self._skip_some():
                return None
        return self._take_line()

    def abandon_command(self) -> None:
        """Drop the command awaiting a synchronising literal: we answered NO/BAD instead of "+",
        so the client sends nothing more for it (RFC 3501 7.5)."""
        self._reset()

    # -- lines ------------------------------------------------------------
    def _take_line(self) -> bytes | None:
        index = self._buffer.find(CRLF, max(0, self._scanned - 1))
        if index < 0:
            self._scanned = len(self._buffer)
            if len(self._buffer) > self.limits.max_line_length:
                self._refuse_overlong_line()
            return None
        if index > self.limits.max_line_length:
            self._refuse_overlong_line()
        line = bytes(self._buffer[:index])
        del self._buffer[:index + 2]
        self._scanned = 0
        return line

    def _refuse_overlong_line(self) -> NoReturn:
        tag = self._tag if self._parts else read_tag(bytes(self._buffer[:256]))
        self._start_skipping(b"")
        raise BadCommand("Command line too long", tag=tag, policy="too-long")

    def _after_line(self, line: bytes) -> ReaderEvent | None:
        if not self._parts:
            self._tag = read_tag(line)
        self._append(line)
        marker = _literal_marker(line)
        if marker is None:
            return self._complete()
        self._check_literal(marker)
        self._append(CRLF)
        self._literals += 1
        self._literal_remaining = marker.size or 0
        if marker.synchronising:
            return ContinuationRequest(self._literal_remaining, b"".join(self._parts), self._tag)
        return None

    def _complete(self) -> RawCommand:
        command = RawCommand(b"".join(self._parts), self._tag, self._literals)
        self._reset()
        return command

    def _append(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.limits.max_command_size:
            self._refuse(BadCommand("Command too large", tag=self._tag, policy="too-big"), data)
        self._parts.append(data)

    # -- literals ---------------------------------------------------------
    def _literal_limit(self) -> int:
        match = _COMMAND_NAME.match(self._parts[0]) if self._parts else None
        if match and match.group(2).upper() == b"APPEND":
            return self.limits.max_append_size
        return self.limits.max_literal_size

    def _check_literal(self, marker: _Marker) -> None:
        line = self._parts[-1]
        if self._literals >= self.limits.max_literals:
            self._refuse(BadCommand("Too many literals", tag=self._tag, policy="too-many-literals"), line)
        limit = self._literal_limit()
        if marker.size is None or marker.size > limit:
            fatal = not marker.synchronising and (
                marker.size is None or marker.size > self.limits.max_skip_size)
            error = LiteralTooLarge(marker.size, limit, synchronising=marker.synchronising,
                                    tag=self._tag, fatal=fatal)
            if self.limits.before_login:
                error.text += " before login"
            self._refuse(error, line)
        if self._size + marker.size + 2 > self.limits.max_command_size:
            self._refuse(BadCommand("Command too large", tag=self._tag, policy="too-big"), line)

    def _take_literal_bytes(self) -> bool:
        count = min(self._literal_remaining, len(self._buffer))
        if count:
            self._parts.append(bytes(self._buffer[:count]))
            self._size += count
            del self._buffer[:count]
            self._literal_remaining -= count
            self._scanned = 0
        return self._literal_remaining == 0

    # -- refusing and skipping ----------------------------------------------
    def _refuse(self, error: ImapError, last_line: bytes) -> NoReturn:
        """Abandon the command after ``last_line``; skip what the client will still send."""
        match = _COMMAND_NAME.match(self._parts[0] if self._parts else last_line)
        if match is not None:
            error.verb = match.group(2).decode("ascii", "replace").upper()[:32]
        marker = _literal_marker(last_line)
        self._reset()
        if marker is not None and not marker.synchronising and not error.fatal:
            # RFC 7888 4: a LITERAL+ literal is on its way; read and drop it, then the rest.
            self._skipping = True
            self._skip_remaining = marker.size or 0
        raise error

    def _start_skipping(self, tail: bytes) -> None:
        self._reset()
        self._skipping = True
        self._skip_tail = tail

    def _skip_some(self) -> bool:
        """Drop bytes of a refused command; True once its end has been reached."""
        if self._skip_remaining:
            count = min(self._skip_remaining, len(self._buffer))
            del self._buffer[:count]
            self._skip_remaining -= count
            # After the literal the command goes on: the loop keeps skipping its next line.
            return self._skip_remaining == 0
        return self._skip_line()

    def _skip_line(self) -> bool:
        index = self._buffer.find(CRLF)
        if index < 0:
            keep = bytes(self._buffer[-_MARKER_TAIL:])
            self._skip_tail = (self._skip_tail + keep)[-_MARKER_TAIL:]
            self._buffer.clear()
            return False
        tail = (self._skip_tail + bytes(self._buffer[:index]))[-_MARKER_TAIL:]
        del self._buffer[:index + 2]
        self._skip_tail = b""
        marker = _literal_marker(tail)
        if marker is not None and not marker.synchronising:
            if marker.size is None or marker.size > self.limits.max_skip_size:
                self._skipping = False
                raise BadCommand("Literal too large to skip", fatal=True, policy="too-big")
            self._skip_remaining = marker.size
            return True
        self._skipping = False
        self._scanned = 0
        return True

    def _reset(self) -> None:
        self._parts = []
        self._size = 0
        self._literals = 0
        self._literal_remaining = 0
        self._tag = None
        self._skip_remaining = 0


class ClientDisconnected(Exception):
    """The client closed the connection (EOF), possibly in the middle of a command."""


# Writes "+ ..." for the request, or raises an ImapError to refuse the literal before it is sent.
SendContinuation = Callable[[ContinuationRequest], Awaitable[None]]


class CommandReader:
    """Drives a ``CommandAssembler`` from an ``asyncio.StreamReader``."""

    def __init__(self, stream: asyncio.StreamReader, limits: ReaderLimits | None = None,
                 chunk_size: int = 64 * 1024) -> None:
        self.stream = stream
        self.assembler = CommandAssembler(limits)
        self.chunk_size = chunk_size

    async def read_command(self, send_continuation: SendContinuation) -> RawCommand:
        """Read one full command, calling ``send_continuation`` before each synchronising literal."""
        while True:
            event = self.assembler.next_event()
            if isinstance(event, RawCommand):
                return event
            if isinstance(event, ContinuationRequest):
                await self._continue_or_refuse(event, send_continuation)
                continue
            await self._fill()

    async def _continue_or_refuse(self, request: ContinuationRequest,
                                  send_continuation: SendContinuation) -> None:
        """``send_continuation`` writes "+" or raises an ``ImapError`` to refuse the literal."""
        try:
            await send_continuation(request)
        except ImapError as error:
            self.assembler.abandon_command()
            if error.tag is None:
                error.tag = request.tag
            raise

    async def read_line(self) -> bytes:
        """One line without its CRLF (IDLE ``DONE``, RFC 2177; AUTHENTICATE responses, RFC 3501 6.2.2)."""
        while True:
            line = self.assembler.next_line()
            if line is not None:
                return line
            await self._fill()

    async def _fill(self) -> None:
        data = await self.stream.read(self.chunk_size)
        if not data:
            raise ClientDisconnected("connection closed by the client")
        self.assembler.feed(data)


async def read_command(reader: CommandReader, send_continuation: SendContinuation) -> RawCommand:
    """Functional spelling of ``reader.read_command`` for callers that prefer it."""
    return await reader.read_command(send_continuation)

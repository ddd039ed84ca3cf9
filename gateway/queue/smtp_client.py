"""The outbound worker's SMTP client: just enough RFC 5321 to stream a spooled message to another operator.

Replies are read whole (RFC 5321 4.2.1 multi-line) with their enhanced code
(RFC 3463) when the peer sent one; EHLO's keywords are kept (RFC 5321 4.1.1.1);
STARTTLS (RFC 3207) forgets what was said before it; DATA is dot-stuffed and
its line ends made CRLF (``DotStuffer``, RFC 5321 4.5.2, 2.3.8). Which hosts,
which TLS policy and what to send are the worker's (gateway.queue.outbound).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

MAX_REPLY_LINES = 100
MAX_LINE = 4096
ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


@dataclass(frozen=True)
class PeerReply:
    """A reply read from the peer (RFC 5321 4.2), with its enhanced code when it sent one (RFC 3463)."""

    code: int
    enhanced: str | None
    text: str

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}".strip()


class HopFailure(Exception):
    """This address or host cannot take the message now; try the next one (RFC 5321 5.1)."""

    def __init__(self, text: str, *, enhanced: str = "4.4.1", reply: PeerReply | None = None,
                 tls_version: str | None = None) -> None:
        super().__init__(text)
        self.enhanced = enhanced
        self.reply = reply
        self.tls_version = tls_version


class SmtpClient:
    """Just enough RFC 5321 client over asyncio streams to stream a spooled message."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, command_timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = command_timeout
        self.extensions: dict[str, str] = {}

    @classmethod
    async def connect(cls, ip: str, port: int, *, connect_timeout: float, command_timeout: float) -> "SmtpClient":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port, limit=MAX_LINE * 4), connect_timeout)
        return cls(reader, writer, command_timeout=command_timeout)

    async def read_reply(self) -> PeerReply:
        """One reply, multi-line or not (RFC 5321 4.2.1: ``code-`` continues, ``code `` ends)."""
        lines: list[str] = []
        while len(lines) < MAX_REPLY_LINES:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw:
                raise ConnectionError("the peer closed the connection")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not (line[:3].isascii() and line[:3].isdigit()):
                raise ConnectionError(f"not an SMTP reply: {line[:200]!r}")
            lines.append(line)
            if len(line) == 3 or line[3] != "-":
                return _parse_reply(lines)
        raise ConnectionError("reply too long")

    async def command(self, line: str) -> PeerReply:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        return await self.read_reply()

    async def ehlo(self, hostname: str) -> PeerReply:
        reply = await self.command(f"EHLO {hostname}")
        if reply.code == 250:
            self.extensions = _extensions(reply.text.split("\n")[1:])
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """RFC 3207 4: after 220, the TLS handshake; what was said before is forgotten."""
        await asyncio.wait_for(self.writer.start_tls(context, server_hostname=server_hostname), self.timeout)
        self.extensions = {}

    @property
    def tls_version(self) -> str | None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    async def send_data(self, chunks: AsyncIterator[bytes]) -> PeerReply:
        """The message after 354: dot-stuffed (RFC 5321 4.5.2), CRLF line ends, then ``.``."""
        stuffer = DotStuffer()
        async for chunk in chunks:
            self.writer.write(stuffer.feed(chunk))
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        self.writer.write(stuffer.end())
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        return await self.read_reply()

    async def close(self) -> None:
        try:
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self.writer.drain(), 5)
                await asyncio.wait_for(self.reader.readline(), 5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass


def _parse_reply(lines: list[str]) -> PeerReply:
    code = int(lines[-1][:3])
    texts = [line[4:] for line in lines]
    enhanced = None
    first = ENHANCED_RE.match(texts[0])
    if first and first.group(1) == str(code)[0]:           # RFC 3463 2: its class matches the reply's
        enhanced = f"{first.group(1)}.{first.group(2)}.{first.group(3)}"
        texts = [ENHANCED_RE.sub("", text, count=1) for text in texts]
    return PeerReply(code, enhanced, "\n".join(texts))


def _extensions(lines: Sequence[str]) -> dict[str, str]:
    """EHLO keywords (RFC 5321 4.1.1.1) with their parameters, e.g. {"SIZE": "26214400", "DSN": ""}."""
    found: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            found[keyword.upper()] = params.strip()
    return found


class DotStuffer:
    """RFC 5321 4.5.2: a line starting with "." gets another; RFC 5321 2.3.8: a bare LF or a bare CR
    becomes CRLF (peers refuse bare ones, as we do: SMTP smuggling); the message ends with CRLF.CRLF."""

    def __init__(self) -> None:
        self.at_line_start = True
        self.previous_cr = False          # the last chunk ended with CR: its LF may open the next chunk

    def feed(self, chunk: bytes) -> bytes:
        out = bytearray()
        for line in chunk.splitlines(keepends=True):      # a chunk may end inside a line, or between CR and LF
            if self.previous_cr:
                self.previous_cr = False
                out += b"\n"                              # the CR's LF: its own, or added to a bare CR
                self.at_line_start = True
                if line.startswith(b"\n"):
                    line = line[1:]
                    if not line:
                        continue
            if self.at_line_start and line.startswith(b"."):
                out += b"."
            if line.endswith(b"\r"):
                out += line                                # CRLF completed by the next line or chunk
                self.previous_cr, self.at_line_start = True, False
                continue
            if not line.endswith(b"\r\n") and line.endswith(b"\n"):
                line = line[:-1] + b"\r\n"
            out += line
            self.at_line_start = line.endswith(b"\n")
        return bytes(out)

    def end(self) -> bytes:
        if self.previous_cr:
            return b"\n.\r\n"
        return b".\r\n" if self.at_line_start else b"\r\n.\r\n"

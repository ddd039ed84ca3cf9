"""RFC 5321 4.5.3.2: an idle connection is told 421 and closed; every command starts the idle time again.

The server keeps one timer per connection and moves its deadline at each command (``GatewaySMTP._reset_timeout``):
a connection that keeps sending commands past the first deadline stays open, and one that then falls silent is
closed with the 421 once the timeout has passed since its last command. Served here by a bare ``GatewaySMTP``
with a timeout of a fraction of a second (the setting's floor is 30 s)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.smtp.server import GatewaySMTP, ListenerKind, ProtocolLimits

IDLE_SECONDS = 1.0


class _OpenHandler:
    """Only what a connection that sends NOOPs asks of the handler."""

    token_auth_available = False

    async def connection_opened(self, server: GatewaySMTP, session: Any) -> None:
        return None

    def connection_closed(self, server: GatewaySMTP) -> None:
        return None

    async def command_refused(self, session: Any, reply: Any, detail: str | None) -> None:
        return None

    async def command_failed(self, session: Any, command: str, error: BaseException) -> None:
        return None


async def _serve() -> asyncio.Server:
    limits = ProtocolLimits(max_message_size=1 << 20, max_line_length=998, max_auth_failures=3,
                            timeout_seconds=IDLE_SECONDS)
    return await asyncio.get_running_loop().create_server(
        lambda: GatewaySMTP(_OpenHandler(), kind=ListenerKind.SUBMISSION, hostname="mx.test",  # type: ignore[arg-type]
                            tls_context=None, limits=limits, disabled_extensions=frozenset()),
        "127.0.0.1", 0)


async def test_commands_keep_a_connection_open_past_the_first_deadline_and_silence_closes_it() -> None:
    server = await _serve()
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        for _ in range(25):                              # two and a half idle timeouts of activity
            await asyncio.sleep(IDLE_SECONDS / 10)
            writer.write(b"NOOP\r\n")
            assert (await reader.readline()).startswith(b"250"), "closed although commands kept coming"
        # Silent now: the 421 comes, then the end of the connection.
        last = await asyncio.wait_for(reader.readline(), 30)
        assert last.startswith(b"421 "), last
        assert await asyncio.wait_for(reader.read(), 30) == b""
    finally:
        writer.close()
        server.close()
        await server.wait_closed()

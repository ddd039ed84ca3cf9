"""Queued work announced to the nodes that deliver it (PostgreSQL LISTEN/NOTIFY).

A node started without workers (``gateway serve --only smtp,imap``) accepts mail but delivers none: without
a word, the nodes with workers would find it only at their next look for due work (``smtp.local_retry_seconds``,
at most 30 s). Such a node announces each queue id it committed on the channel ``gateway_queue``; every node
whose workers run listens and schedules it at once, and the claim (``QueueStore.claim_local_work``) decides
which one delivers. A lost announcement costs only that delay: the rows are the truth, the retry loop finds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "gateway_queue"


class QueueAnnouncer:
    """A node without workers: ``announce(queue_id)`` after each commit (what ``schedule`` would have done)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._connection: Any = None
        self._sender: asyncio.Task[None] | None = None

    def announce(self, queue_id: str) -> None:
        self._outbox.put_nowait(queue_id)

    async def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop(), name="queue-announcer")

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._connection is not None and not self._connection.is_closed():
            await self._connection.close()

    async def _send_loop(self) -> None:
        import asyncpg

        while True:
            queue_id = await self._outbox.get()
            try:
                if self._connection is None or self._connection.is_closed():
                    self._connection = await asyncpg.connect(self.dsn)
                await self._connection.execute("SELECT pg_notify($1, $2)", CHANNEL, queue_id)
            except Exception:  # noqa: BLE001  (the retry loop of the delivering nodes finds it anyway)
                log.warning("could not announce queued message %s to the delivering nodes", queue_id, exc_info=True)


class QueueListener:
    """A node with workers: each announced queue id is handed to ``schedule`` (local delivery)."""

    def __init__(self, dsn: str, schedule: Callable[[str], None]) -> None:
        self.dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.schedule = schedule
        self._connection: Any = None

    async def start(self) -> None:
        import asyncpg

        self._connection = await asyncpg.connect(self.dsn)
        await self._connection.add_listener(CHANNEL, self._received)

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def _received(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        if 0 < len(payload) <= 32 and payload.isalnum():       # a queue id; anything else is not ours
            self.schedule(payload)
        else:
            log.warning("ignored a malformed queue announcement: %r", payload[:100])

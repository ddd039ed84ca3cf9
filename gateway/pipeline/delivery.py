"""Deliver step for our own mailboxes, and the recovery pass that makes it exactly-once.

Each local recipient is handed to the mail store with the delivery key
``<queue id>:<recipient row id>``; the store ignores a key it has already
stored for that mailbox, so delivering again after a crash (the row still
``pending`` because the crash came between the store's commit and ours) is a
no-op. At start, ``recover`` drops half-received files, removes spool files
that were never acknowledged, and schedules every acknowledged message that
still has open local recipients.

Remote recipients stay ``pending`` for the outbound queue worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from gateway.errors import UserError
from gateway.pipeline.queue import LocalWork, QueueStore
from gateway.pipeline.spool import Spool
from gateway.pipeline.trace import without_forged_results
from gateway.storage.models import utcnow

log = logging.getLogger("gateway.delivery")
CHUNK = 256 * 1024


class LocalStore(Protocol):
    """The mail store's delivery entry point (gateway.mailstore)."""

    async def deliver(self, mailbox_id: int, message: BinaryIO, *, delivery_key: str, folder: str = "INBOX") -> Any: ...


class DeliveryStream(io.RawIOBase):
    """The delivered bytes, read in chunks: our trace fields, then the spooled message with forged
    Authentication-Results removed. Never holds more than one chunk of the body."""

    def __init__(self, trace_headers: bytes, message: BinaryIO, authserv_id: str) -> None:
        super().__init__()
        self._file = message                                  # the spool's plaintext reader (sealed at rest)
        self._pending = bytearray(trace_headers)
        self._lines: Iterator[bytes] | None = without_forged_results(self._header_lines(), authserv_id)

    def _header_lines(self) -> Iterator[bytes]:
        for line in self._file:
            yield line
            if line in (b"\r\n", b"\n"):
                return

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while len(self._pending) < len(buffer):
            more = self._next_piece()
            if not more:
                break
            self._pending += more
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        del self._pending[:count]
        return count

    def _next_piece(self) -> bytes:
        if self._lines is not None:
            line = next(self._lines, None)
            if line is not None:
                return line
            self._lines = None
        return self._file.read(CHUNK)

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass
class RecoveryReport:
    half_received_removed: int = 0
    unacknowledged_removed: int = 0
    finished_removed: int = 0
    scheduled: int = 0


class LocalDelivery:
    def __init__(self, queue: QueueStore, spool: Spool, store: LocalStore | None, *, authserv_id: str,
                 workers: int = 4, retry_seconds: int = 60) -> None:
        self.queue = queue
        self.spool = spool
        self.store = store
        self.authserv_id = authserv_id
        self.worker_count = workers
        self.retry = dt.timedelta(seconds=retry_seconds)
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._scheduled: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> RecoveryReport:
        """Recover, then deliver. Without a store (an accept-only node), local recipients stay
        pending in the queue for a node that has one."""
        if self.store is None:
            return RecoveryReport(half_received_removed=self.spool.clear_incoming())
        report = await self.recover()
        self._tasks = [asyncio.create_task(self._worker(), name=f"local-delivery-{n}") for n in range(self.worker_count)]
        self._tasks.append(asyncio.create_task(self._retry_loop(), name="local-delivery-retry"))
        return report

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def schedule(self, queue_id: str) -> None:
        if self.store is not None and queue_id not in self._scheduled:
            self._scheduled.add(queue_id)
            self._idle.clear()
            self._pending.put_nowait(queue_id)

    async def wait_idle(self) -> None:
        """Until nothing is scheduled or running (for tests and benchmarks)."""
        await self._idle.wait()

    async def recover(self) -> RecoveryReport:
        """Start-up pass: see the module docstring. Safe to run at any time."""
        report = RecoveryReport(half_received_removed=self.spool.clear_incoming())
        on_disk = sorted(self.spool.queued_ids())
        known = await self.queue.known_ids(on_disk)
        for queue_id in set(on_disk) - known:                  # durable file, rows never committed: no 250 was sent
            self.spool.remove(queue_id)
            report.unacknowledged_removed += 1
        for queue_id in await self.queue.done_ids(sorted(known)):
            self.spool.remove(queue_id)
            report.finished_removed += 1
        for queue_id in sorted(await self.queue.queued_message_ids()):
            if await self.queue.local_work(queue_id, limit=1):
                self.schedule(queue_id)
                report.scheduled += 1
        if any(vars(report).values()):
            log.info("recovery: %s", report)
        return report

    # ----------------------------------------------------------------- work

    async def _worker(self) -> None:
        while True:
            queue_id = await self._pending.get()
            self._busy += 1
            try:
                await self.deliver_message(queue_id)
            except Exception:
                log.exception("local delivery of %s failed; it stays queued", queue_id)
            finally:
                self._scheduled.discard(queue_id)
                self._busy -= 1
                if not self._scheduled and self._busy == 0:
                    self._idle.set()

    async def _retry_loop(self) -> None:
        """Deferred recipients come back when their time is due."""
        while True:
            await asyncio.sleep(min(self.retry.total_seconds(), 30))
            for work in await self.queue.local_work(limit=1000):
                self.schedule(work.queue_id)

    async def deliver_message(self, queue_id: str) -> None:
        works = await self.queue.local_work(queue_id)
        finished = [await self._deliver_one(work) for work in works]
        if any(finished) or (not works and await self.queue.finish_if_done(queue_id)):
            self.spool.remove(queue_id)                         # the store holds its own copy now

    async def _deliver_one(self, work: LocalWork) -> bool:
        """Deliver to one recipient; True when that finished the whole message."""
        assert self.store is not None
        stream = io.BufferedReader(DeliveryStream(work.trace_headers.encode("utf-8"), self.spool.open_read(work.queue_id),
                                                  self.authserv_id), CHUNK)
        try:
            await self.store.deliver(work.mailbox_id, stream, delivery_key=f"{work.queue_id}:{work.recipient_id}")
        except UserError as exc:                                 # the store's refusals: QuotaExceeded, StoreBusy...
            await self.queue.mark_deferred(work.recipient_id, str(exc), utcnow() + self.retry)
            log.info("deferred %s to %s: %s", work.queue_id, work.address, exc)
            return False
        except Exception as exc:
            await self.queue.mark_deferred(work.recipient_id, f"{type(exc).__name__}: {exc}", utcnow() + self.retry)
            log.exception("delivery of %s to %s failed; deferred", work.queue_id, work.address)
            return False
        finally:
            stream.close()
        return await self.queue.mark_delivered(work.recipient_id, work.queue_id)

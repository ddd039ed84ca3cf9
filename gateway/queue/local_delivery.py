"""Deliver step for our own mailboxes, and the recovery pass that makes it exactly-once.

Each local recipient is handed to the mail store with the delivery key
``<queue id>:<recipient row id>``; the store ignores a key it has already
stored for that mailbox, so delivering again after a crash (the row still
``pending`` because the crash came between the store's commit and ours) is a
no-op. At start, ``recover`` drops half-received files, removes spool files
that were never acknowledged, and schedules every acknowledged message that
still has open local recipients.

Delivery ends (RFC 5321 4.5.4.1): before each attempt the recipient is routed
again, so a mailbox deleted, disabled or closed since acceptance fails at once;
a temporary failure (over quota, store busy) is retried every
``local_retry_seconds`` until ``local_queue_lifetime_hours`` after arrival, then
fails (gateway.queue.local_failures). A failed recipient is reported to the
sender by an RFC 3464 DSN, as NOTIFY asks (RFC 3461 4.1) and never for a null
reverse-path (RFC 3461 5.2.1), queued in the transaction that records the failure.

One transaction per delivery (RFC 5321 4.5.4.1 aside, what makes it fast): the
spooled message is read and decrypted once for all its local recipients, its
header fields parsed once, and each recipient's mail store transaction also
records the queue row ``delivered`` (and the message ``done`` with its last
recipient) and the filing job of the delivery (``follow_up``); on SQLite the
recipients of a message, and of messages delivered at the same time, share one
commit (the mail store's group commit). The spool file of a finished message is unlinked in the
database thread right after that commit (``Database.after_commit``): no thread hop of its own.

Hand-over from acceptance (``schedule(queue_id, ready=...)``, SQLite): a message just committed comes
with its recipient rows as committed and its plaintext, still in memory, so its delivery neither reads
the queue rows nor reads and decrypts its spool file again. The spool file and the rows stay the truth
(a restart, a retry or another node reads them); each delivery transaction checks first that its
recipient is still pending (``RecipientClosed``: the queue's admin commands may have ended it meanwhile)
before it writes anything.

Back-pressure (``wait_for_room``): when ``local_backlog_limit`` messages are
waiting for or in local delivery, an accepting session waits, before its
message is made durable, until one is delivered (as Postfix's ``in_flow_delay``
slows smtpd down when its queue manager falls behind), so acceptance runs at
the delivery rate and the time from DATA to the mailbox stays bounded instead
of growing for the whole run. A session still waiting after
``local_backlog_wait_seconds`` is answered 451 4.3.2 (RFC 3463 3.4: not
accepting messages, excessive load) and keeps its copy: nothing was queued.

Remote recipients stay ``pending`` for the outbound queue worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from sqlalchemy.engine import Connection

from gateway.directory.generation import AnswerCache
from gateway.directory.service import LocalRoute, RefusedRoute, Route
from gateway.errors import UserError
from gateway.mailstore.errors import MailStoreError
from gateway.mailstore.group_commit import SyncGroupCommit
from gateway.mailstore.headers import MAX_HEADER_BYTES, CachedHeaders, header_section, parse_headers
from gateway.ops.metrics import LOCAL_DELIVERIES
from gateway.queue.dsn import Action, RecipientReport, wants_report
from gateway.queue.generated import PreparedMail
from gateway.queue.local_failures import (
    BACKLOG_FULL,
    LocalFailure,
    mailbox_gone,
    refused_route,
    store_error,
)
from gateway.queue.outbound_store import MessageWork
from gateway.queue.spool import Spool
from gateway.queue.store import LocalWork, QueueStore, delivery_key
from gateway.mail.codes import MailRefusal
from gateway.storage.db import after_commit
from gateway.storage.models import utcnow

log = logging.getLogger("gateway.delivery")
CHUNK = 256 * 1024
IN_MEMORY = 4 * 1024 * 1024          # messages up to this size are read once for all their recipients
# Rows committed with a delivery, in its transaction: synchronous, in the mail store's database thread.
AfterDelivery = Callable[[Connection, "int | None"], None]
# A check run first in the delivery's transaction, before any row; raises a MailStoreError to refuse.
BeforeDelivery = Callable[[Connection], None]
READY_PLAINTEXT_BYTES = 64 * 1024 * 1024   # at most this much handed-over plaintext held (the rest: from the spool)
INLINE_CONTENT_BYTES = 64 * 1024     # a handed-over message up to this size is prepared in the event loop


class RecipientClosed(MailStoreError):
    """Raised in the delivery transaction, before any row: the recipient is no longer pending or deferred
    (an administrator deleted or failed it since the hand-over): nothing to deliver."""


@dataclass(frozen=True)
class ReadyMessage:
    """A message handed over by acceptance right after its commit (see the module docstring)."""

    works: list[LocalWork]            # its local recipients, as committed (pending)
    plaintext: bytes | None           # the spooled message's plaintext; None: read it from the spool
    in_row: bool = False              # kept in its queue row (gateway.queue.spool): no spool file to unlink


class Delivered(Protocol):
    @property
    def duplicate(self) -> bool:
        """The delivery key had already reached the mailbox: nothing was written."""
        ...


class LocalStore(Protocol):
    """The mail store's delivery entry point (gateway.mailstore.delivery.LocalDelivery)."""

    @property
    def shares_commits(self) -> bool:
        """Concurrent deliveries share one transaction (SQLite group commit), committed in arrival order."""
        ...

    async def deliver(self, mailbox_id: int, message: bytes | BinaryIO, *, delivery_key: str, folder: str = "INBOX",
                      headers: CachedHeaders | None = None, after: AfterDelivery | None = None,
                      before: BeforeDelivery | None = None, filing_due: bool = True) -> Delivered: ...


class FollowUpRows(Protocol):
    def add_in(self, connection: Connection, delivery_id: int) -> None: ...

    @property
    def examined(self) -> bool:
        """Ended at delivery (not for filing): nothing for the filing worker to do, no need to wake it."""
        ...


class DeliveryFollowUp(Protocol):
    """Rows committed with each delivery: the filing job (gateway.dmp_bridge.intake.FilingIntake)."""

    async def prepare(self, *, delivery_key: str, mailbox_id: int, mailbox_type: str | None, recipient: str,
                      sender: str, headers: CachedHeaders | None) -> FollowUpRows: ...


class RouteLookup(Protocol):
    """Where an address routes now (gateway.directory.DirectoryService)."""

    async def route_recipient(self, address: str) -> Route: ...


class FailureReports(Protocol):
    """Failure DSNs through the generated-mail queue (gateway.queue.outbound.DsnReports)."""

    async def prepare(self, message: MessageWork, reports: Sequence[RecipientReport]) -> PreparedMail | None: ...

    def discard(self, prepared: PreparedMail) -> None: ...

    def dispatch(self, prepared: PreparedMail) -> None: ...


def without_forged_results(lines: Iterable[bytes], authserv_id: str) -> Iterator[bytes]:
    """Pass a message's lines through, dropping header fields ``Authentication-Results: <authserv_id>``
    (with their continuation lines) from the header section only (RFC 8601 5)."""
    marker = authserv_id.lower().encode()
    in_header = True
    dropping = False
    for line in lines:
        if in_header:
            if line in (b"\r\n", b"\n"):
                in_header = False
            elif line[:1] in (b" ", b"\t"):
                if dropping:
                    continue
            else:
                name, _, value = line.partition(b":")
                dropping = name.strip().lower() == b"authentication-results" and \
                    value.strip().lower().split(b";", 1)[0].strip() == marker
                if dropping:
                    continue
        yield line


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


def _header_lines_end(message: bytes) -> int:
    """Where the lines ``DeliveryStream`` treats as header lines end at the latest: after the first empty line
    (a line that is only CRLF or LF), or the end of a message without one."""
    if message[:1] == b"\n" or message[:2] == b"\r\n":
        return 2
    ends = [found + length for found, length in ((message.find(b"\n\r\n"), 3), (message.find(b"\n\n"), 2))
            if found >= 0]
    return min(ends) if ends else len(message)


def delivered_bytes(trace_headers: bytes, message: bytes, authserv_id: str) -> bytes:
    """What ``DeliveryStream`` reads for a message held in memory, in one piece: our trace fields, then the
    message without its forged ``Authentication-Results: <authserv_id>`` fields (RFC 8601 5). A header
    section that names no Authentication-Results field at all (nearly every message) is passed as it is,
    without the line-by-line copy; one that does goes through the stream."""
    if b"authentication-results" not in message[:_header_lines_end(message)].lower():
        return trace_headers + message
    with io.BufferedReader(DeliveryStream(trace_headers, io.BytesIO(message), authserv_id), CHUNK) as stream:
        return stream.read()


@dataclass(frozen=True)
class _Content:
    """A message as delivered (trace fields first), read once for all its local recipients."""

    data: bytes
    headers: CachedHeaders


class _Settler:
    """Futures of the event loop settled from a database thread, many per wake-up of the loop: the spool
    files of a group commit's messages are unlinked one after the other after that commit, and each used to
    wake the loop on its own (a write to its self-pipe, a thread switch)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[asyncio.Future[None]] = []

    def settle(self, future: asyncio.Future[None]) -> None:
        """From any thread: ``future`` done soon; the loop is woken only by the first of a run."""
        with self._lock:
            self._ready.append(future)
            first = len(self._ready) == 1
        if first:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future in ready:
            _settle_once(future)


class _Ending:
    """A message's spool file, unlinked in the database thread after the commit that finished the message
    (``after_commit``); ``wait`` returns once it is gone."""

    def __init__(self, queue_id: str, settler: _Settler) -> None:
        self.queue_id = queue_id
        self.registered = False          # the finishing transaction will unlink it once committed
        self._settler = settler
        self._gone = settler.loop.create_future()

    def register(self, connection: Connection, spool: Spool) -> bool:
        """False outside ``run_in_transaction`` (a test's store): the caller unlinks."""
        settler, gone = self._settler, self._gone

        def unlink() -> None:
            try:
                spool.remove(self.queue_id)
            finally:
                settler.settle(gone)
        return after_commit(connection, unlink)

    async def wait(self) -> None:
        await self._gone


def _settle_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _still_open(connection: Connection, work: LocalWork) -> None:
    """First in a handed-over delivery's transaction (before any row): the recipient is still to deliver."""
    if not QueueStore.is_open_in(connection, work.recipient_id):
        raise RecipientClosed(f"recipient {work.recipient_id} of {work.queue_id} is no longer pending")


def _queued_rows_in(connection: Connection, spool: Spool, queue_id: str) -> tuple[list[LocalWork], bytes | None]:
    """A message's due local recipients and, when it is kept in its row, its sealed content (None: a file)."""
    works = QueueStore.local_work_in(connection, queue_id)
    return works, spool.row_content_in(connection, queue_id, size=works[0].size) if works else None


@dataclass
class RecoveryReport:
    half_received_removed: int = 0
    unacknowledged_removed: int = 0
    finished_removed: int = 0
    scheduled: int = 0


class LocalDeliveryWorker:
    """Spool -> mail store for our own mailboxes: the recovery pass, the delivery workers, the retry loop."""

    def __init__(self, queue: QueueStore, spool: Spool, store: LocalStore | None, *, authserv_id: str,
                 workers: int = 4, retry_seconds: int = 60, lifetime_hours: float = 48.0,
                 directory: RouteLookup | None = None, reports: FailureReports | None = None,
                 follow_up: DeliveryFollowUp | None = None, backlog_limit: int = 0,
                 backlog_wait_seconds: float = 60.0, answers: AnswerCache | None = None,
                 claim_lease_seconds: int = 120) -> None:
        self.queue = queue
        self.spool = spool
        self.store = store
        self.authserv_id = authserv_id
        self.worker_count = workers
        self.retry = dt.timedelta(seconds=retry_seconds)
        self.lifetime_hours = lifetime_hours
        self.lifetime = dt.timedelta(hours=lifetime_hours)
        self.directory = directory            # None: the route is not checked again before delivery
        self.answers = answers                # None: every delivery asks the directory
        self.reports = reports                # None: failures are recorded without a DSN
        self.follow_up = follow_up            # None: the filing worker finds the delivery by itself
        self.backlog_limit = backlog_limit    # 0: acceptance never waits for delivery
        self.backlog_wait = backlog_wait_seconds
        self.claim_lease = dt.timedelta(seconds=claim_lease_seconds)   # another node takes over after it
        self._room = asyncio.Event()          # set while fewer than backlog_limit messages are scheduled
        self._room.set()
        self._pending: asyncio.Queue[str] = asyncio.Queue()
        self._scheduled: set[str] = set()
        self._ready: dict[str, ReadyMessage] = {}     # handed over by acceptance, until delivered
        self._ready_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0
        self._settler: _Settler | None = None   # spool files unlinked after a commit: one loop wake-up a run
        # SQLite: the queue rows of messages not handed over, read for every message waiting at the time in one
        # transaction (a batch that fails is read again one message at a time): (its loop, the batcher).
        self._reads: tuple[asyncio.AbstractEventLoop, SyncGroupCommit] | None = None
        self.delivers_here = True             # False: another node delivers (``gateway serve --only`` without workers)
        self.elsewhere: Callable[[str], None] | None = None   # then: tell the delivering nodes (queue/wake.py)
        # Told each time the backlog fills (False) or has room again (True): the SMTP acceptor processes,
        # whose sessions wait as this process's would (gateway.smtp.acceptors).
        self.room_listeners: list[Callable[[bool], None]] = []

    def _settler_of_loop(self) -> _Settler:
        loop = asyncio.get_running_loop()
        if self._settler is None or self._settler.loop is not loop:
            self._settler = _Settler(loop)
        return self._settler

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

    def schedule(self, queue_id: str, ready: ReadyMessage | None = None) -> None:
        """Deliver ``queue_id`` here soon; a node whose workers do not run leaves it to one whose do.
        ``ready``: acceptance's hand-over of the message it just committed (see the module docstring)."""
        if not self.delivers_here:
            if self.elsewhere is not None:
                self.elsewhere(queue_id)
            return
        if self.store is not None and queue_id not in self._scheduled:
            self._scheduled.add(queue_id)
            if ready is not None and self.queue.db.is_sqlite:
                self._hold(queue_id, ready)
            self._idle.clear()
            if self.backlog_limit and len(self._scheduled) >= self.backlog_limit and self._room.is_set():
                self._room.clear()
                self._tell_room(False)
            self._pending.put_nowait(queue_id)

    @property
    def backlog(self) -> int:
        """Messages waiting for, or in, local delivery."""
        return len(self._scheduled)

    @property
    def has_room(self) -> bool:
        """Fewer than ``backlog_limit`` messages wait for local delivery (always, without a limit)."""
        return self._room.is_set()

    async def wait_for_room(self) -> None:
        """Back-pressure for acceptance (see the module docstring): return once fewer than
        ``backlog_limit`` messages wait for local delivery; 451 4.3.2 after ``backlog_wait_seconds``."""
        if self.store is None or not self.backlog_limit or self._room.is_set():
            return
        try:
            await asyncio.wait_for(self._room.wait(), self.backlog_wait)
        except TimeoutError:
            log.warning("local delivery backlog at %d messages for %gs: refusing a message for now",
                        self.backlog, self.backlog_wait)
            raise MailRefusal(BACKLOG_FULL) from None

    def room_elsewhere(self, has_room: bool) -> None:
        """An SMTP acceptor process (which delivers nothing itself): the main process's backlog is full (False)
        or has room again (True); ``wait_for_room`` waits on it as on this process's own."""
        log.debug("the main process's local delivery backlog %s", "has room" if has_room else "is full")
        if has_room:
            self._room.set()
        else:
            self._room.clear()

    def _tell_room(self, has_room: bool) -> None:
        for listener in self.room_listeners:
            listener(has_room)

    def _hold(self, queue_id: str, ready: ReadyMessage) -> None:
        size = len(ready.plaintext) if ready.plaintext is not None else 0
        if self._ready_bytes + size > READY_PLAINTEXT_BYTES:
            ready = ReadyMessage(ready.works, None, in_row=ready.in_row)   # delivery reads this one from the spool
        else:
            self._ready_bytes += size
        self._ready[queue_id] = ready

    def _take_ready(self, queue_id: str) -> ReadyMessage | None:
        ready = self._ready.pop(queue_id, None)
        if ready is not None and ready.plaintext is not None:
            self._ready_bytes -= len(ready.plaintext)
        return ready

    def _done(self, queue_id: str) -> None:
        self._scheduled.discard(queue_id)
        self._take_ready(queue_id)
        if (len(self._scheduled) < self.backlog_limit or not self.backlog_limit) and not self._room.is_set():
            self._room.set()
            self._tell_room(True)
        if not self._scheduled and self._busy == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until nothing is scheduled or running (for tests and benchmarks)."""
        await self._idle.wait()

    async def recover(self) -> RecoveryReport:
        """Start-up pass: see the module docstring. Safe to run at any time."""
        report = RecoveryReport(half_received_removed=self.spool.clear_incoming())
        on_disk = sorted(self.spool.queued_ids())
        known = await self.queue.known_ids(on_disk)
        for queue_id in set(on_disk) - known:                  # durable file, rows never committed: no 250 was sent
            if self.spool.may_be_in_flight(queue_id):          # ... or not yet: another node's, being committed
                continue
            self.spool.remove(queue_id)
            report.unacknowledged_removed += 1
        for queue_id in await self.queue.done_ids(sorted(known)):
            self.spool.remove(queue_id)
            report.finished_removed += 1
        queued = sorted(await self.queue.queued_message_ids())
        due = await self.queue.with_local_work(queued) if queued else set()   # one read, not one per message
        for queue_id in queued:
            if queue_id in due:
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
                self._busy -= 1
                self._done(queue_id)

    async def _retry_loop(self) -> None:
        """Deferred recipients come back when their time is due."""
        while True:
            await asyncio.sleep(min(self.retry.total_seconds(), 30))
            for work in await self.queue.local_work(limit=1000):
                self.schedule(work.queue_id)

    async def deliver_message(self, queue_id: str) -> None:
        if self.answers is not None:
            await self.answers.refresh()      # routes checked against the directory as it is now
        ready = self._take_ready(queue_id)
        # Handed over (SQLite, one process): the rows just committed, each checked again in its delivery
        # transaction (``_still_open``); otherwise read (and on PostgreSQL claimed) from the queue.
        if ready is not None:
            works, plaintext = ready.works, ready.plaintext
        else:
            works, plaintext = await self._queued(queue_id)
        if not works:
            if await self.queue.finish_if_done(queue_id):
                self.spool.remove(queue_id)
            return
        # Read from the queue, a plaintext can only come from the message's row (``_queued``: None for a file).
        in_row = ready.in_row if ready is not None else plaintext is not None
        if plaintext is None and in_row:   # handed over without its plaintext (over the memory budget)
            plaintext = await self.spool.plaintext_in_row(queue_id)
        content = await self._content(works[0], plaintext)
        assert self.store is not None
        # A message kept in its row has no spool file: the commit that finishes it clears the row's content
        # (gateway.queue.store), and no unlink (a failed syscall, a loop wake-up) follows it.
        endings: list[_Ending] | None = None if in_row else []
        check = _still_open if ready is not None else None
        if self.store.shares_commits and len(works) > 1:
            # Every recipient's transaction joins the same group commit, run one after the other in order:
            # the last one sees the others' rows and finishes the message.
            outcomes = await asyncio.gather(*(self._deliver_one(work, content, endings, check) for work in works),
                                            return_exceptions=True)
            errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if errors:
                raise errors[0]
            finished = any(outcomes)
        else:
            finished = any([await self._deliver_one(work, content, endings, check) for work in works])
        if finished and endings:
            await endings[-1].wait()          # unlinked by the database thread after the finishing commit
        elif finished and not in_row:
            # The store holds its own copy now (a failure or a duplicate finished it: no commit hook ran).
            # Recovery never depends on it: a file whose message is done is removed, never delivered, by
            # ``recover``.
            await asyncio.to_thread(self.spool.remove, queue_id)

    async def _queued(self, queue_id: str) -> tuple[list[LocalWork], bytes | None]:
        """A message not handed over: its due local recipients (claimed, on PostgreSQL) and, when it is small
        enough to be in its queue row, its plaintext from there (None: in a file). On SQLite both are read
        in one transaction, one database thread hop."""
        if not self.queue.db.is_sqlite:
            works = await self.queue.claim_local_work(queue_id, self.claim_lease)
            if not works:
                return works, None
            return works, await self.spool.plaintext_in_row(queue_id, size=works[0].size)
        loop = asyncio.get_running_loop()
        if self._reads is None or self._reads[0] is not loop:
            self._reads = (loop, SyncGroupCommit(self.queue.db.run_in_transaction))
        spool = self.spool
        works, sealed = await self._reads[1].run(lambda c: _queued_rows_in(c, spool, queue_id))
        return works, None if sealed is None else self.spool.plaintext_of_row(sealed, queue_id)

    async def _content(self, work: LocalWork, plaintext: bytes | None) -> _Content | None:
        """The message as delivered, read once for all its recipients: from the handed-over plaintext (a
        small one right here: a thread hop costs more), else decrypted from the spool; None for a message
        too large to hold (each recipient then streams it)."""
        if work.size > IN_MEMORY:
            return None
        if plaintext is not None and len(plaintext) <= INLINE_CONTENT_BYTES:
            return self._read(work, plaintext)
        return await asyncio.to_thread(self._read, work, plaintext)

    def _read(self, work: LocalWork, plaintext: bytes | None = None) -> _Content:
        """The message as delivered (``plaintext``, or decrypted from the spool), its header fields parsed once."""
        if plaintext is None:
            with self.spool.open_read(work.queue_id) as spooled:
                plaintext = spooled.read()
        data = delivered_bytes(work.trace_headers.encode("utf-8"), plaintext, self.authserv_id)
        return _Content(data, parse_headers(header_section(data[:MAX_HEADER_BYTES])))

    def _stream(self, work: LocalWork, plaintext: bytes | None = None) -> io.BufferedReader:
        source = io.BytesIO(plaintext) if plaintext is not None else self.spool.open_read(work.queue_id)
        return io.BufferedReader(DeliveryStream(work.trace_headers.encode("utf-8"), source, self.authserv_id), CHUNK)

    async def _deliver_one(self, work: LocalWork, content: _Content | None, endings: list[_Ending] | None = None,
                           check: Callable[[Connection, LocalWork], None] | None = None) -> bool:
        """Deliver to one recipient, or record why not; True when that finished the whole message.
        ``endings``: when this delivery's commit finished the message, the spool file is unlinked right after
        it, in the database thread, and its ``_Ending`` appended here; ``check``: run first in the delivery
        transaction (``_still_open``)."""
        assert self.store is not None
        refusal = await self._route_refusal(work)
        if refusal is not None:
            return await self._fail(work, refusal)
        assert work.mailbox_id is not None
        key = delivery_key(work.queue_id, work.recipient_id)
        headers = content.headers if content is not None else None
        rows = None
        if self.follow_up is not None:
            rows = await self.follow_up.prepare(delivery_key=key, mailbox_id=work.mailbox_id,
                                                mailbox_type=work.mailbox_type, recipient=work.address,
                                                sender=work.sender, headers=headers)
        finished = False
        ending = _Ending(work.queue_id, self._settler_of_loop()) if endings is not None else None

        def after(connection: Connection, delivery_id: int | None) -> None:
            # Committed with the message, or not at all: a crash leaves both undone, and the retry delivers.
            nonlocal finished
            finished = self.queue.delivered_in(connection, work.recipient_id, work.queue_id)
            if rows is not None and delivery_id is not None:
                rows.add_in(connection, delivery_id)
            if ending is not None:            # this attempt's transaction (a retried one registers again)
                ending.registered = finished and ending.register(connection, self.spool)

        stream = self._stream(work) if content is None else None
        source: bytes | BinaryIO = content.data if content is not None else stream  # type: ignore[assignment]
        options: dict[str, Any] = {}                             # only what applies (a test's store takes neither)
        if check is not None:
            options["before"] = lambda connection: check(connection, work)
        if rows is not None and rows.examined:
            options["filing_due"] = False                        # the filing worker is not woken for it
        try:
            result = await self.store.deliver(work.mailbox_id, source, delivery_key=key, headers=headers, after=after,
                                              **options)
        except RecipientClosed:
            log.info("not delivering %s to %s: the recipient was closed meanwhile", work.queue_id, work.address)
            return False
        except Exception as exc:                                 # the store's refusals: QuotaExceeded, StoreBusy...
            if not isinstance(exc, UserError):
                log.exception("delivery of %s to %s failed", work.queue_id, work.address)
            return await self._failed_attempt(work, store_error(work.address, exc))
        finally:
            if stream is not None:
                stream.close()
        LOCAL_DELIVERIES.labels("delivered").inc()
        if result.duplicate:                                     # delivered before (by an older version, or a rerun)
            return await self.queue.mark_delivered(work.recipient_id, work.queue_id)
        if finished and ending is not None and endings is not None and ending.registered:
            endings.append(ending)
        return finished

    async def _route_refusal(self, work: LocalWork) -> LocalFailure | None:
        """The recipient's mailbox was deleted, disabled or closed since the message was accepted."""
        if work.mailbox_id is None:
            return mailbox_gone(work.address)
        if self.directory is None:
            return None
        route = await self._route(work.address)
        return refused_route(route) if isinstance(route, RefusedRoute) else None

    async def _route(self, address: str) -> Route:
        """The directory's route; a hosted mailbox's kept while the directory's generation stays the same
        (``answers``, refreshed before each message: a mailbox deleted, disabled or closed, or its patient's
        record closed, bumps it), any other answer asked afresh (trust windows depend on the clock)."""
        assert self.directory is not None
        if self.answers is None:
            return await self.directory.route_recipient(address)
        directory, fresh = self.directory, []

        async def hosted_only() -> Route | None:
            route = await directory.route_recipient(address)
            fresh.append(route)
            return route if isinstance(route, LocalRoute) else None

        cached = await self.answers.get("delivery-route", address, hosted_only)
        if cached is not None:
            return cached
        return fresh[0] if fresh else await self.directory.route_recipient(address)

    async def _failed_attempt(self, work: LocalWork, failure: LocalFailure) -> bool:
        """Defer a temporary failure until the queue lifetime, then fail it (RFC 5321 4.5.4.1)."""
        deadline = work.received_at + self.lifetime
        now = utcnow()
        if failure.permanent or now >= deadline:
            return await self._fail(work, failure.expired(self.lifetime_hours))
        await self.queue.mark_deferred(work.recipient_id, failure.diagnostic, min(now + self.retry, deadline))
        log.info("deferred %s to %s: %s", work.queue_id, work.address, failure.diagnostic)
        LOCAL_DELIVERIES.labels("deferred").inc()
        return False

    async def _fail(self, work: LocalWork, failure: LocalFailure) -> bool:
        """Record the final failure and queue the sender's DSN with it, in one transaction."""
        prepared = await self._failure_report(work, failure)
        try:
            finished = await self.queue.fail(work.recipient_id, work.queue_id, failure.diagnostic, prepared)
        except BaseException:
            if prepared is not None and self.reports is not None:
                self.reports.discard(prepared)
            raise
        if prepared is not None and self.reports is not None:
            self.reports.dispatch(prepared)
        log.warning("failed %s to %s: %s%s", work.queue_id, work.address, failure.diagnostic,
                    f" (DSN {prepared.queue_id})" if prepared is not None else "")
        LOCAL_DELIVERIES.labels("bounced").inc()
        return finished

    async def _failure_report(self, work: LocalWork, failure: LocalFailure) -> PreparedMail | None:
        """The RFC 3464 failure DSN, durably spooled; None when nobody is to be told (RFC 3461 4.1, 5.2.1)."""
        if self.reports is None:
            return None
        message = await self.queue.message(work.queue_id)
        recipient = next((r for r in await self.queue.recipients_of(work.queue_id) if r.id == work.recipient_id), None)
        if message is None or recipient is None or not message.sender or not wants_report(recipient.notify, Action.FAILED):
            return None
        report = RecipientReport(final_recipient=work.address, action=Action.FAILED, status=failure.status,
                                 diagnostic=failure.diagnostic, original_recipient=recipient.orcpt,
                                 last_attempt=utcnow())
        return await self.reports.prepare(MessageWork.of(message), [report])

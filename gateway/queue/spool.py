"""The spool: accepted message bodies on disk until every recipient is done.

A message is written to ``incoming/<id>.eml`` while DATA streams in, then made
durable in this order before the queue rows are committed and 250 is sent
(mox store/account.go, moxio/syncdir.go do the same):

1. fsync the file (its bytes are on disk),
2. rename it into ``queue/`` and fsync ``queue/`` (its name is on disk),
3. the caller commits the queue rows (the message exists for the recovery pass).

Anything left in ``incoming/`` at start was never acknowledged and is removed;
a file in ``queue/`` without queue rows is an acknowledgement that never
happened (crash between 2 and 3) and is removed by the recovery pass.

Several nodes sharing one database share one spool directory (``smtp.spool_dir``
on a shared file system), so that any node can deliver what another accepted,
and a node killed with messages acknowledged but not delivered leaves them to
the others. Each node then names itself (``cluster.node_name``) and receives into
``incoming/<node_name>/`` (only its own half-received files are removed when it
starts), and a file of ``queue/`` without rows is removed only once it is older
than ``ORPHAN_GRACE``: younger, it may be another node's message between steps 2
and 3, whose 250 is still to come.

With a ``SpoolCipher`` (the gateway always gives one) the files are sealed as
they are written (gateway.security.at_rest): no plaintext of a message ever
reaches the spool directory. Readers go through ``opener``/``open_incoming``.

**In its row.** A message accepted over SMTP whose sealed octets fit in ``in_row_bytes`` (64 KiB; the
spool given the database) gets no file at all: the same sealed octets go into its queue row
(``queue_messages.content``), committed in the acceptance group commit (gateway.pipeline.acceptance), whose
one WAL fsync (PostgreSQL: commit) makes the message durable before its 250: no file created, written,
fsynced, renamed, its directory fsynced, and later unlinked, and no worker-thread hop, per message. The
content stays sealed under the spool key; the statement that finishes the message clears it
(gateway.queue.store), as the unlink would have removed the file, and the purge or ``delete`` removes the row.
Readers of a queued message (local delivery after a restart, the outbound worker, DSNs, ``gateway queue
delete --bounce``) ask ``opener``, which reads the row's content when there is some and the file otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection

from gateway.config import Settings
from gateway.queue.tables import QueuedMessage
from gateway.security.at_rest import SealedSpoolWriter, SpoolCipher
from gateway.security.nonces import nonce_hex
from gateway.storage.db import Database
from gateway.storage.prepared import Prepared
from gateway.storage.private import private_dir


# A message up to this size keeps its plaintext in memory while it is received: the pipeline's scan and
# local delivery (acceptance's hand-over) then read it there instead of decrypting the spool file again.
KEEP_PLAINTEXT_BYTES = 256 * 1024
# A message whose sealed octets are at most this long is kept in its queue row, not in a file (see above).
IN_ROW_BYTES = 64 * 1024
ORPHAN_GRACE = 3600.0   # seconds: a shared spool's file without rows is that old before it is taken for an orphan


def spool_root(settings: Settings) -> Path:
    """``smtp.spool_dir``, or ``<data_dir>/spool``."""
    return Path(settings.smtp.spool_dir).expanduser().resolve() if settings.smtp.spool_dir else settings.data_path / "spool"


# fsyncs wait on the disk, not the CPU: their own threads, many, so that the fsyncs of messages ending
# together overlap (the filesystem commits them in one journal transaction) instead of queueing behind the
# default executor's few workers and the other work sent there.
_FSYNC_THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="spool-fsync")


async def fsync_in_thread(fd: int) -> None:
    await asyncio.get_running_loop().run_in_executor(_FSYNC_THREADS, os.fsync, fd)


async def fsync_directory_in_thread(path: Path) -> None:
    await asyncio.get_running_loop().run_in_executor(_FSYNC_THREADS, fsync_directory, path)


def _create_synced(path: Path, data: bytes) -> None:
    """A new file holding ``data``, fsynced and closed (in a worker thread: one hop for the three)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def new_queue_id() -> str:
    """Sortable by arrival (milliseconds, hex) and unique (48 random bits)."""
    return f"{time.time_ns() // 1_000_000:011x}{nonce_hex(6)}"


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable (POSIX: fsync on the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFile:
    """One message being received; a ``MessageSink`` for the SMTP protocol.

    A message kept in memory (up to ``KEEP_PLAINTEXT_BYTES``) creates its file only in ``sync_data``: the
    file is created, written, fsynced and closed in one worker-thread hop (it used to be one hop to create
    it, on the event loop's behalf, and another to fsync it). A larger one spills to its file as it comes."""

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.size = 0
        self._fd: int | None = None                      # created at the spill, or in sync_data
        self._held: bytearray = bytearray()              # the file's octets while it is not created
        self._closed = False                             # sync_data (or discard) ran: no more writes
        self._plain: bytearray | None = bytearray()     # None once larger than KEEP_PLAINTEXT_BYTES
        self._sealer: SealedSpoolWriter | None = spool.cipher.writer(self._output, queue_id) if spool.cipher else None
        self._committed = False
        self._discarded = False
        self._row_content: bytes | None = None           # set by sync_data: the message goes in its row

    # Its two names, made when first needed: a message kept in its row (most) never has a file.
    @functools.cached_property
    def incoming_path(self) -> Path:
        return self.spool.incoming / f"{self.queue_id}.eml"

    @functools.cached_property
    def path(self) -> Path:
        return self.spool.path_of(self.queue_id)

    def write(self, data: bytes) -> None:
        assert not self._closed, "spool file already closed"
        self.size += len(data)
        if self._plain is not None:
            if self.size <= KEEP_PLAINTEXT_BYTES:
                self._plain += data
            else:
                self._plain = None                       # too large to keep: it spills to its file
        if self._sealer is not None:
            self._sealer.write(data)
        else:
            self._output(data)

    def _output(self, data: bytes) -> None:
        """The file's octets (sealed when the spool seals): held while the message is kept in memory."""
        if self._fd is None and self._plain is not None:
            self._held += data
            return
        if self._fd is None:
            self._fd = os.open(self.incoming_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            _write_all(self._fd, self._held)
            self._held = bytearray()
        _write_all(self._fd, data)

    def open_incoming(self) -> BinaryIO:
        """The plaintext of the complete message (call after the last ``write``: sealing is finished here)."""
        if self._sealer is not None:
            self._sealer.finish()
        if self._plain is not None:
            return io.BytesIO(self._plain)          # the same bytes as the sealed file's, not decrypted again
        return self.spool.reader(self.incoming_path, self.queue_id)

    @property
    def row_content(self) -> bytes | None:
        """The sealed octets to commit with the queue rows when the message has no file (``sync_data`` ran)."""
        return self._row_content

    def plaintext(self) -> bytes | None:
        """The complete message's plaintext when it was small enough to keep (``KEEP_PLAINTEXT_BYTES``)."""
        return bytes(self._plain) if self._plain is not None else None

    def replace_content(self, data: bytes) -> None:
        """Start over with ``data`` (the pipeline signed or encrypted the message); before ``make_durable``."""
        assert not self._closed, "spool file already durable"
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
        self.size = 0
        self._held = bytearray()
        self._plain = bytearray()
        self._sealer = self.spool.cipher.writer(self._output, self.queue_id) if self.spool.cipher else None
        self.write(data)

    async def make_durable(self) -> Path:
        """Steps 1 and 2 above; the file is then at ``self.path``."""
        await self.sync_data()
        self.move_into_queue()
        await fsync_directory_in_thread(self.path.parent)
        return self.path

    async def sync_data(self, *, into_row: bool = False) -> None:
        """Step 1: the sealed bytes on disk (fsync), the file closed. Idempotent. ``into_row``: the caller
        commits ``row_content`` with the queue rows (the acceptance group commit), so a message small enough
        for ``Spool.keeps_in_row`` gets no file: its sealed octets are kept for that commit instead."""
        if self._closed:
            return
        if self._sealer is not None:
            self._sealer.finish()
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is None and into_row and self.spool.keeps_in_row(len(self._held)):
            self._row_content, self._held = bytes(self._held), bytearray()   # durable with its rows' commit
            return
        if fd is None:
            held, self._held = bytes(self._held), bytearray()
            creating = asyncio.get_running_loop().run_in_executor(_FSYNC_THREADS, _create_synced,
                                                                  self.incoming_path, held)
            try:
                await asyncio.shield(creating)
            except asyncio.CancelledError:          # the file may appear after a discard: it goes then
                creating.add_done_callback(self._unlink_if_discarded)
                raise
            return
        try:
            await fsync_in_thread(fd)
        finally:
            os.close(fd)

    def _unlink_if_discarded(self, _created: object) -> None:
        if self._discarded:
            self.incoming_path.unlink(missing_ok=True)

    def move_into_queue(self) -> None:
        """Step 2 without its directory fsync (the caller fsyncs ``queue/`` once for every file it moved,
        see gateway.pipeline.acceptance). Idempotent."""
        assert self._closed, "sync_data first"
        if not self._committed and self._row_content is None:
            os.rename(self.incoming_path, self.path)
        self._committed = True

    @property
    def in_queue_directory(self) -> bool:
        """Moved into ``queue/`` as a file (its directory's fsync is due), not kept in its row."""
        return self._committed and self._row_content is None

    def discard(self) -> None:
        """Forget this message (refused, aborted, or its queue rows failed to commit). Idempotent."""
        if self._discarded:
            return
        self._discarded = True
        self._closed = True
        self._held = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._row_content is not None:
            self._row_content = None                     # never had a file
            return
        for path in (self.incoming_path, self.path):
            path.unlink(missing_ok=True)

    def keep(self) -> None:
        """The queue rows are committed: the file now belongs to the queue, ``discard`` no longer applies."""
        self._discarded = True


class Spool:
    def __init__(self, root: Path, cipher: SpoolCipher | None = None, *, node: str = "", db: Database | None = None,
                 in_row_bytes: int = IN_ROW_BYTES) -> None:
        """``node``: this node's name when several nodes share ``root`` (see the module docstring); ``db``: the
        queue's database, where small messages are kept in their rows (``in_row_bytes``; 0: always a file)."""
        self.root = root
        self.cipher = cipher
        self.db = db
        self.in_row_bytes = in_row_bytes if db is not None else 0
        self.shared = bool(node)
        self.incoming = root / "incoming" / node if node else root / "incoming"
        self.queue = root / "queue"
        for directory in (self.root, root / "incoming", self.incoming, self.queue):
            private_dir(directory)

    def path_of(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.eml"

    def keeps_in_row(self, sealed_size: int) -> bool:
        """Whether a message of ``sealed_size`` spool octets goes in its queue row rather than a file."""
        return sealed_size <= self.in_row_bytes

    def reader(self, path: Path, queue_id: str) -> BinaryIO:
        return self.cipher.reader(path, queue_id) if self.cipher else path.open("rb")

    def open_read(self, queue_id: str) -> BinaryIO:
        """The plaintext of a durable message held in a file, as a buffered stream (decrypted segment by
        segment). A queued message may be in its row instead: readers of queued messages use ``opener``."""
        return self.reader(self.path_of(queue_id), queue_id)

    async def opener(self, queue_id: str) -> Callable[[], BinaryIO]:
        """How to read a queued message's plaintext, wherever it is: its row's sealed content (read here,
        once), else its file. The function returned opens a new stream at each call (synchronous, for
        worker threads and the outbound worker's retries)."""
        content = await self.row_content(queue_id)
        if content is None:
            return lambda: self.open_read(queue_id)
        return lambda: self._content_reader(content, queue_id)

    async def plaintext_in_row(self, queue_id: str, *, size: int = 0) -> bytes | None:
        """The whole plaintext of a message kept in its row (small by construction); None when it is a file.
        ``size``: the message's plaintext size when known; larger than a row holds, the row is not read."""
        if size > self.in_row_bytes:
            return None
        content = await self.row_content(queue_id)
        return None if content is None else self.plaintext_of_row(content, queue_id)

    def plaintext_of_row(self, content: bytes, queue_id: str) -> bytes:
        """The plaintext of a queue row's sealed content (``row_content``, ``row_content_in``), opened in one piece
        (``SpoolCipher.open_octets``: what ``opener``'s stream reads)."""
        return self.cipher.open_octets(content, queue_id) if self.cipher else bytes(content)

    def row_content_in(self, connection: Connection, queue_id: str, *, size: int = 0) -> bytes | None:
        """``row_content`` inside the caller's transaction; None without reading when ``size`` (the plaintext's,
        when known) is larger than a row holds."""
        return None if self.db is None or size > self.in_row_bytes else _row_content_in(connection, queue_id)

    async def row_content(self, queue_id: str) -> bytes | None:
        """The sealed octets in a message's queue row (None: in a file, or no such message)."""
        if self.db is None:
            return None
        return await self.db.run_in_transaction(lambda c: _row_content_in(c, queue_id))

    def _content_reader(self, content: bytes, queue_id: str) -> BinaryIO:
        stream = io.BytesIO(content)
        return self.cipher.stream_reader(stream, queue_id) if self.cipher else stream

    def new_file(self) -> SpoolFile:
        return SpoolFile(self, new_queue_id())

    def clear_incoming(self) -> int:
        """Remove half-received messages left by a crash (never acknowledged); returns how many."""
        removed = 0
        for path in self.incoming.glob("*.eml"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def queued_ids(self) -> set[str]:
        return {path.stem for path in self.queue.glob("*.eml")}

    def may_be_in_flight(self, queue_id: str) -> bool:
        """A file without rows that another node may still be committing (a shared spool, a young file)."""
        if not self.shared:
            return False
        try:
            age = time.time() - self.path_of(queue_id).stat().st_mtime
        except FileNotFoundError:
            return True
        return age < ORPHAN_GRACE

    def remove(self, queue_id: str) -> None:
        self.path_of(queue_id).unlink(missing_ok=True)


_ROW_CONTENT = Prepared(select(QueuedMessage.__table__.c.content).where(QueuedMessage.__table__.c.id == bindparam("queue_id")))


def _row_content_in(connection: Connection, queue_id: str) -> bytes | None:
    row = _ROW_CONTENT.run(connection, {"queue_id": queue_id}).fetchone()
    return bytes(row[0]) if row is not None and row[0] is not None else None

"""A delivered message's CPU work for filing: parsed once, its documents extracted, in a thread or in processes.

Parsing the MIME tree and extracting the documents (XML, ZIP, PDF) is about a third of a filing's CPU and
pure computation on bytes: ``examine_message`` takes the delivered copy (and the content the gateway
decrypted from it, if any) and returns the parsed message and the extraction, nothing read or written.
``Examiner`` runs the extraction (``extract_from``) in a worker thread of the server's process, or
(``filing.extract_processes``) in processes of their own, so that it runs beside the event loop and the
database thread instead of taking turns with them under the one interpreter lock. Only the extraction comes
back from a process: the server reads the delivered message's headers itself (``parse_headers``, the header
block alone: all filing and its notices read of it), which costs less than sending the parsed MIME tree back. The limits against hostile input (``ExtractionLimits``:
XML without DTD, bounded depth and sizes; ZIP ratios; MIME depth) are the same in either place; in a
process of its own, a document that still exhausts memory takes that process down, not the server (the
pool is then started again and the job retried in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from email.message import EmailMessage
from email.parser import BytesParser

from gateway.dmp_bridge.extract import FILING_POLICY, ExtractionResult, extract_documents, parse_message

log = logging.getLogger("gateway.dmp.examine")

Examined = tuple[EmailMessage, ExtractionResult]
_NOTHING = ExtractionResult((), ())


def examine_message(raw: bytes, decrypted: bytes | None, extract: bool) -> Examined:
    """(the delivered message, the extraction): the documents come from the decrypted content when there is
    one, else from the message itself (parsed once for both); nothing extracted unless ``extract``."""
    message = parse_message(raw)
    if not extract:
        return message, _NOTHING
    return message, extract_documents(parse_message(decrypted) if decrypted is not None else message)


def extract_from(raw: bytes, decrypted: bytes | None, extract: bool) -> ExtractionResult:
    """``examine_message``'s extraction alone (what an extraction process sends back)."""
    if not extract:
        return _NOTHING
    return extract_documents(parse_message(decrypted if decrypted is not None else raw))


def parse_headers(raw: bytes) -> EmailMessage:
    """The delivered message's header section (RFC 5322 2.1: up to the first empty line), parsed as
    ``parse_message`` parses it; its body is left unparsed (a string), its content type read from its headers."""
    message = BytesParser(policy=FILING_POLICY).parsebytes(raw, headersonly=True)
    assert isinstance(message, EmailMessage)
    return message


def _ready() -> bool:
    return True


def _exit_with(parent: int) -> None:
    """In an extraction process: exit as soon as the server's process is gone (after a kill -9 too), rather
    than wait forever for messages as an orphan."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="filing-parent-watch", daemon=True).start()


class Examiner:
    """Runs ``extract_from`` in ``processes`` processes of their own (started on first use, or by
    ``start``), or in a worker thread when ``processes`` is 0."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the processes now (each imports the gateway's modules once) rather than at the first filing."""
        if self.processes:
            loop = asyncio.get_running_loop()
            pool = self._processes()
            try:
                await asyncio.gather(*(loop.run_in_executor(pool, _ready) for _ in range(self.processes)))
            except BrokenProcessPool:
                log.warning("the filing extraction processes did not start: messages are examined in threads "
                            "until a new pool starts")
                self._discard(pool)

    async def extract(self, raw: bytes, decrypted: bytes | None, extract: bool) -> ExtractionResult:
        """``extract_from`` in an extraction process (in a worker thread when there are none)."""
        if not extract:
            return _NOTHING
        if not self.processes:
            return await asyncio.to_thread(extract_from, raw, decrypted, extract)
        pool = self._processes()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, extract_from, raw, decrypted, extract)
        except BrokenProcessPool:
            # An extraction process died (killed, or out of memory): a new pool for the next jobs, this one here.
            log.warning("a filing extraction process died: its pool is started again; this message is examined "
                        "in a thread")
            self._discard(pool)
            return await asyncio.to_thread(extract_from, raw, decrypted, extract)

    def close(self) -> None:
        """Stop the processes (those busy finish their message, which nobody waits for any more)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    def _processes(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter (forking a process that runs threads could copy a held lock).
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_exit_with, initargs=(os.getpid(),))
        return self._pool

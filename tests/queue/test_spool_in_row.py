"""A small accepted message kept in its queue row (gateway.queue.spool, "in its row").

Its sealed spool octets are committed with its rows by the acceptance group commit: no spool file is
created (nothing in ``incoming/`` or ``queue/``), the row holds ciphertext only, every reader of a queued
message gets the plaintext through ``Spool.opener``, and the statement that finishes the message clears
the content as the unlink removed the file. A message too large for a row keeps its file.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select

from gateway.pipeline.acceptance import AcceptanceCommitter
from gateway.queue.spool import Spool, SpoolFile
from gateway.queue.store import AcceptedRows, QueueStore
from gateway.queue.tables import QueuedMessage
from gateway.security.at_rest import SPOOL_MAGIC, SpoolCipher
from gateway.storage.db import Database

SECRET = b"Subject: resultat HbA1c 7,2 %\r\n\r\nPatient Dupont, glycemie a jeun 1,32 g/l\r\n"


def _spool(tmp_path: Path, database: Database, **kwargs: int) -> Spool:
    return Spool(tmp_path / "spool", SpoolCipher(7, os.urandom(32)), db=database, **kwargs)


def _accepted(spool: Spool, content: bytes) -> tuple[SpoolFile, AcceptedRows]:
    spool_file = spool.new_file()
    spool_file.write(content)
    message: dict[str, object] = dict(id=spool_file.queue_id, door="submission", sender="a@b.example", envid=None,
                                      ret=None, body_type="7BIT", smtputf8=False, size=spool_file.size,
                                      message_id_header=None, trace_headers="Received: x\r\n",
                                      authenticated_as="a@b.example", client_address="127.0.0.1",
                                      client_helo="c", tls=None)
    recipient: dict[str, object] = dict(address="r@c.example", orcpt=None, notify=None, route="remote",
                                        mailbox_id=None, domain="c.example", state="pending", attempts=0)
    return spool_file, AcceptedRows(message, [recipient])


async def _stored(database: Database, queue_id: str) -> bytes | None:
    async with database.session() as s:
        value = await s.scalar(select(QueuedMessage.content).where(QueuedMessage.id == queue_id))
    return bytes(value) if value is not None else None


def _files(spool: Spool) -> list[Path]:
    return sorted(spool.root.rglob("*.eml"))


async def test_a_small_message_is_committed_sealed_in_its_row_without_a_file(database: Database,
                                                                                tmp_path: Path) -> None:
    spool = _spool(tmp_path, database)
    committer = AcceptanceCommitter(spool, QueueStore(database))
    spool_file, rows = _accepted(spool, SECRET)
    await committer.commit([spool_file], [rows], [])
    spool_file.keep()

    assert _files(spool) == []                                # no file created, fsynced, renamed
    assert "path" not in vars(spool_file) and "incoming_path" not in vars(spool_file)   # nor even named
    sealed = await _stored(database, spool_file.queue_id)
    assert sealed is not None and sealed.startswith(SPOOL_MAGIC)
    for plaintext in (b"HbA1c", b"Dupont", b"Subject:"):
        assert plaintext not in sealed, f"{plaintext!r} in clear in the queue row"

    open_message = await spool.opener(spool_file.queue_id)
    for _ in range(2):                                        # each call a new stream (the outbound worker retries)
        with open_message() as stream:
            assert stream.read() == SECRET
    assert await spool.plaintext_in_row(spool_file.queue_id, size=len(SECRET)) == SECRET


async def test_the_finishing_statement_clears_the_content(database: Database, tmp_path: Path) -> None:
    spool = _spool(tmp_path, database)
    queue = QueueStore(database)
    spool_file, rows = _accepted(spool, SECRET)
    await AcceptanceCommitter(spool, queue).commit([spool_file], [rows], [])
    assert await _stored(database, spool_file.queue_id) is not None

    assert await queue.mark_delivered(rows.recipient_ids[0], spool_file.queue_id)   # its last recipient
    assert await _stored(database, spool_file.queue_id) is None
    assert await spool.plaintext_in_row(spool_file.queue_id) is None


async def test_a_message_too_large_for_a_row_keeps_its_sealed_file(database: Database, tmp_path: Path) -> None:
    spool = _spool(tmp_path, database, in_row_bytes=1024)
    spool_file, rows = _accepted(spool, SECRET + b"x" * 4096 + b"\r\n")
    await AcceptanceCommitter(spool, QueueStore(database)).commit([spool_file], [rows], [])

    assert _files(spool) == [spool_file.path]
    assert await _stored(database, spool_file.queue_id) is None
    assert b"Dupont" not in spool_file.path.read_bytes()
    assert await spool.plaintext_in_row(spool_file.queue_id) is None
    with (await spool.opener(spool_file.queue_id))() as stream:
        assert stream.read().startswith(SECRET)


async def test_a_refused_commit_leaves_neither_row_nor_file(database: Database, tmp_path: Path) -> None:
    spool = _spool(tmp_path, database)
    committer = AcceptanceCommitter(spool, QueueStore(database))
    first, first_rows = _accepted(spool, SECRET)
    await committer.commit([first], [first_rows], [])
    second, second_rows = _accepted(spool, SECRET)
    second_rows.message["id"] = first.queue_id               # a queue id already taken: the insert fails
    try:
        await committer.commit([second], [second_rows], [])
    except Exception:
        second.discard()
    else:
        raise AssertionError("a duplicate queue id was committed")
    assert _files(spool) == []
    assert await _stored(database, second.queue_id) is None

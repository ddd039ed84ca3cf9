"""Group commit at acceptance (gateway.pipeline.acceptance): messages whose DATA ends together share one
directory fsync and one queue transaction, each caller returns only once its own rows are committed, and a
batch that cannot commit as a whole still commits every message that would have committed alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select

from gateway.pipeline.acceptance import AcceptanceCommitter
from gateway.queue.tables import QueuedMessage, QueuedRecipient
from gateway.queue.store import AcceptedRows, QueueStore
from gateway.queue.spool import Spool, SpoolFile
from gateway.storage.db import Database


def _rows(spool_file: SpoolFile, queue_id: str | None = None) -> AcceptedRows:
    message: dict[str, object] = dict(id=queue_id or spool_file.queue_id, door="submission", sender="a@b.example",
                                      envid=None, ret=None, body_type="7BIT", smtputf8=False, size=spool_file.size,
                                      message_id_header=None, trace_headers="Received: x\r\n",
                                      authenticated_as="a@b.example", client_address="127.0.0.1", client_helo="c",
                                      tls=None)
    recipient: dict[str, object] = dict(address="r@c.example", orcpt=None, notify=None, route="remote",
                                        mailbox_id=None, domain="c.example", state="pending", attempts=0)
    return AcceptedRows(message, [recipient])


def _file(spool: Spool) -> SpoolFile:
    spool_file = spool.new_file()
    spool_file.write(b"Subject: group\r\n\r\nbody\r\n")
    return spool_file


async def _count(db: Database, model: type[QueuedMessage | QueuedRecipient]) -> int:
    async with db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


async def test_concurrent_acceptances_share_transactions_and_all_commit(database: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    committer = AcceptanceCommitter(spool, QueueStore(database))
    files = [_file(spool) for _ in range(30)]
    await asyncio.gather(*(committer.commit([f], [_rows(f)], []) for f in files))
    assert committer.messages == 30
    assert committer.transactions < 30                     # grouped: fewer transactions than messages
    assert await _count(database, QueuedMessage) == 30 and await _count(database, QueuedRecipient) == 30
    for spool_file in files:                               # durable: in queue/, nothing left in incoming/
        assert spool_file.path.exists() and not spool_file.incoming_path.exists()


async def test_a_failing_message_fails_alone(database: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    committer = AcceptanceCommitter(spool, QueueStore(database))
    files = [_file(spool) for _ in range(6)]
    taken = files[0].queue_id
    rows = [_rows(f) for f in files[:-1]] + [_rows(files[-1], queue_id=taken)]   # the last reuses a queue id
    outcomes = await asyncio.gather(*(committer.commit([f], [r], []) for f, r in zip(files, rows)),
                                    return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    # one of the two holding the same queue id (whichever came second); every other batch-mate committed
    assert len(failed) == 1 and failed[0] in (outcomes[0], outcomes[-1])
    assert await _count(database, QueuedMessage) == 5


async def test_a_caller_cancelled_before_its_batch_leaves_nothing(database: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    committer = AcceptanceCommitter(spool, QueueStore(database))
    first, second = _file(spool), _file(spool)
    running = asyncio.create_task(committer.commit([first], [_rows(first)], []))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(committer.commit([second], [_rows(second)], []))
    await asyncio.sleep(0)
    waiting.cancel()
    await running
    try:
        await waiting
    except asyncio.CancelledError as cancelled:
        committed = getattr(cancelled, "committed", False)
    else:
        committed = True
    rows = await _count(database, QueuedMessage)
    assert rows == (2 if committed else 1)                 # never rows the caller was told were not committed

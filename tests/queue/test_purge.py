"""Finished work is purged (issue 11): on SQLite and PostgreSQL, a delivered, a failed and a pending message,
the clock moved past the windows (injected, no sleeps): the purge removes exactly the finished ones and their
rows (attempts, hold/DKIM row, recipients, the filing job with its delivery row), `queue list` and `show`
agree afterwards, the pending one still delivers, and a dry run counts what a purge removes without removing
it. Through the CLI too, and through the periodic job of a real `gateway serve`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.app import Services, open_services
from gateway.config import load_settings
from gateway.directory.identifiers import add_luhn_key
from gateway.dmp_bridge.tables import FilingJob, JobState
from gateway.errors import NotFound
from gateway.mailstore.tables import Delivery, Message
from gateway.queue.outbound_store import AttemptRecord
from gateway.queue.outbound_tables import OutboundAttempt, OutboundMessage
from gateway.queue.tables import (
    MessageState,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
)
from gateway.security.keys import mailbox_owner
from gateway.security.smime_policy import InboundResult
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, utcnow
from tests.harness import GatewayProcess, run_cli, wait_until

DOMAIN = "purge.mssante.localhost"
HOUR = dt.timedelta(hours=1)


@pytest.fixture
async def services(database: Database, tmp_path: Path) -> AsyncIterator[Services]:
    settings = load_settings(data_dir=tmp_path / "data", environ={},
                             overrides={"database": {"url": database.url}, "auth": {"argon2_memory_kib": 8192,
                                                                                   "argon2_time_cost": 1}})
    async with open_services(settings) as opened:
        await opened.directory.ensure_local_domain(DOMAIN, kind="professional")
        doctor = await opened.directory.add_professional(id_type="RPPS", id_value=add_luhn_key("1000000001"),
                                                         family_name="MEDECIN", given_name="Claire", profession_code="10")
        await opened.directory.create_mailbox(address=f"claire@{DOMAIN}", type="PER", owner=doctor["idnps"])
        yield opened


def _mail(subject: str) -> bytes:
    return (f"From: <postmaster@{DOMAIN}>\r\nTo: <claire@{DOMAIN}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@{DOMAIN}>\r\n\r\nbody of {subject}\r\n").encode()


async def _failed_remote(services: Services) -> str:
    """A message to another operator that failed for good (its attempt recorded, signed once)."""
    async with services.db.session() as s:
        s.add(QueuedMessage(id="failedmsg", door="submission", sender=f"claire@{DOMAIN}", size=10, trace_headers="",
                            client_address="127.0.0.1"))
        await s.flush()
        recipient = QueuedRecipient(message_id="failedmsg", address="x@other.test", route="remote", domain="other.test")
        s.add(recipient)
        s.add(OutboundMessage(message_id="failedmsg", dkim_signature="DKIM-Signature: v=1\r\n"))
        await s.flush()
        recipient_id = recipient.id
    await services.queue.outbound_rows.settle([AttemptRecord(recipient_id, RecipientState.FAILED, "550 5.1.1 no such user",
                                                             reply_code=550, enhanced_code="5.1.1")])
    assert await services.queue.rows.finish_if_done("failedmsg")
    return "failedmsg"


async def _rows(db: Database, model: type, *conditions: object) -> int:
    async with db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(model).where(*conditions)) or 0)  # type: ignore[arg-type]


async def test_purge_removes_exactly_the_finished_messages(services: Services) -> None:
    queue = services.queue
    delivered = await services.generated.send(services.db, _mail("delivered"), f"claire@{DOMAIN}")
    assert delivered is not None
    await queue.local.deliver_message(delivered)
    failed = await _failed_remote(services)
    pending = await services.generated.send(services.db, _mail("pending"), f"claire@{DOMAIN}")
    assert pending is not None                      # queued, not delivered yet
    listed = {row["id"]: row for row in await queue.list()}
    assert listed[delivered]["state"] == listed[failed]["state"] == MessageState.DONE.value
    assert listed[pending]["states"] == {"pending": 1}

    # Within outbound.finished_listed_hours (72) nothing goes.
    early = await queue.purge(now=utcnow() + 71 * HOUR)
    assert early.messages == 0 and early.count.removed.get("filing_jobs", 0) == 0

    # Past it: the failed message goes; the delivered one stays while its filing job is kept (168 h), since a
    # refile reads who deposited it; the pending one is never a candidate.
    later = utcnow() + 73 * HOUR
    dry = await queue.purge(now=later, dry_run=True)
    assert dry.dry_run and dry.count.removed == {"outbound_attempts": 1, "outbound_messages": 1,
                                                 "queue_recipients": 1, "queue_messages": 1,
                                                 "smime_inbound_results": 0}
    assert dry.count.kept == {"needed by filing jobs": 1}
    assert await _rows(services.db, QueuedMessage) == 3   # a dry run deletes nothing
    done = await queue.purge(now=later)
    assert done.count.removed == dry.count.removed and done.count.kept == dry.count.kept
    with pytest.raises(NotFound):
        await queue.show(failed)
    assert await _rows(services.db, OutboundAttempt) == 0
    assert await _rows(services.db, OutboundMessage) == 0
    assert (await queue.show(delivered))["state"] == MessageState.DONE.value

    # Past the filing jobs' window too: the job, its delivery row, then the message.
    much_later = utcnow() + 169 * HOUR
    dry = await queue.purge(now=much_later, dry_run=True)
    assert dry.count.removed == {"filing_notices": 0, "filing_outcomes": 0, "filing_jobs": 1, "mail_deliveries": 1,
                                 "outbound_attempts": 0, "outbound_messages": 0, "queue_recipients": 1,
                                 "queue_messages": 1, "smime_inbound_results": 0}
    done = await queue.purge(now=much_later)
    assert done.count.removed == dry.count.removed and not done.count.kept
    assert await _rows(services.db, FilingJob) == 0 and await _rows(services.db, Delivery) == 0
    assert await _rows(services.db, Message) == 1        # the delivered message itself stays in the mailbox
    with pytest.raises(NotFound):
        await queue.show(delivered)
    # `list` and `show` agree: only the pending message is left, pending in both.
    assert [row["id"] for row in await queue.list()] == [pending]
    assert await queue.list(state="failed") == [] and await queue.list(state="delivered") == []
    assert [r["state"] for r in (await queue.show(pending))["recipients"]] == ["pending"]
    assert await _rows(services.db, QueuedRecipient, QueuedRecipient.message_id == pending) == 1

    # The pending message still delivers (its spool file and rows were left alone), and is purged in its turn.
    await queue.local.deliver_message(pending)
    assert (await queue.show(pending))["recipients"][0]["state"] == RecipientState.DELIVERED.value
    assert await _rows(services.db, Message) == 2
    assert (await queue.purge(now=utcnow() + 169 * HOUR)).messages == 1
    assert await _rows(services.db, QueuedMessage) == 0


async def test_a_messages_smime_verdicts_and_decrypted_copies_go_with_it(services: Services) -> None:
    """The S/MIME verdict of each recipient mailbox and its decrypted copy (``SmimeService.record``) belong to
    the message: kept while it is, counted by a dry run, then deleted in its transaction, the blob after it."""
    failed = await _failed_remote(services)
    kept = await services.generated.send(services.db, _mail("kept"), f"claire@{DOMAIN}")   # pending: never purged
    async with services.db.session() as s:
        mailbox_id = await s.scalar(select(Mailbox.id).where(Mailbox.address == f"claire@{DOMAIN}"))
    assert mailbox_id is not None and kept is not None
    copies = {}
    for queue_id in (failed, kept):
        copies[queue_id] = await services.blobs.put(mailbox_owner(mailbox_id), b"plaintext of " + queue_id.encode())
        async with services.db.session() as s:
            s.add(InboundResult(queue_id=queue_id, mailbox_id=mailbox_id, status="pass", summary="smime=pass",
                                encrypted=True, decrypted_blob_id=copies[queue_id].blob_id, decrypted_size=20))
    later = utcnow() + 73 * HOUR
    # Verdicts whose message was purged before they followed it: swept once past the queue's window.
    for queue_id, created in (("purgedlong", utcnow()), ("justnow", later - HOUR)):
        copies[queue_id] = await services.blobs.put(mailbox_owner(mailbox_id), b"orphan")
        async with services.db.session() as s:
            s.add(InboundResult(queue_id=queue_id, mailbox_id=mailbox_id, status="pass", summary="smime=pass",
                                encrypted=True, decrypted_blob_id=copies[queue_id].blob_id, decrypted_size=6,
                                created_at=created))
    dry = await services.queue.purge(now=later, dry_run=True)
    assert dry.count.removed["smime_inbound_results"] == 1 and await _rows(services.db, InboundResult) == 4
    assert dry.count.removed["smime_inbound_results (message already gone)"] == 1
    done = await services.queue.purge(now=later)
    assert done.count.removed == dry.count.removed
    async with services.db.session() as s:
        assert sorted(await s.scalars(select(InboundResult.queue_id))) == sorted([kept, "justnow"])
    assert not services.blobs.path(copies[failed].blob_id).exists()
    assert not services.blobs.path(copies["purgedlong"].blob_id).exists()
    assert services.blobs.path(copies["justnow"].blob_id).exists()
    assert await services.blobs.read(mailbox_owner(mailbox_id), copies[kept].blob_id) == b"plaintext of " + kept.encode()


async def test_running_and_failed_filing_jobs_keep_their_message(services: Services) -> None:
    """A filing job still to run, or failed (waiting for `gateway record refile`), is never purged, nor is its
    message, whatever the time."""
    queue = services.queue
    ids = []
    for subject, state in (("received", JobState.RECEIVED), ("failedjob", JobState.FAILED)):
        queue_id = await services.generated.send(services.db, _mail(subject), f"claire@{DOMAIN}")
        assert queue_id is not None
        await queue.local.deliver_message(queue_id)
        async with services.db.session() as s:
            job = await s.scalar(select(FilingJob).where(FilingJob.delivery_key.startswith(f"{queue_id}:")))
            assert job is not None
            job.state = state.value
            job.finished_at = None if state is JobState.RECEIVED else utcnow()
        ids.append(queue_id)
    report = await queue.purge(now=utcnow() + 1000 * HOUR)
    assert report.messages == 0 and report.count.removed.get("filing_jobs", 0) == 0
    assert report.count.kept == {"needed by filing jobs": 2}
    assert await _rows(services.db, FilingJob) == 2 and await _rows(services.db, Delivery) == 2
    for queue_id in ids:
        assert (await queue.show(queue_id))["state"] == MessageState.DONE.value


async def test_purge_works_in_batches(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several short transactions of at most ``retention.purge_batch_size`` messages, until none is left."""
    queue = services.queue
    ids = []
    for number in range(5):
        queue_id = await services.generated.send(services.db, _mail(f"batch{number}"), f"claire@{DOMAIN}")
        assert queue_id is not None
        await queue.local.deliver_message(queue_id)
        ids.append(queue_id)
    transactions: list[bool] = []
    original = services.db.run_in_transaction

    async def counted(work, *, write: bool = False):  # type: ignore[no-untyped-def]
        transactions.append(write)
        return await original(work, write=write)

    monkeypatch.setattr(services.db, "run_in_transaction", counted)
    queue.purger.batch_size = 2
    report = await queue.purge(now=utcnow() + 169 * HOUR)
    assert report.messages == 5 and report.count.removed["filing_jobs"] == 5
    # 5 jobs in 2+2+1, the S/MIME verdicts of messages already gone (none) in 1, 5 messages in 2+2+1
    assert len(transactions) == 7 and all(transactions)
    assert await _rows(services.db, QueuedMessage) == 0


def test_queue_purge_cli_and_the_periodic_job_of_serve(tmp_path: Path) -> None:
    """`gateway queue purge [--dry-run]` prints what it removes (or would); `gateway serve` purges by itself."""
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"GATEWAY_OUTBOUND_FINISHED_LISTED_HOURS": "0",
                                                         "GATEWAY_RETENTION_FILING_JOBS_KEPT_HOURS": "0",
                                                         "GATEWAY_RETENTION_PURGE_INTERVAL_MINUTES": "0.01"})
    gateway.init_demo()
    doctor = gateway.account("PER")
    env = os.environ | {"GATEWAY_OUTBOUND_FINISHED_LISTED_HOURS": "0", "GATEWAY_RETENTION_FILING_JOBS_KEPT_HOURS": "0"}
    _queue_for(gateway, doctor, count=1)
    # Not served yet: the CLI's own pass.
    before = json.loads(run_cli("queue", "list", "--json", data_dir=gateway.data_dir, env=env, check=True).stdout)
    assert len(before) == 1 and before[0]["states"] == {"pending": 1}
    dry = run_cli("queue", "purge", "--dry-run", data_dir=gateway.data_dir, env=env, check=True).stdout
    assert dry.startswith("would remove: nothing")      # a pending message is not finished
    gateway.start()
    try:
        # serve delivers it, then its purge (every 0.6 s, finished_listed_hours = 0) removes its rows.
        wait_until(lambda: True if "queue purge: removed" in gateway.log_text() else None, timeout=60,
                   what="the periodic purge removed the delivered message")
        listed = json.loads(gateway.cli("queue", "list", "--json", check=True).stdout)
        assert listed == []
        assert "queue_messages" in gateway.log_text() and "filing_jobs" in gateway.log_text()
    finally:
        gateway.stop()
    summary = run_cli("queue", "purge", data_dir=gateway.data_dir, env=env, check=True).stdout
    assert summary.startswith("removed: nothing")


def _queue_for(gateway: GatewayProcess, account: dict[str, str], *, count: int) -> None:
    """Queue ``count`` messages to ``account`` while no server runs (the generated-mail queue, as serve has it)."""

    async def go() -> None:
        settings = load_settings(data_dir=gateway.data_dir, environ=gateway.env)
        async with open_services(settings) as opened:
            for number in range(count):
                queue_id = await opened.generated.send(opened.db, _mail(f"served{number}").replace(
                    f"claire@{DOMAIN}".encode(), account["address"].encode()), account["address"])
                assert queue_id is not None

    asyncio.run(go())


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_one_node_purges_at_a_time(services: Services, database: Database) -> None:
    """Several nodes on one PostgreSQL: while one holds the purge's advisory lock, another's pass is skipped
    (the periodic job) or refused with the reason (`gateway queue purge`)."""
    from gateway.errors import Conflict
    from gateway.queue.purge import PURGE_LOCK, PurgeTask
    from gateway.storage.advisory import run_alone

    task = PurgeTask(services.queue.purge, interval_seconds=60)
    async with run_alone(database, PURGE_LOCK) as alone:     # another node, purging now
        assert alone
        with pytest.raises(Conflict, match="another node"):
            await services.queue.purge()
        assert await task.run_once() is None and task.passes == 0
    assert await task.run_once() is not None and task.passes == 1

"""`gateway queue list` and `show` read the queue the same way: a recipient being delivered is in-flight
(not "pending, next attempt in 30 minutes"), a DNS failure is not called "no TLS", and finished messages
stay listed for outbound.finished_listed_hours (so `--state failed` finds them)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from pathlib import Path

from gateway.config import load_settings
from gateway.queue.tables import MessageState, QueuedMessage, QueuedRecipient, RecipientState
from gateway.queue.outbound_store import AttemptRecord, OutboundStore
from gateway.storage.db import Database
from gateway.storage.models import utcnow
from tests.harness import run_cli

LEASE = dt.timedelta(minutes=30)
DNS_FAILURE = "cannot resolve mx.b.test: DNS lookup timed out"


def _message(queue_id: str, **values: object) -> QueuedMessage:
    return QueuedMessage(id=queue_id, door="submission", sender="dr@demo.mssante.localhost", size=100,
                         trace_headers="", client_address="127.0.0.1", **values)


async def _fill(data_dir: Path) -> dt.datetime:
    """q1: one recipient being delivered, one deferred after a DNS failure; q2 failed an hour ago; q3 failed long ago."""
    settings = load_settings(data_dir=data_dir, environ={})
    db = Database(settings.database_url)
    await db.migrate()
    try:
        async with db.session() as s:
            s.add(_message("q1"))
            s.add(_message("q2", state=MessageState.DONE.value, done_at=utcnow() - dt.timedelta(hours=1)))
            s.add(_message("q3", state=MessageState.DONE.value, done_at=utcnow() - dt.timedelta(days=30)))
            await s.flush()
            s.add_all([QueuedRecipient(message_id="q1", address="x@a.test", route="remote", domain="a.test"),
                       QueuedRecipient(message_id="q1", address="y@b.test", route="remote", domain="b.test"),
                       QueuedRecipient(message_id="q2", address="z@c.test", route="remote", domain="c.test",
                                       state=RecipientState.FAILED.value, attempts=1),
                       QueuedRecipient(message_id="q3", address="w@c.test", route="remote", domain="c.test",
                                       state=RecipientState.FAILED.value, attempts=1)])
        store = OutboundStore(db)
        batches = await store.claim_due(lease=LEASE)  # the worker takes both q1 recipients
        assert sorted(b.domain for b in batches) == ["a.test", "b.test"]
        deferred = next(b for b in batches if b.domain == "b.test").recipients[0]
        next_attempt = utcnow() + dt.timedelta(minutes=7, seconds=30)
        await store.settle([AttemptRecord(deferred.id, RecipientState.DEFERRED, DNS_FAILURE, enhanced_code="4.4.3",
                                          next_attempt_at=next_attempt)])
        return next_attempt  # a.test is still being delivered
    finally:
        await db.dispose()


def _queue(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = run_cli("queue", *args, data_dir=data_dir, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_and_show_agree_and_name_what_happens(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    next_attempt = asyncio.run(_fill(data_dir))

    listed = {row["id"]: row for row in json.loads(_queue(data_dir, "list", "--json"))}
    shown = json.loads(_queue(data_dir, "show", "q1", "--json"))
    by_address = {r["address"]: r for r in shown["recipients"]}
    # The recipient being delivered is in-flight in both views, its lease is not its "next attempt".
    assert listed["q1"]["states"] == {"in-flight": 1, "deferred": 1}
    assert by_address["x@a.test"]["state"] == "in-flight" and by_address["x@a.test"]["next_attempt_at"] is None
    assert by_address["x@a.test"]["lease_until"] is not None
    # The list's next attempt is the deferred recipient's, exactly as show gives it.
    assert dt.datetime.fromisoformat(listed["q1"]["next_attempt_at"]) == next_attempt
    assert by_address["y@b.test"]["next_attempt_at"] == listed["q1"]["next_attempt_at"]

    human = _queue(data_dir, "show", "q1")
    assert DNS_FAILURE in human and "no TLS" not in human  # no host was reached: the reply names the DNS cause
    assert "being delivered now" in human

    # Finished messages stay listed for outbound.finished_listed_hours (default 72): q2 yes, q3 (30 days) no.
    failed = [row["id"] for row in json.loads(_queue(data_dir, "list", "--state", "failed", "--json"))]
    assert failed == ["q2"]
    assert listed["q2"]["state"] == "done" and "q3" not in listed
    hidden = json.loads(_queue(data_dir, "list", "--json", env=os.environ | {"GATEWAY_OUTBOUND_FINISHED_LISTED_HOURS": "0"}))
    assert [row["id"] for row in hidden] == ["q1"]

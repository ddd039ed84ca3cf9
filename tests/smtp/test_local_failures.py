"""Local delivery ends: a temporary failure (over quota) is retried until the queue lifetime, a
mailbox disabled or deleted after acceptance fails at once, and the sender gets an RFC 3464
failure DSN in their mailbox as NOTIFY asks (RFC 3461 4.1).

The passage of time is not waited for: the test moves the message's arrival back past the
(short) lifetime the settings give, then runs the due retry, so nothing depends on timing.
"""

from __future__ import annotations

import datetime as dt
import email
from collections.abc import Iterator

import pytest
from sqlalchemy import update

from gateway.queue.tables import QueuedMessage, QueuedRecipient
from gateway.queue.store import QueueStore
from gateway.storage.models import utcnow
from tests.smtp.conftest import logged_in, message
from tests.smtp.gateway_thread import GatewayThread

LIFETIME_HOURS = 0.5
BIG_BODY = "Compte rendu volumineux.\r\n" + ("x" * 998 + "\r\n") * 1200        # ~1.2 MB: over a 1 MiB quota


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    gateway = GatewayThread(tmp_path_factory.mktemp("local-failures") / "data", overrides={"smtp": {
        "local_retry_seconds": 1, "local_queue_lifetime_hours": LIFETIME_HOURS}}).start()
    yield gateway
    gateway.stop()


def _send(gw: GatewayThread, sender: str, password: str, to: str, subject: str, *, notify: str | None = None) -> str:
    """Submit one large message; its queue id."""
    with logged_in(gw, sender, password) as client:
        client.mail(sender)
        code, _ = client.rcpt(to, [f"NOTIFY={notify}"] if notify else [])
        assert code == 250
        code, reply = client.data(message(sender, to, subject, body=BIG_BODY))
    assert code == 250
    return reply.decode().rsplit(" ", 1)[1]


def _recipient(gw: GatewayThread, queue_id: str) -> QueuedRecipient:
    (row,) = gw.call(QueueStore(gw.db).recipients_of(queue_id))  # type: ignore[arg-type]
    return row


def _retry_now(gw: GatewayThread, queue_id: str, *, arrived_hours_ago: float = 0.0) -> None:
    """Make the deferred recipient due (and, if asked, the message older), then run local delivery."""
    async def run() -> None:
        assert gw.db is not None and gw.queue is not None
        async with gw.db.session() as s:
            if arrived_hours_ago:
                await s.execute(update(QueuedMessage).where(QueuedMessage.id == queue_id)
                                .values(received_at=utcnow() - dt.timedelta(hours=arrived_hours_ago)))
            await s.execute(update(QueuedRecipient).where(QueuedRecipient.message_id == queue_id)
                            .values(next_attempt_at=utcnow()))
        gw.queue.local.schedule(queue_id)
        await gw.queue.local.wait_idle()
    gw.call(run())
    gw.wait_delivered()                                          # and the DSN it may have queued


def _reports(gw: GatewayThread, address: str, subject: str) -> list[email.message.Message]:
    found = []
    for raw in gw.inbox(address):
        parsed = email.message_from_bytes(raw)
        if parsed.get_content_type() == "multipart/report" and subject in raw.decode("utf-8", "replace"):
            found.append(parsed)
    return found


def _status_fields(report: email.message.Message) -> dict[str, str]:
    (part,) = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    fields: dict[str, str] = {}
    for block in blocks:
        assert isinstance(block, email.message.Message)
        fields.update({key: str(value) for key, value in block.items()})
    return fields


def test_over_quota_is_deferred_then_fails_after_the_lifetime(gw: GatewayThread) -> None:
    doctor, pharmacist = gw.account("PER", 0), gw.account("PER", 1)
    gw.call(gw.directory.update_mailbox(pharmacist.address, quota_mb=1))  # type: ignore[union-attr]
    queue_id = _send(gw, doctor.address, doctor.password, pharmacist.address, "Quota plein")
    gw.wait_delivered()

    deferred = _recipient(gw, queue_id)
    assert deferred.state == "deferred" and deferred.last_error is not None
    assert deferred.last_error.startswith(f"452 4.2.2 Mailbox {pharmacist.address} is over quota")
    assert _reports(gw, doctor.address, "Quota plein") == []

    _retry_now(gw, queue_id)                                     # still within the lifetime: deferred again
    assert _recipient(gw, queue_id).state == "deferred"

    _retry_now(gw, queue_id, arrived_hours_ago=LIFETIME_HOURS + 0.1)
    failed = _recipient(gw, queue_id)
    assert failed.state == "failed" and failed.last_error is not None and failed.last_error.startswith("552 5.2.2 ")
    stored = gw.call(QueueStore(gw.db).message(queue_id))  # type: ignore[arg-type]
    assert stored is not None and stored.state == "done"
    assert not any(queue_id in path.name for path in (gw.data_dir / "spool").rglob("*"))

    (report,) = _reports(gw, doctor.address, "Quota plein")
    fields = _status_fields(report)
    assert fields["Action"] == "failed" and fields["Status"] == "5.2.2"
    assert fields["Final-Recipient"] == f"rfc822; {pharmacist.address}"
    assert fields["Diagnostic-Code"].startswith("smtp; 552 5.2.2 ")
    assert report["Auto-Submitted"] == "auto-replied"
    # RET absent and a large original: only its header comes back (RFC 3461 4.3).
    assert any(p.get_content_type() == "text/rfc822-headers" for p in report.walk())


def test_mailbox_disabled_after_acceptance_fails_at_once(gw: GatewayThread) -> None:
    doctor, nurse = gw.account("PER", 0), gw.account("PER", 2)
    gw.call(gw.directory.update_mailbox(nurse.address, quota_mb=1))  # type: ignore[union-attr]
    queue_id = _send(gw, doctor.address, doctor.password, nurse.address, "Boite desactivee")
    gw.wait_delivered()
    assert _recipient(gw, queue_id).state == "deferred"

    gw.call(gw.directory.update_mailbox(nurse.address, state="disabled"))  # type: ignore[union-attr]
    _retry_now(gw, queue_id)                                     # well within the lifetime
    failed = _recipient(gw, queue_id)
    assert failed.state == "failed" and failed.last_error == f"550 5.2.1 Mailbox {nurse.address} is disabled"
    (report,) = _reports(gw, doctor.address, "Boite desactivee")
    fields = _status_fields(report)
    assert (fields["Action"], fields["Status"]) == ("failed", "5.2.1")


def test_notify_never_fails_without_a_report(gw: GatewayThread) -> None:
    doctor, pharmacist = gw.account("PER", 0), gw.account("PER", 1)
    gw.call(gw.directory.update_mailbox(pharmacist.address, quota_mb=1))  # type: ignore[union-attr]
    queue_id = _send(gw, doctor.address, doctor.password, pharmacist.address, "Sans avis", notify="NEVER")
    gw.wait_delivered()
    _retry_now(gw, queue_id, arrived_hours_ago=LIFETIME_HOURS + 0.1)
    assert _recipient(gw, queue_id).state == "failed"
    assert _reports(gw, doctor.address, "Sans avis") == []


def test_deleted_mailbox_fails_at_once(gw: GatewayThread) -> None:
    """A mailbox deleted after acceptance leaves its queue row without a mailbox: 5.1.1, never stuck."""
    doctor, pharmacist = gw.account("PER", 0), gw.account("PER", 1)
    gw.call(gw.directory.update_mailbox(pharmacist.address, quota_mb=1))  # type: ignore[union-attr]
    queue_id = _send(gw, doctor.address, doctor.password, pharmacist.address, "Boite supprimee")
    gw.wait_delivered()

    async def forget_mailbox() -> None:
        assert gw.db is not None
        async with gw.db.session() as s:                         # what ON DELETE SET NULL leaves behind
            await s.execute(update(QueuedRecipient).where(QueuedRecipient.message_id == queue_id)
                            .values(mailbox_id=None))
    gw.call(forget_mailbox())
    _retry_now(gw, queue_id)
    failed = _recipient(gw, queue_id)
    assert failed.state == "failed" and failed.last_error == f"550 5.1.1 No mailbox {pharmacist.address} here"
    (report,) = _reports(gw, doctor.address, "Boite supprimee")
    assert _status_fields(report)["Status"] == "5.1.1"

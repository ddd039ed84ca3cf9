"""``gateway queue``: look into the delivery queue and act on it (mox's verbs).

``list`` and ``show`` explain why a message waits: every recipient with every
attempt (time, MX host, IP, reply, TLS version, next try). ``retry`` makes
open recipients due now, ``hold``/``release`` stop and resume delivery,
``delete`` removes a message (``--bounce`` first tells the sender with a
failure DSN, RFC 3464). Exit codes: 0 done, 1 no such message or refused, 2 usage.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from gateway.cli.common import emit_json, emit_record, emit_rows, json_option, with_services
from gateway.errors import UserError
from gateway.queue.dsn import Action, RecipientReport
from gateway.queue.outbound_store import OutboundStore, _message_work
from gateway.storage.models import utcnow

STATES = ("pending", "deferred", "in-flight", "failed", "delivered", "held")


@click.group()
def queue() -> None:
    """The delivery queue: list, show, retry, hold, release, delete."""


@queue.command("list")
@click.option("--state", type=click.Choice(STATES), help="only messages with a recipient in this state (or held)")
@json_option
def list_(state: str | None, as_json: bool) -> None:
    """Messages in the queue, and those finished within outbound.finished_listed_hours.

    A recipient being delivered right now is ``in-flight``; ``next_attempt_at`` is the
    earliest next attempt of the others, as ``queue show`` gives it per recipient.
    """
    rows = with_services(lambda s: OutboundStore(s.db).list_messages(
        state=state, finished_within=dt.timedelta(hours=s.settings.outbound.finished_listed_hours)))
    emit_rows(rows, ["id", "state", "sender", "received_at", "size", "recipients", "states", "held", "next_attempt_at"],
              as_json=as_json)


@queue.command("show")
@click.argument("queue_id")
@json_option
def show(queue_id: str, as_json: bool) -> None:
    """One message: every recipient with every delivery attempt."""
    record = with_services(lambda s: _show(s, queue_id))
    if as_json:
        emit_json(record)
        return
    recipients = record.pop("recipients")
    emit_record(record, as_json=False)
    for recipient in recipients:
        click.echo(f"\n<{recipient['address']}> {recipient['route']} {recipient['state']}, "
                   f"{recipient['attempts']} attempt(s), {_next(recipient)}")
        if recipient["last_error"]:
            click.echo(f"  last error: {recipient['last_error']}")
        for attempt in recipient["history"]:
            click.echo(f"  {_when(attempt['at'])}  {attempt['outcome']:<9} {_hop(attempt)}{attempt['reply']}  "
                       f"(next: {_when(attempt['next_attempt_at'])})")


def _next(recipient: dict[str, Any]) -> str:
    if recipient["lease_until"] is not None:
        return f"being delivered now (tried again at {_when(recipient['lease_until'])} if that attempt never ends)"
    return f"next: {_when(recipient['next_attempt_at'])}"


def _hop(attempt: dict[str, Any]) -> str:
    """Where the attempt went and how, when it got that far: a DNS failure reached no host, and its reply names it."""
    if not attempt["mx"] and not attempt["ip"]:
        return ""
    return f"{attempt['mx'] or '-'}[{attempt['ip'] or '-'}] {attempt['tls'] or 'no TLS'}: "


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


async def _show(services: Any, queue_id: str) -> dict[str, Any]:
    record = await OutboundStore(services.db).show(queue_id)
    if record is None:
        raise UserError(f"no message {queue_id} in the queue", field="queue_id")
    return record


@queue.command("retry")
@click.argument("queue_id", required=False)
@click.option("--all", "all_", is_flag=True, help="every queued message")
def retry(queue_id: str | None, all_: bool) -> None:
    """Try a message (or all) again now, whatever the backoff table says."""
    if bool(queue_id) == all_:
        raise click.UsageError("give a queue id or --all")
    count = with_services(lambda s: _retry(s, queue_id))
    click.echo(f"{count} recipient(s) due now")


async def _retry(services: Any, queue_id: str | None) -> int:
    store = OutboundStore(services.db)
    if queue_id is not None and await store.message(queue_id) is None:
        raise UserError(f"no message {queue_id} in the queue", field="queue_id")
    return await store.retry([queue_id] if queue_id else None)


@queue.command("hold")
@click.argument("queue_id")
def hold(queue_id: str) -> None:
    """Stop delivering a message until it is released."""
    with_services(lambda s: _set_held(s, queue_id, True))
    click.echo(f"{queue_id} held")


@queue.command("release")
@click.argument("queue_id")
def release(queue_id: str) -> None:
    """Resume delivery of a held message (its open recipients are due at once)."""
    with_services(lambda s: _set_held(s, queue_id, False))
    click.echo(f"{queue_id} released")


async def _set_held(services: Any, queue_id: str, held: bool) -> None:
    if not await OutboundStore(services.db).set_held(queue_id, held):
        raise UserError(f"no queued message {queue_id}", field="queue_id")


@queue.command("delete")
@click.argument("queue_id")
@click.option("--bounce", is_flag=True, help="send the sender a failure DSN for the recipients not yet delivered")
def delete(queue_id: str, bounce: bool) -> None:
    """Remove a message from the queue (by default silently)."""
    reported = with_services(lambda s: _delete(s, queue_id, bounce))
    click.echo(f"{queue_id} deleted" + (", sender notified" if reported else ""))


async def _delete(services: Any, queue_id: str, bounce: bool) -> bool:
    from gateway.queue.spool import Spool
    from gateway.smtp.listeners import spool_root
    from gateway.queue.generated import GeneratedMailQueue
    from gateway.queue.outbound import DsnReports

    store = OutboundStore(services.db)
    message = await store.message(queue_id)
    if message is None:
        raise UserError(f"no message {queue_id} in the queue", field="queue_id")
    spool = Spool(spool_root(services.settings))
    rows = None
    if bounce:
        reports = [RecipientReport(final_recipient=r.address, action=Action.FAILED, status="5.3.0",
                                   diagnostic="deleted from the queue by the administrator", original_recipient=r.orcpt,
                                   last_attempt=utcnow()) for r in await store.open_recipients(queue_id)]
        generated = GeneratedMailQueue(services.settings, services.directory, spool, schedule_local=None)
        rows = await DsnReports(services.settings, generated, spool).prepare(_message_work(message), reports)
    await store.delete(queue_id, rows)
    spool.remove(queue_id)
    return rows is not None

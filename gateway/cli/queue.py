"""``gateway queue``: look into the delivery queue and act on it (mox's verbs).

``list`` and ``show`` explain why a message waits: every recipient with every
attempt (time, MX host, IP, reply, TLS version, next try). ``retry`` makes
open recipients due now, ``hold``/``release`` stop and resume delivery,
``delete`` removes a message (``--bounce`` first tells the sender with a
failure DSN, RFC 3464), ``purge`` removes finished work past its window. Each command calls one method of the queue
(``services.queue``, gateway.queue.service.MailQueue) and prints its answer.
Exit codes: 0 done, 1 no such message or refused, 2 usage.
"""

from __future__ import annotations

from typing import Any

import click

from gateway.cli.common import emit_json, emit_record, emit_rows, json_option, with_services

STATES = ("pending", "deferred", "in-flight", "failed", "delivered", "held")


@click.group()
def queue() -> None:
    """The delivery queue: list, show, retry, hold, release, delete, purge."""


@queue.command("list")
@click.option("--state", type=click.Choice(STATES), help="only messages with a recipient in this state (or held)")
@json_option
def list_(state: str | None, as_json: bool) -> None:
    """Messages in the queue, and those finished within outbound.finished_listed_hours.

    A recipient being delivered right now is ``in-flight``; ``next_attempt_at`` is the
    earliest next attempt of the others, as ``queue show`` gives it per recipient.
    """
    rows = with_services(lambda s: s.queue.list(state=state))
    emit_rows(rows, ["id", "state", "sender", "received_at", "size", "recipients", "states", "held", "next_attempt_at"],
              as_json=as_json)


@queue.command("show")
@click.argument("queue_id")
@json_option
def show(queue_id: str, as_json: bool) -> None:
    """One message: every recipient with every delivery attempt."""
    record = with_services(lambda s: s.queue.show(queue_id))
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


@queue.command("retry")
@click.argument("queue_id", required=False)
@click.option("--all", "all_", is_flag=True, help="every queued message")
def retry(queue_id: str | None, all_: bool) -> None:
    """Try a message (or all) again now, whatever the backoff table says."""
    if bool(queue_id) == all_:
        raise click.UsageError("give a queue id or --all")
    count = with_services(lambda s: s.queue.retry(queue_id))
    click.echo(f"{count} recipient(s) due now")


@queue.command("hold")
@click.argument("queue_id")
def hold(queue_id: str) -> None:
    """Stop delivering a message until it is released."""
    with_services(lambda s: s.queue.hold(queue_id))
    click.echo(f"{queue_id} held")


@queue.command("release")
@click.argument("queue_id")
def release(queue_id: str) -> None:
    """Resume delivery of a held message (its open recipients are due at once)."""
    with_services(lambda s: s.queue.release(queue_id))
    click.echo(f"{queue_id} released")


@queue.command("delete")
@click.argument("queue_id")
@click.option("--bounce", is_flag=True, help="send the sender a failure DSN for the recipients not yet delivered")
def delete(queue_id: str, bounce: bool) -> None:
    """Remove a message from the queue (by default silently)."""
    reported = with_services(lambda s: s.queue.delete(queue_id, bounce=bounce))
    click.echo(f"{queue_id} deleted" + (", sender notified" if reported else ""))


@queue.command("purge")
@click.option("--dry-run", is_flag=True, help="count what would be removed, remove nothing")
@json_option
def purge(dry_run: bool, as_json: bool) -> None:
    """Remove finished work now, as `gateway serve` does every retention.purge_interval_minutes: the rows of
    messages finished more than outbound.finished_listed_hours ago, and filing jobs finished more than
    retention.filing_jobs_kept_hours ago. Messages still queued (pending, deferred, in flight, held) stay."""
    from gateway.queue.purge import describe_rows

    report = with_services(lambda s: s.queue.purge(dry_run=dry_run))
    if as_json:
        emit_json({"dry_run": report.dry_run, "cutoff": report.cutoff, "removed": report.count.removed,
                   "kept": report.count.kept})
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb}: {describe_rows(report.count.removed)} "
               f"(messages finished before {report.cutoff.isoformat(timespec='seconds')})")
    for reason, count in sorted(report.count.kept.items()):
        click.echo(f"kept {count} finished message(s): {reason}")

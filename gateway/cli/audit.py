"""``gateway audit``: verify, export and read the hash-chained access log.

Reading the log is itself logged: ``verify``, ``export`` and ``list --patient``
append an entry naming the operating-system user who ran them, so a patient
sees when an administrator looked at their history. ``verify-export`` works on
a file alone (an auditor's machine needs no database and no key).
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
from pathlib import Path
from typing import Any

import click

from gateway.audit import (
    Actor,
    AuditEntry,
    AuditEvent,
    AuditKey,
    AuditLog,
    Door,
    Outcome,
    Source,
    Subject,
    VerifyReport,
    verify_export,
)
from gateway.audit.export import EXPORT_FORMATS, ExportSummary
from gateway.audit.log import AuditChainConflict
from gateway.cli.common import (
    emit_json,
    emit_record,
    emit_rows,
    encrypt_to_option,
    json_option,
    run,
    text_stream,
    user_errors,
    with_services,
)
from gateway.errors import UserError
from gateway.security.openpgp import OpenPgpRecipient, encrypted_output

LIST_COLUMNS = ["seq", "at", "event", "actor", "patient", "subject", "outcome", "door"]


@click.group()
def audit() -> None:
    """The access log: every filing, read, hide, block and emergency access, hash-chained."""


@audit.command("verify")
@click.option("--from", "from_seq", type=click.IntRange(min=1), help="start at this entry (trusting the one before)")
@json_option
def verify(from_seq: int | None, as_json: bool) -> None:
    """Check the whole chain; exit 1 naming the first broken entry and what happened to it."""
    report: VerifyReport = with_services(lambda services: _verify(services, from_seq))
    if as_json:
        emit_json(report.as_dict())
    elif report.ok:
        click.echo(f"audit log {report.summary()}")
    if not report.ok:
        raise click.ClickException(f"audit log {report.summary()}")


@audit.command("export")
@click.argument("file", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="jsonl", show_default=True,
              help="jsonl carries a header and trailer for a complete offline check; csv is for spreadsheets")
@click.option("--patient", metavar="INS", help="only this patient's entries")
@click.option("--since", metavar="DATE", help="from the first entry at or after DATE (YYYY-MM-DD or ISO 8601; UTC if no zone)")
@encrypt_to_option
@json_option
@user_errors
def export(file: Path, fmt: str, patient: str | None, since: str | None, encrypt_to: Path | None,
           as_json: bool) -> None:
    """Write entries with their hashes, for an auditor to re-verify with ``verify-export``."""
    since_at = parse_since(since) if since else None
    result: tuple[ExportSummary, OpenPgpRecipient | None] = with_services(
        lambda services: _export(services, file, fmt, patient, since_at, encrypt_to))
    summary, recipient = result
    if as_json:
        emit_json({**summary.as_dict(), "file": str(file),
                   "encrypted_to": recipient.fingerprint if recipient else None})
        return
    span = f" (entries {summary.first_seq}..{summary.last_seq})" if summary.entries else ""
    sealed = f", encrypted to {recipient.describe()}" if recipient else ""
    click.echo(f"exported {summary.entries} entries{span} to {file}{sealed}")


@audit.command("verify-export")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="the audit key file, to check the seals as well (operator side)")
@json_option
@user_errors
def verify_export_command(file: Path, key_file: Path | None, as_json: bool) -> None:
    """Re-verify an export offline: hashes, links, head and trailer (and seals with --key)."""
    key = _load_key(key_file) if key_file else None
    report = run(verify_export(file, key=key))
    if as_json:
        emit_json(report.as_dict())
    elif report.ok:
        click.echo(f"export {report.summary()}")
    if not report.ok:
        raise click.ClickException(f"export {report.summary()}")


@audit.command("list")
@click.option("--patient", metavar="INS", help="only this patient's entries (logged as a consultation)")
@click.option("--event", "event_names", multiple=True, metavar="NAME", help="event name or number; repeatable")
@click.option("--actor", "actor_id", metavar="ID", help="only this actor (IDNPS, INS, login...)")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--before", "before_seq", type=click.IntRange(min=1), help="entries before this number (next page)")
@json_option
@user_errors
def list_(patient: str | None, event_names: tuple[str, ...], actor_id: str | None, limit: int,
          before_seq: int | None, as_json: bool) -> None:
    """Newest entries first."""
    events = [AuditEvent.from_name(name) for name in event_names]
    entries: list[AuditEntry] = with_services(
        lambda services: _list(services, patient, events, actor_id, limit, before_seq))
    if as_json:
        emit_json([entry_as_json(entry) for entry in entries])
        return
    emit_rows([entry_as_row(entry) for entry in entries], LIST_COLUMNS, as_json=False)


@audit.command("show")
@click.argument("seq", type=click.IntRange(min=1))
@json_option
def show(seq: int, as_json: bool) -> None:
    """One entry with its hashes."""
    entries: list[AuditEntry] = with_services(lambda services: _open_log(services).search(before_seq=seq + 1, limit=1))
    if not entries or entries[0].seq != seq:
        raise click.ClickException(f"seq: no audit entry {seq}")
    emit_record(entry_as_json(entries[0]), as_json=as_json)


def parse_since(value: str) -> dt.datetime:
    """A date (midnight UTC) or an ISO 8601 instant (UTC when it names no zone)."""
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise UserError(f"{value!r} is not a date (YYYY-MM-DD) or an ISO 8601 time", field="since") from None
    return parsed.replace(tzinfo=dt.timezone.utc) if parsed.tzinfo is None else parsed


def entry_as_row(entry: AuditEntry) -> dict[str, Any]:
    subject = f"{entry.subject.kind}:{entry.subject.id}" if entry.subject else None
    outcome = entry.outcome.status if not entry.outcome.reason else f"{entry.outcome.status}: {entry.outcome.reason}"
    return {"seq": entry.seq, "at": entry.occurred_at, "event": entry.event_name,
            "actor": f"{entry.actor.kind}:{entry.actor.display_name} ({entry.actor.id})",
            "patient": entry.patient, "subject": subject, "outcome": outcome, "door": entry.source.door}


def entry_as_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq, "at": entry.occurred_at, "event": entry.event_code, "event_name": entry.event_name,
        "label_fr": entry.label_fr,
        "actor": {"kind": entry.actor.kind, "id": entry.actor.id, "name": entry.actor.display_name,
                  "role": entry.actor.role},
        "patient": entry.patient,
        "subject": {"kind": entry.subject.kind, "id": entry.subject.id} if entry.subject else None,
        "outcome": {"status": entry.outcome.status, "reason": entry.outcome.reason},
        "source": {"door": entry.source.door, "ip": entry.source.ip},
        "details": entry.details, "prev_hash": entry.prev_hash, "entry_hash": entry.entry_hash, "seal": entry.seal,
    }


def _open_log(services: Any) -> AuditLog:
    return AuditLog.for_data_dir(services.db, services.settings.data_path)


def operator_actor() -> Actor:
    """The operating-system user running the command, as the audit log's actor.

    Named from the effective uid's passwd entry, never from ``USER``/``LOGNAME`` (which the caller sets at
    will); the display name adds the uid, and ``SUDO_USER`` when sudo says who asked (as sudo's own log does).
    """
    uid = os.geteuid()
    try:
        login = pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry for this uid (some containers)
        login = f"uid:{uid}"
    display = f"{login} (uid {uid})"
    sudo_user = os.environ.get("SUDO_USER", "")
    if sudo_user and sudo_user != login and sudo_user.isprintable():
        display = f"{login} (uid {uid}, via sudo from {sudo_user[:64]})"
    return Actor.admin(login, display)


async def _verify(services: Any, from_seq: int | None) -> VerifyReport:
    log = _open_log(services)
    report = await log.verify(from_seq=from_seq)
    # A broken chain is the log's integrity failing, not a decision on the operator's request (revision 0023:
    # ``refused`` is a decision, ``error`` a failure inside the server).
    outcome = Outcome.success() if report.ok else Outcome.error(report.summary())
    try:
        await log.append(AuditEvent.AUDIT_VERIFIED, actor=operator_actor(), patient=None, source=Source(Door.CLI),
                         outcome=outcome, details={"checked": report.checked, "from_seq": from_seq or 1})
    except AuditChainConflict:
        if report.ok:
            raise
        # a forged row holds the next number: the report above already says what broke
    return report


async def _export(services: Any, file: Path, fmt: str, patient: str | None, since: dt.datetime | None,
                  encrypt_to: Path | None) -> tuple[ExportSummary, OpenPgpRecipient | None]:
    log = _open_log(services)
    recipient: OpenPgpRecipient | None = None
    if encrypt_to is None:
        summary = await log.export(file, format=fmt, patient=patient, since=since)
    else:
        with encrypted_output(encrypt_to, file) as sink, text_stream(sink.stream) as stream:
            summary = await log.export(stream, format=fmt, patient=patient, since=since)
        recipient = sink.recipient
    details: dict[str, Any] = {**summary.as_dict(), "since": since.isoformat() if since else None,
                               "encrypted_to": recipient.fingerprint if recipient else None}
    await log.append(AuditEvent.AUDIT_EXPORTED, actor=operator_actor(), patient=patient, source=Source(Door.CLI),
                     subject=Subject("file", str(file.resolve())), details=details)
    return summary, recipient


async def _list(services: Any, patient: str | None, events: list[AuditEvent], actor_id: str | None,
                limit: int, before_seq: int | None) -> list[AuditEntry]:
    log = _open_log(services)
    entries = await log.search(patient=patient, events=events, actor_id=actor_id, limit=limit, before_seq=before_seq)
    if patient is not None:
        await log.append(AuditEvent.AUDIT_CONSULTED, actor=operator_actor(), patient=patient, source=Source(Door.CLI),
                         details={"shown": len(entries)})
    return entries


def _load_key(path: Path) -> AuditKey:
    key = AuditKey.load(path)
    if key is None:
        raise click.ClickException(f"key: {path} does not exist")
    return key

"""``gateway mailbox``: create mailboxes, set credentials, delegate, disable, export."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from gateway.audit import AuditEvent, Door, Source, Subject
from gateway.cli.audit import operator_actor
from gateway.cli.common import (
    emit_json,
    emit_record,
    emit_rows,
    encrypt_to_option,
    json_option,
    private_file,
    split_csv,
    user_errors,
    with_services,
)
from gateway.errors import NotFound
from gateway.mailstore.mbox import MboxSummary, write_mbox
from gateway.security.openpgp import OpenPgpRecipient, encrypted_output


@click.group()
def mailbox() -> None:
    """Mailboxes (BAL): personal, organisational, applicative, practice, patient."""


@mailbox.command()
@click.argument("address", required=False)
@click.option("--type", "box_type", required=True, type=click.Choice(["PER", "ORG", "APP", "CAB", "PAT"], case_sensitive=False),
              help="PER personal, ORG organisational, APP applicative, CAB practice, PAT patient (fixed once created)")
@click.option("--owner", required=True, help="IDNPS (PER, CAB), IDNST (ORG, APP) or INS (PAT)")
@click.option("--display-name")
@click.option("--description")
@click.option("--service", help="service de rattachement")
@click.option("--quota-mb", type=click.IntRange(1))
@click.option("--liste-rouge", is_flag=True, help="never published in the national directory")
@click.option("--preferred", is_flag=True, help="BAL préférentielle of its owner")
@click.option("--password-prompt", is_flag=True, help="set a password now, asked on the terminal")
@json_option
def create(address: str | None, box_type: str, owner: str, display_name: str | None, description: str | None,
           service: str | None, quota_mb: int | None, liste_rouge: bool, preferred: bool, password_prompt: bool,
           as_json: bool) -> None:
    """Create a mailbox. ADDRESS is fixed once created (omit it for PAT: <INS>@<patient domain>)."""
    password = click.prompt("Password", hide_input=True, confirmation_prompt=True) if password_prompt else None
    record = with_services(lambda s: s.directory.create_mailbox(
        address=address, type=box_type, owner=owner, display_name=display_name, description=description,
        service=service, quota_mb=quota_mb, liste_rouge=liste_rouge, preferred=preferred, password=password))
    emit_record(record, as_json=as_json)


@mailbox.command("set-password")
@click.argument("address")
@click.option("--password", help="the new password (default: asked on the terminal; or --password-stdin)")
@click.option("--password-stdin", is_flag=True, help="read the password from the first line of standard input")
def set_password(address: str, password: str | None, password_stdin: bool) -> None:
    """Set a mailbox's password (argon2id)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with_services(lambda s: s.directory.set_password(address, password))
    click.echo(f"password of {address} set")


@mailbox.command()
@click.argument("address")
@click.argument("delegate")
@click.option("--rights", multiple=True, default=["read", "send"], show_default=True,
              help="read, send, manage (comma-separated or repeated)")
@click.option("--revoke", is_flag=True, help="remove the delegation instead")
@json_option
def delegate(address: str, delegate: str, rights: tuple[str, ...], revoke: bool, as_json: bool) -> None:
    """Give DELEGATE's account rights on ADDRESS (e.g. a secretary on an organisation mailbox)."""
    if revoke:
        with_services(lambda s: s.directory.revoke_delegation(address, delegate))
        click.echo(f"delegation of {address} to {delegate} revoked")
        return
    record = with_services(lambda s: s.directory.delegate(address, delegate, split_csv(rights)))
    emit_record(record, as_json=as_json)


@mailbox.command()
@click.argument("address")
def disable(address: str) -> None:
    """Disable a mailbox: no login, no delivery (senders get 550 5.2.1)."""
    with_services(lambda s: s.directory.update_mailbox(address, state="disabled"))
    click.echo(f"mailbox {address} disabled")


@mailbox.command()
@click.argument("address")
def enable(address: str) -> None:
    """Enable a disabled mailbox again."""
    with_services(lambda s: s.directory.update_mailbox(address, state="active"))
    click.echo(f"mailbox {address} enabled")


@mailbox.command()
@click.argument("address")
@click.option("--display-name")
@click.option("--description")
@click.option("--service")
@click.option("--quota-mb", type=click.IntRange(1))
@click.option("--liste-rouge/--no-liste-rouge", default=None)
@click.option("--preferred/--no-preferred", default=None)
@json_option
def update(address: str, as_json: bool, **changes: Any) -> None:
    """Change a mailbox's details (address and type are fixed)."""
    record = with_services(lambda s: s.directory.update_mailbox(address, **changes))
    emit_record(record, as_json=as_json)


@mailbox.command()
@click.argument("address")
@json_option
def show(address: str, as_json: bool) -> None:
    """Show a mailbox with its owner and delegations."""
    emit_record(with_services(lambda s: s.directory.show_mailbox(address)), as_json=as_json)


@mailbox.command("list")
@click.option("--domain")
@click.option("--type", "box_type", type=click.Choice(["PER", "ORG", "APP", "CAB", "PAT"], case_sensitive=False))
@click.option("--hosted/--remote", default=None, help="only ours / only other operators' entries")
@click.option("--search", "query", help="substring of the address or display name")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1))
@json_option
def list_(domain: str | None, box_type: str | None, hosted: bool | None, query: str | None, limit: int, as_json: bool) -> None:
    """List mailboxes."""
    rows = with_services(lambda s: s.directory.list_mailboxes(query=query, domain=domain, type=box_type, hosted=hosted, limit=limit))
    emit_rows(rows, ["address", "type", "hosted", "display_name", "state"], as_json=as_json)


@dataclass(frozen=True)
class MailboxExport:
    address: str
    summary: MboxSummary
    recipient: OpenPgpRecipient | None


@mailbox.command("reindex")
@click.argument("address", required=False)
@click.option("--all", "every", is_flag=True, help="every hosted mailbox")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="messages indexed per transaction")
@json_option
@user_errors
def reindex(address: str | None, every: bool, batch: int, as_json: bool) -> None:
    """Recompute the header columns SEARCH compares of messages stored before 8-bit header octets were read
    as text, fill the SEARCH blind index of messages stored before it existed (or whose columns changed), and
    store the ENVELOPE of messages stored before in its current form: rendered, sealed as raw octets
    (resumable: run it again to go on).

    Until a message is indexed, SEARCH unseals its header columns instead; until its ENVELOPE is moved,
    FETCH reads the earlier form (a structure: rendered each time): answers are the same, only slower.
    """
    if (address is None) == (not every):
        raise click.UsageError("give an ADDRESS or --all")
    done: list[tuple[str, int, int, int]] = with_services(lambda services: _reindex(services, address, batch))
    if as_json:
        emit_json([{"address": name, "indexed": count, "envelopes": rendered, "headers_recomputed": recomputed}
                   for name, count, rendered, recomputed in done])
        return
    for name, count, rendered, recomputed in done:
        click.echo(f"{name}: {count} messages indexed, {rendered} ENVELOPEs stored in their current form, "
                   f"{recomputed} messages' header columns recomputed")


async def _reindex(services: Any, address: str | None, batch: int) -> list[tuple[str, int, int, int]]:
    from gateway.mailstore.blind_index import hosted_mailboxes
    from gateway.mailstore.search_columns import reindex_mailbox

    store = services.mailstore
    if store.index is None or store.headers is None:
        raise NotFound("this mail store keeps its header columns in clear: SQL searches them, no index is kept",
                       field="mailstore")
    targets = await hosted_mailboxes(store.database, address)
    if address is not None and not targets:
        raise NotFound(f"no mailbox {address} hosted here", field="address")
    done = []
    for mailbox_id, name in targets:
        report = await reindex_mailbox(store.database, store.blobs, store.headers, store.index, mailbox_id,
                                       batch=batch)
        done.append((name, report.indexed, report.envelopes, report.recomputed))
    return done


@mailbox.command("export")
@click.argument("address")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--folder", "folders", multiple=True, metavar="NAME",
              help="only this folder (repeatable; default: every folder)")
@encrypt_to_option
@json_option
@user_errors
def export(address: str, file: Path, folders: tuple[str, ...], encrypt_to: Path | None, as_json: bool) -> None:
    """Write a hosted mailbox to FILE as an mbox (mboxrd), every message decrypted from the store.

    The export is recorded in the audit log (an administrator's access to a mailbox).
    """
    done: MailboxExport = with_services(lambda services: _export(services, address, file, folders, encrypt_to))
    if as_json:
        emit_json({"address": done.address, "file": str(file), **done.summary.as_dict(),
                   "encrypted_to": done.recipient.fingerprint if done.recipient else None})
        return
    sealed = f", encrypted to {done.recipient.describe()}" if done.recipient else ""
    click.echo(f"exported {done.summary.messages} messages of {done.address} "
               f"({len(done.summary.folders)} folders) to {file}{sealed}")


async def _export(services: Any, address: str, file: Path, folders: tuple[str, ...],
                  encrypt_to: Path | None) -> MailboxExport:
    account = await services.directory.account(address)
    if account is None:
        raise NotFound(f"no mailbox {address} hosted here", field="address")
    recipient: OpenPgpRecipient | None = None
    if encrypt_to is None:
        with private_file(file) as out:
            summary = await write_mbox(services.mailstore, account.mailbox_id, out, folders)
    else:
        with encrypted_output(encrypt_to, file) as sink:
            summary = await write_mbox(services.mailstore, account.mailbox_id, sink.stream, folders)
        recipient = sink.recipient
    await _record_export(services, account.address, file, summary, recipient)
    return MailboxExport(account.address, summary, recipient)


async def _record_export(services: Any, address: str, file: Path, summary: MboxSummary,
                         recipient: OpenPgpRecipient | None) -> None:
    box = await services.directory.show_mailbox(address)
    details = {"action": "export", "file": str(file.resolve()), **summary.as_dict(),
               "encrypted_to": recipient.fingerprint if recipient else None}
    await services.audit.append(AuditEvent.ADMIN_MAILBOX_ACCESS, actor=operator_actor(),
                                patient=box["owner"] if box["type"] == "PAT" else None, source=Source(Door.CLI),
                                subject=Subject("mailbox", address), details=details)

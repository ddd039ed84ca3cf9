"""``gateway mailbox``: create mailboxes, set credentials, delegate, disable."""

from __future__ import annotations

from typing import Any

import click

from gateway.cli.common import emit_record, emit_rows, json_option, split_csv, with_services


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
        password = click.get_text_stream("stdin").readline().rstrip("\r\n")
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

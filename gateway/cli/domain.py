"""``gateway domain``: our local domains and the trust list of other operators' domains."""

from __future__ import annotations

import click

from gateway.cli.common import emit_record, emit_rows, json_option, with_services
from gateway.cli.imports import import_whitelist_command


@click.group()
def domain() -> None:
    """Local domains and the trust list (liste blanche)."""


domain.add_command(import_whitelist_command, "import-whitelist")


@domain.command("add")
@click.argument("name")
@click.option("--patient", "is_patient", is_flag=True, help="a patient domain (<INS>@domain mailboxes)")
@json_option
def add(name: str, is_patient: bool, as_json: bool) -> None:
    """Host a new local domain."""
    record = with_services(lambda s: s.directory.add_local_domain(name, kind="patient" if is_patient else "professional"))
    emit_record(record, as_json=as_json)


@domain.command("remove")
@click.argument("name")
def remove(name: str) -> None:
    """Stop hosting a local domain (refused while it has mailboxes)."""
    with_services(lambda s: s.directory.remove_local_domain(name))
    click.echo(f"local domain {name} removed")


@domain.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List local domains."""
    rows = with_services(lambda s: s.directory.list_local_domains())
    emit_rows(rows, ["name", "kind", "mailboxes", "created_at"], as_json=as_json)


@domain.group()
def trust() -> None:
    """Remote operators' domains we exchange with."""


@trust.command("add")
@click.argument("name")
@click.option("--operator", help="the operator running the domain")
@click.option("--since", help="trusted from (ISO 8601; default now)")
@click.option("--until", help="trusted until (ISO 8601; default open-ended)")
@json_option
def trust_add(name: str, operator: str | None, since: str | None, until: str | None, as_json: bool) -> None:
    """Add or change a trusted domain."""
    record = with_services(lambda s: s.directory.trust_domain(name, operator=operator, since=since, until=until))
    emit_record(record, as_json=as_json)


@trust.command("remove")
@click.argument("name")
def trust_remove(name: str) -> None:
    """Remove a domain from the trust list."""
    with_services(lambda s: s.directory.untrust_domain(name))
    click.echo(f"{name} removed from the trust list")


@trust.command("list")
@json_option
def trust_list(as_json: bool) -> None:
    """List the trust list."""
    rows = with_services(lambda s: s.directory.list_trusted_domains())
    emit_rows(rows, ["name", "operator", "source", "since", "until", "active"], as_json=as_json)

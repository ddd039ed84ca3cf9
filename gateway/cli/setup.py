"""``gateway init``, ``gateway serve``, ``gateway db`` and ``gateway config``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any

import click
from sqlalchemy.engine import make_url

from gateway.cli.common import data_dir_option, emit_json, emit_rows, json_option, run, settings, state, user_errors
from gateway.config import ENV_PREFIX, Settings, describe_settings, load_settings, render_documented_toml
from gateway.errors import UserError


@click.command()
@data_dir_option
@click.option("--demo", is_flag=True, help="also create the demo directory and write <data-dir>/demo.json")
@user_errors
def init(demo: bool) -> None:
    """Prepare the data directory: database schema, test PKI, TLS certificate, local domains."""
    config = settings()
    if demo and (config.data_path / "demo.json").exists():
        raise UserError(f"{config.data_path / 'demo.json'} exists: this data directory already holds the demo "
                        "(remove the directory to start afresh)", field="--demo")
    summary = run(_initialise(config, demo))
    for line in summary:
        click.echo(line)


async def _initialise(config: Settings, demo: bool) -> list[str]:
    from gateway.app import Gateway, open_services
    from gateway.directory.demo import seed_demo_directory

    lines = [f"data directory: {config.data_path}"]
    async with open_services(config) as services:
        lines.append(f"database: {config.database_url.split('@')[-1]} at revision {await services.db.current_revision()}")
        if not services.pki.exists():
            services.pki.init()
            lines.append(f"test PKI created in {config.pki_path}")
        services.pki.ensure_gateway_server_cert(config.hostname, config.pki.server_names, config.pki.server_ips)
        await services.directory.ensure_local_domain(config.directory.professional_domain, kind="professional")
        await services.directory.ensure_local_domain(config.directory.patient_domain, kind="patient")
        lines.append(f"local domains: {config.directory.professional_domain}, {config.directory.patient_domain} (patients)")
        if demo:
            accounts = await seed_demo_directory(services.directory, services.pki, config.directory.professional_domain)
            path = _write_demo_file(config, [a.as_json() for a in accounts], Gateway(config).listeners(), services.pki.ca_bundle_path)
            lines.append(f"demo directory created: {len(accounts)} accounts, listed with their passwords in {path}")
    return lines


def _write_demo_file(config: Settings, accounts: list[dict[str, Any]], listeners: dict[str, Any], ca_path: Path) -> Path:
    path = config.data_path / "demo.json"
    payload = {
        "data_dir": str(config.data_path),
        "hostname": config.hostname,
        "ca_certificate": str(ca_path),
        "listeners": listeners,
        "accounts": accounts,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # holds passwords: owner only
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
    return path


@click.command()
@data_dir_option
@click.option("--only", "only", metavar="ROLES", default=None,
              help="serve only these roles, comma-separated: smtp, imap, https, workers (default: all); "
              "nodes sharing one PostgreSQL database may split them")
# An SMTP acceptor process (smtp.acceptor_processes, gateway.smtp.acceptors): started by ``gateway serve`` only.
@click.option("--acceptor-channel", "acceptor_channel", type=int, default=None, hidden=True)
@click.option("--acceptor-socket", "acceptor_sockets", multiple=True, hidden=True)
@user_errors
def serve(only: str | None, acceptor_channel: int | None, acceptor_sockets: tuple[str, ...]) -> None:
    """Run the gateway's listeners until SIGTERM or Ctrl-C."""
    from gateway.app import Gateway, parse_roles
    from gateway.ops.logs import configure_logging
    from gateway.smtp.acceptors import acceptor_command, inherited_sockets

    roles = parse_roles(only)
    config = settings()
    configure_logging(config.log_level, config.log_format)
    cli = state()
    gateway = Gateway(config, reread_settings=lambda: load_settings(cli.config_file, data_dir=cli.data_dir),
                      roles=roles, acceptor_command=acceptor_command(cli.config_file, cli.data_dir))
    try:
        if acceptor_channel is not None:
            asyncio.run(gateway.run_acceptor(acceptor_channel, inherited_sockets(acceptor_sockets)))
        else:
            asyncio.run(gateway.run())
    except OSError as exc:
        raise UserError(f"cannot start: {exc}") from None


@click.group()
def db() -> None:
    """Database schema."""


@db.command()
@data_dir_option
def upgrade() -> None:
    """Apply pending migrations (serve and init do it too), and check the modes of the whole data directory
    (every blob included: ``gateway serve`` walks the mail's trees whole only once per data directory)."""
    from gateway.storage.db import Database
    from gateway.storage.private import secure_data_dir

    async def go() -> str | None:
        database = Database(settings().database_url)
        try:
            await database.migrate()
            return await database.current_revision()
        finally:
            await database.dispose()

    click.echo(f"schema at revision {run(go())}")
    fixed = secure_data_dir(settings().data_path, whole=True)
    click.echo(f"data directory: {fixed} file and folder modes made private (0600 / 0700)")


@db.command()
@data_dir_option
def current() -> None:
    """Show the schema revision of the database and the newest one this version knows."""
    from gateway.storage.db import Database, head_revision

    async def go() -> str | None:
        database = Database(settings().database_url)
        try:
            return await database.current_revision()
        finally:
            await database.dispose()

    click.echo(f"database: {run(go()) or 'empty'}; this version: {head_revision()}")


@click.group()
def config() -> None:
    """Configuration."""


@config.command()
@json_option
@click.option("--toml", "as_toml", is_flag=True, help="print the documented TOML file (config/gateway.toml)")
def describe(as_json: bool, as_toml: bool) -> None:
    """Every setting with its default, its environment variable and its meaning, fitted to the terminal.

    --toml prints a configuration file to start from; --json is for tools.
    """
    if as_toml:
        click.echo(render_documented_toml(), nl=False)
        return
    rows = [{"key": key, "default": default, "description": text} for key, default, text in describe_settings()]
    if as_json:
        emit_rows(rows, ["key", "default", "description"], as_json=True)
        return
    click.echo(describe_text(rows, shutil.get_terminal_size(fallback=(80, 24)).columns))


def describe_text(rows: list[dict[str, Any]], width: int) -> str:
    """One block per setting: ``key = default``, its environment variable, its meaning wrapped to ``width``."""
    width = max(width, 40)
    blocks = []
    for row in rows:
        key, default = row["key"], row["default"]
        shown = ", ".join(str(item) for item in default) if isinstance(default, list) else _toml_scalar(default)
        variable = ENV_PREFIX + key.replace(".", "_").upper()
        lines = [f"{key} = {shown}" if shown else f"{key} = (empty)", f"    env: {variable}"]
        lines += textwrap.wrap(row["description"], width=width, initial_indent="    ", subsequent_indent="    ")
        blocks.append("\n".join(lines))
    footer = ("Lists are written as shown (comma-separated) or as a JSON array, in the environment too. "
              "`gateway config describe --toml` prints a documented configuration file; --json is for tools.")
    return "\n\n".join(blocks) + "\n\n" + "\n".join(textwrap.wrap(footer, width=width))


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _masked(effective: dict[str, Any]) -> dict[str, Any]:
    """The settings as printed: the database password and the OpenID client secret never reach a terminal or a log."""
    database = effective.get("database", {})
    if database.get("url"):
        database["url"] = make_url(database["url"]).render_as_string(hide_password=True)
    webmail = effective.get("webmail", {})
    if webmail.get("oidc_client_secret"):
        webmail["oidc_client_secret"] = "***"
    return effective


@config.command()
@data_dir_option
@json_option
@user_errors
def check(as_json: bool) -> None:
    """Validate the configuration (file + environment) and print the effective values (secrets masked); the
    tls.* server certificate files, when set, are checked as `gateway serve` checks them."""
    from gateway.security.server_identity import load_external_identity

    config = settings()
    if config.tls.server_certificate_file:
        load_external_identity(config.tls, config.hostname, work_dir=None)
    effective = _masked(config.model_dump())
    if as_json:
        emit_json(effective)
    else:
        click.echo("configuration is valid")
        for section, values in effective.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    click.echo(f"{section}.{key} = {value!r}")
            else:
                click.echo(f"{section} = {values!r}")

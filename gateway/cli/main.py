"""The ``gateway`` command: one group, one module per family of subcommands."""

from __future__ import annotations

import importlib

import click

from gateway import __version__
from gateway.cli.common import state
from gateway.storage.private import restrict_umask

# (module, attribute) of every subcommand family, registered below.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("gateway.cli.setup", "init"),
    ("gateway.cli.setup", "serve"),
    ("gateway.cli.setup", "db"),
    ("gateway.cli.setup", "config"),
    ("gateway.cli.directory", "directory"),
    ("gateway.cli.domain", "domain"),
    ("gateway.cli.mailbox", "mailbox"),
    ("gateway.cli.certs", "certs"),
    ("gateway.cli.audit", "audit"),
    ("gateway.cli.queue", "queue"),
    ("gateway.cli.dkim", "dkim"),
    ("gateway.cli.smime", "smime"),
    ("gateway.cli.keys", "keys"),
    ("gateway.cli.record", "record"),
    ("gateway.cli.status", "status"),
    ("gateway.cli.backup", "backup"),
    ("gateway.cli.blobs", "blobs"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), envvar="GATEWAY_CONFIG",
              help="TOML configuration file (default: <data-dir>/gateway.toml if present, else built-in defaults)")
@click.option("--data-dir", type=click.Path(file_okay=False), help="data directory (overrides the configuration)")
@click.version_option(__version__, prog_name="gateway")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, data_dir: str | None) -> None:
    """Secure health messaging gateway (MSSanté-style operator): administration and server."""
    current = state(ctx)
    current.config_file = config_file
    current.data_dir = data_dir


def _register() -> None:
    for module_name, attribute in SUBCOMMANDS:
        cli.add_command(getattr(importlib.import_module(module_name), attribute))


_register()


def main() -> None:
    # Every file the gateway writes is private to its user, whatever umask it was started with.
    restrict_umask()
    cli(prog_name="gateway")

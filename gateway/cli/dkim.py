"""``gateway dkim``: DKIM keys of our domains (RFC 6376), and checking a message's signatures."""

from __future__ import annotations

import asyncio
import sys
from typing import BinaryIO

import click

from gateway.cli.common import emit_rows, json_option, settings, user_errors, emit_json
from gateway.security.dkim import DkimKeys, key_directory, verify_dkim


@click.group()
def dkim() -> None:
    """DKIM keys and verification."""


@dkim.command("keygen")
@click.argument("domain")
@click.option("--selector", help="DNS label of the key (default: dkim.selector from the configuration)")
@click.option("--replace", is_flag=True, help="overwrite an existing key of that selector")
@json_option
@user_errors
def keygen(domain: str, selector: str | None, replace: bool, as_json: bool) -> None:
    """Create an RSA 2048 signing key for DOMAIN and print the TXT record to publish."""
    current = settings()
    key = DkimKeys(key_directory(current)).generate(domain, selector or current.dkim.selector, replace=replace)
    if as_json:
        emit_json({"domain": key.domain, "selector": key.selector, "path": str(key.path), "name": key.dns_name,
                   "txt": key.txt_record})
        return
    click.echo(f"private key: {key.path} (mode 0600)")
    click.echo("publish this record, then mail from this domain is signed:")
    click.echo(key.zone_line())


@dkim.command("list")
@json_option
@user_errors
def list_(as_json: bool) -> None:
    """Keys in the key directory, with their TXT records."""
    keys = DkimKeys(key_directory(settings())).list()
    rows = [{"domain": k.domain, "selector": k.selector, "name": k.dns_name, "path": str(k.path), "txt": k.txt_record}
            for k in keys]
    emit_rows(rows, ["domain", "selector", "name", "path"], as_json=as_json)


@dkim.command("verify")
@click.argument("message", type=click.File("rb"), default="-")
def verify(message: BinaryIO) -> None:
    """Verify the DKIM signatures of a message file (or stdin): prints the Authentication-Results
    fragment; exit 0 when every signature passes, 1 otherwise."""
    data = message.read() if message is not None else sys.stdin.buffer.read()
    result = asyncio.run(verify_dkim(data, settings=settings().outbound))
    click.echo(result)
    outcomes = [part.strip().split(" ", 1)[0] for part in result.split(";")]
    if not outcomes or any(outcome != "dkim=pass" for outcome in outcomes):
        sys.exit(1)

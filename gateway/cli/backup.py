"""``gateway backup create|verify|restore``: a backup directory (database, blobs, spool, PKI, DKIM keys, wrapped
data keys inside the database) without the key-encryption keys, which are kept apart (see gateway/ops/backup.py).
Exit codes: 0 done, 1 refused (a non-empty destination, a backup that does not verify), 2 usage."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.common import data_dir_option, emit_record, json_option, run, settings, user_errors


@click.group()
def backup() -> None:
    """Back up and restore a data directory and its database (key-encryption keys kept apart)."""


@backup.command("create")
@click.argument("destination", type=click.Path(file_okay=False, path_type=Path))
@data_dir_option
@json_option
@user_errors
def create(destination: Path, as_json: bool) -> None:
    """Write a backup into DESTINATION (a new directory), online: the gateway may keep serving."""
    from gateway.ops.backup import create as create_backup

    emit_record(run(create_backup(settings(), destination.resolve())), as_json=as_json)


@backup.command("verify")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the kept-apart keys/ directory: also check that every wrapped data key unwraps")
@json_option
@user_errors
def verify(source: Path, keys_dir: Path | None, as_json: bool) -> None:
    """Check every file against the manifest, the database copy's integrity, and no key-encryption key inside."""
    from gateway.ops.backup import verify as verify_backup

    emit_record(verify_backup(source.resolve(), keys_dir), as_json=as_json)


@backup.command("restore")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the kept-apart keys/ directory to copy into the restored data directory")
@data_dir_option
@json_option
@user_errors
def restore(source: Path, keys_dir: Path | None, as_json: bool) -> None:
    """Restore SOURCE into an empty data directory and an empty database (verified first)."""
    from gateway.ops.backup import restore as restore_backup

    emit_record(restore_backup(settings(), source.resolve(), keys_dir), as_json=as_json)

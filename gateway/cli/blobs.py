"""``gateway blobs``: the encrypted blob store's housekeeping."""

from __future__ import annotations

import click

from gateway.cli.common import emit_json, json_option, user_errors, with_services


@click.group()
def blobs() -> None:
    """The encrypted blob store (message bodies, filed documents, S/MIME decrypted copies)."""


@blobs.command("sweep")
@click.option("--dry-run", is_flag=True, help="count what would be removed, remove nothing")
@json_option
@user_errors
def sweep(dry_run: bool, as_json: bool) -> None:
    """Remove blob files no row refers to, as `gateway serve` does every retention.blob_sweep_interval_hours:
    bodies a crash left behind (between a write and its row's commit, or a deletion's commit and the file's
    removal). Only files older than retention.blob_orphan_min_age_hours are judged."""
    from gateway.app import blob_sweep

    report = with_services(lambda services: blob_sweep(services).sweep(dry_run=dry_run))
    count = report.count
    if as_json:
        emit_json({"dry_run": report.dry_run, "older_than": report.older_than, "examined": count.examined,
                   "referenced": count.referenced, "young": count.young, "removed": count.removed,
                   "removed_bytes": count.removed_bytes, "temporary": count.temporary})
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb}: {count.removed} blob file(s) no row refers to ({count.removed_bytes} bytes) and "
               f"{count.temporary} half-written file(s), older than {report.older_than.isoformat(timespec='seconds')}; "
               f"{count.referenced} in use, {count.young} too young to judge")

"""Import commands: the ANS directory extraction and the ANS whitelist.

``import_ans_command`` is attached as ``gateway directory import-ans`` and
``import_whitelist_command`` as ``gateway domain import-whitelist``. Rejected rows
are reported, not fatal: the command exits 0 when the file could be read, and 1
when the file as a whole is refused (unreadable, wrong header, not a whitelist).
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gateway.cli.common import emit_json, emit_record, emit_rows, json_option, run, settings
from gateway.directory.addresses import display_domain
from gateway.directory.ans_import import DEFAULT_BATCH_SIZE, ImportReport, RejectedRow, import_ans_extraction
from gateway.directory.whitelist import WhitelistReport, import_whitelist
from gateway.storage.db import Database

REJECTS_ON_SCREEN = 50
REJECT_COLUMNS = ("line", "address", "column", "reason")


@asynccontextmanager
async def _database() -> AsyncIterator[Database]:
    config = settings()
    db = Database(config.database_url, echo=config.database.echo)
    try:
        await db.migrate()
        yield db
    finally:
        await db.dispose()


class _ProgressBar:
    """A rich progress bar on stderr, shown from the first report on (a refused file shows none)."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("[bold]importing[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        )
        self.task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("import", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


async def _import_with_progress(path: Path, batch_size: int) -> ImportReport:
    async with _database() as db:
        bar = _ProgressBar()
        try:
            return await import_ans_extraction(db, path, progress=bar, batch_size=batch_size)
        finally:
            bar.close()


def _write_rejects_csv(path: Path, rejects: list[RejectedRow]) -> None:
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(REJECT_COLUMNS)
        for reject in rejects:
            writer.writerow([reject.line, reject.address, reject.column or "", reject.reason])


def _show_ans_report(report: ImportReport, rejects_file: Path | None) -> None:
    summary = report.summary()
    advice = summary.pop("advice")
    emit_record({"file": summary.pop("path"), **summary}, as_json=False)
    if not report.rejects:
        return
    click.echo()
    shown = [{"line": r.line, "address": r.address, "column": r.column or "(row)", "reason": r.reason}
             for r in report.rejects[:REJECTS_ON_SCREEN]]
    complete = len(shown) == report.rejected
    title = f"rejected rows ({report.rejected})" if complete else f"rejected rows: the first {len(shown)} of {report.rejected}"
    emit_rows(shown, REJECT_COLUMNS, as_json=False, title=title)
    if rejects_file is not None:
        click.echo(f"all {report.rejected} rejected rows are in {rejects_file} (CSV: {', '.join(REJECT_COLUMNS)})")
    elif not complete:
        click.echo(f"... and {report.rejected - len(shown)} more: run again with --rejects-file FILE.csv to get "
                   "them all (or --json)")
    if advice:
        click.echo()
        click.echo(advice)


@click.command("import-ans")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rejects-file", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="write every rejected row to this CSV file (line, address, column, reason)")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="rows written per transaction (a running gateway waits for the database while one is written: "
                   "a smaller batch shortens that wait, a larger one makes the import faster)")
@json_option
def import_ans_command(file: Path, rejects_file: Path | None, batch_size: int, as_json: bool) -> None:
    """Import an ANS MSSanté directory extraction (31 columns separated by '|').

    Idempotent: importing the same file again changes nothing. Rows that cannot be
    imported are listed with their line, column and reason; the command still exits 0.
    """
    report = run(_import_with_progress(file, batch_size))
    if rejects_file is not None:
        _write_rejects_csv(rejects_file, report.rejects)
    if as_json:
        emit_json(report.as_dict())
    else:
        _show_ans_report(report, rejects_file)


def _show_names(title: str, names: list[str]) -> None:
    if names:
        click.echo(f"{title}: " + ", ".join(display_domain(name) for name in names))


def _show_whitelist_report(report: WhitelistReport) -> None:
    emit_record(report.summary(), as_json=False)
    _show_names("added", report.added)
    _show_names("reopened", report.reopened)
    _show_names("removed", report.removed)
    if report.invalid:
        emit_rows([{"name": item.name, "reason": item.reason} for item in report.invalid], ("name", "reason"),
                  as_json=False, title="invalid names (ignored)")


async def _whitelist(path: Path, operator: str | None) -> WhitelistReport:
    async with _database() as db:
        return await import_whitelist(db, path, operator=operator)


@click.command("import-whitelist")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--operator", help="operator name recorded on the domains this import adds")
@json_option
def import_whitelist_command(file: Path, operator: str | None, as_json: bool) -> None:
    """Load the ANS whitelist XML into the trust list.

    New domains are added, domains no longer listed are closed (never the ones added
    by hand), and names are compared in their IDNA form.
    """
    report = run(_whitelist(file, operator))
    if as_json:
        emit_json(report.as_dict())
    else:
        _show_whitelist_report(report)


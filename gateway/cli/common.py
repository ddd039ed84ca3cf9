"""What every CLI command shares: settings, services, output, exit codes.

Exit codes: 0 done, 1 user error (one line on stderr naming the field),
2 usage error (click's own). ``--json`` on listings prints machine-readable
output on stdout; tables are for people.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click
from rich.console import Console
from rich.table import Table

from gateway.config import Settings, load_settings
from gateway.errors import UserError

T = TypeVar("T")


@dataclass
class CliState:
    """Held in click's context object: global options, settings loaded lazily."""

    config_file: str | None = None
    data_dir: str | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file, data_dir=self.data_dir)
        return self._settings


def state(ctx: click.Context | None = None) -> CliState:
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    if root.obj is None:
        root.obj = CliState()
    state: CliState = root.obj
    return state


def settings(ctx: click.Context | None = None) -> Settings:
    return state(ctx).settings


def data_dir_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--data-dir`` accepted on a subcommand too (``gateway serve --data-dir D``)."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            state(ctx).data_dir = value
        return value

    return click.option(
        "--data-dir", type=click.Path(file_okay=False), expose_value=False, callback=remember,
        is_eager=True, help="data directory (overrides the configuration)",
    )(func)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")(func)


def encrypt_to_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--encrypt-to KEYFILE.asc``: an export encrypted to an OpenPGP key (the plaintext never reaches the disk)."""
    return click.option(
        "--encrypt-to", "encrypt_to", type=click.Path(path_type=Path), metavar="KEYFILE.asc",
        help="encrypt the file to this OpenPGP public key (ASCII-armoured), for mail or USB transport",
    )(func)


@contextlib.contextmanager
def text_stream(binary: BinaryIO) -> Iterator[io.TextIOWrapper]:
    """UTF-8 text over a binary stream the caller keeps (flushed, then detached: never closed here)."""
    text = io.TextIOWrapper(binary, encoding="utf-8", newline="", write_through=True)
    try:
        yield text
        text.flush()
    finally:
        text.detach()


@contextlib.contextmanager
def private_file(target: Path) -> Iterator[BinaryIO]:
    """Write beside ``target`` (mode 0600: health data), fsync, then rename: nobody sees half a file."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise UserError(f"cannot write beside {target}: {exc.strerror}", field="file") from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine for a CLI command; UserError becomes exit 1 with its message."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except UserError as exc:
        raise click.ClickException(str(exc)) from None


def with_services(action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(services)`` with every service open on a migrated database."""
    from gateway.app import open_services  # the app imports every service: load it only when a command runs

    async def runner() -> T:
        async with open_services(settings()) as services:
            return await action(services)

    return run(runner())


def user_errors(func: Callable[..., T]) -> Callable[..., T]:
    """Decorator for synchronous commands: UserError -> exit 1 with a one-line message."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def _jsonable(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=_jsonable))


def emit_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool, title: str | None = None) -> None:
    """A listing: JSON array of objects, or a table of the chosen columns."""
    if as_json:
        emit_json(list(rows))
        return
    if not rows:
        click.echo("(none)")
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


def emit_record(record: dict[str, Any], *, as_json: bool) -> None:
    """One object: JSON, or aligned ``key: value`` lines."""
    if as_json:
        emit_json(record)
        return
    width = max((len(k) for k in record), default=0)
    for key, value in record.items():
        click.echo(f"{key.ljust(width)}  {_cell(value)}")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def echo_done(message: str) -> None:
    click.echo(message)


def split_csv(values: Iterable[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]

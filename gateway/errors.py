"""Errors shared by every layer.

A ``UserError`` is a refusal the user can fix: the CLI prints its message on one
line and exits 1; protocol front ends map their own subclasses to wire replies.
Anything else escaping a command is a bug and is logged with its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """A refusal with a message fit to show as is. ``field`` names the culprit, when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.field}: {message}" if self.field and not message.startswith(f"{self.field}:") else message


class NotFound(UserError):
    """The named object does not exist."""


class Conflict(UserError):
    """The change would break a uniqueness or state rule (duplicate address, fixed field...)."""


def read_named_file(path: Path, field: str, what: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a file the operator named in ``field`` (a setting, a CLI option); each way it can fail
    (missing, a directory, unreadable, too large) is a UserError naming the field, the path and ``what``
    the file should hold."""
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise UserError(f"{path} is larger than {max_bytes} bytes: not {what}", field=field)
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist ({what})", field=field) from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not {what}", field=field) from None
    except PermissionError:
        raise UserError(f"{path} cannot be read by the gateway's user (uid {os.getuid()}): give it read access "
                        f"({what})", field=field) from None
    except OSError as error:
        raise UserError(f"{path} cannot be read: {error.strerror or error}", field=field) from None

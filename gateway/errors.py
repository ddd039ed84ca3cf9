"""Errors shared by every layer.

A ``UserError`` is a refusal the user can fix: the CLI prints its message on one
line and exits 1; protocol front ends map their own subclasses to wire replies.
Anything else escaping a command is a bug and is logged with its traceback.
"""

from __future__ import annotations


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

"""A mailbox written as one mboxrd file, read through the ``MailStore`` interface.

Every message is read from the blob store (decrypted there: encryption at rest) chunk by chunk,
never whole in memory. The format is mboxrd: a ``From sender date`` separator line, lines
beginning with ``>*From `` quoted by one more ``>``, LF line ends, a blank line after each
message. Each message is preceded by three header fields mail clients understand: the folder
it was in (``X-Gateway-Folder``), and its flags as ``Status`` / ``X-Status`` (mutt, Thunderbird).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from gateway.errors import UserError
from gateway.mailstore import names
from gateway.mailstore.interface import (
    ANSWERED,
    DELETED,
    DRAFT,
    FLAGGED,
    SEEN,
    FolderRef,
    MailStore,
    MessageMeta,
    UidSet,
)

ALL_UIDS = UidSet.of((1, 2**32 - 1))  # RFC 3501 2.3.1.1: UIDs are 32-bit
_QUOTED = re.compile(rb"^>*From ")
_X_STATUS = ((ANSWERED, "A"), (FLAGGED, "F"), (DRAFT, "T"), (DELETED, "D"))


@dataclass
class MboxSummary:
    messages: int = 0
    bytes_written: int = 0
    folders: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"messages": self.messages, "bytes": self.bytes_written, "folders": dict(self.folders)}


async def write_mbox(store: MailStore, mailbox_id: int, out: BinaryIO,
                     folders: Sequence[str] = ()) -> MboxSummary:
    """Write the named folders (all of them when none is named), oldest UID first, into ``out``."""
    names = await _chosen_folders(store, mailbox_id, folders)
    writer = _MboxWriter(out)
    for name in names:
        ref = FolderRef(mailbox_id, name)
        for meta in await store.fetch(ref, ALL_UIDS):
            async with await store.open_message(ref, meta.uid) as body:
                await writer.message(name, meta, body.chunks())
        writer.summary.folders[name] = writer.summary.folders.get(name, 0)
    return writer.summary


async def _chosen_folders(store: MailStore, mailbox_id: int, wanted: Sequence[str]) -> list[str]:
    existing = [info.name for info in await store.list_folders(mailbox_id)]
    if not wanted:
        return existing
    by_key = {_folder_key(name): name for name in existing}
    missing = [name for name in wanted if _folder_key(name) not in by_key]
    if missing:
        raise UserError(f"no folder {missing[0]!r} in this mailbox (it has: {', '.join(existing)})", field="folder")
    return list(dict.fromkeys(by_key[_folder_key(name)] for name in wanted))


def _folder_key(name: str) -> str:
    return names.fold_inbox(name)  # RFC 3501 5.1: INBOX is case-insensitive


class _MboxWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.summary = MboxSummary()

    async def message(self, folder: str, meta: MessageMeta, chunks: AsyncIterator[bytes]) -> None:
        self._write(separator_line(meta.from_addr, meta.internaldate))
        self._write(extra_fields(folder, meta.flags))
        pending = b""
        async for chunk in chunks:
            *lines, pending = (pending + chunk).split(b"\n")
            self._write(b"".join(quote_line(line) for line in lines))
        if pending:
            self._write(quote_line(pending))
        self._write(b"\n")
        self.summary.messages += 1
        self.summary.folders[folder] = self.summary.folders.get(folder, 0) + 1

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.summary.bytes_written += len(data)


def separator_line(sender: str | None, when: dt.datetime) -> bytes:
    """``From sender asctime-date``; the sender stands alone (no spaces), MAILER-DAEMON when unknown."""
    address = (sender or "").strip()
    if not address or any(char.isspace() for char in address) or not address.isascii():
        address = "MAILER-DAEMON"
    utc = when.astimezone(dt.timezone.utc) if when.tzinfo else when
    return f"From {address} {utc:%a %b} {utc.day:2d} {utc:%H:%M:%S %Y}\n".encode("ascii")


def extra_fields(folder: str, flags: frozenset[str]) -> bytes:
    status = "RO" if SEEN in flags else "O"
    x_status = "".join(letter for flag, letter in _X_STATUS if flag in flags)
    lines = [f"X-Gateway-Folder: {folder}", f"Status: {status}"] + ([f"X-Status: {x_status}"] if x_status else [])
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def quote_line(line: bytes) -> bytes:
    """One line (without its LF), CR stripped, ``>*From `` quoted (mboxrd), with an LF."""
    line = line[:-1] if line.endswith(b"\r") else line
    return (b">" + line if _QUOTED.match(line) else line) + b"\n"

"""Folder indexes loaded at start, so the first SELECT after a restart finds its folder's index ready.

Loading a 100,000-message folder's index (``gateway.mailstore.index``) reads two covering indexes whole:
some 100 ms of CPU and, on a cold page cache, several hundred ms of disk; the first SELECT of that folder
after a start paid for it. Clients reconnect at once after a restart and SELECT the folders they had open,
so the folders whose index was in memory before are the ones to load again: their ids, most recently used
first, are remembered in a small file (``run/imap-index-folders.json`` of the data directory: folder ids
only, nothing of the mail) when IMAP stops and every few minutes (a kill -9 loses at most that much), and
loaded in the background after the listeners open, within a budget of messages
(``imap.index_preload_messages``; an index costs some 16 octets per message). Without a file (the first
start of a data directory) the largest folders, the slowest to load, are preloaded instead. A SELECT
arriving while its folder loads waits for that one load.

The file is a hint and nothing more: a missing, unreadable or stale one (folders deleted, re-created with a new
UIDVALIDITY) only means less is preloaded, and a preloaded index is caught up from its folder's HIGHESTMODSEQ
at every use like any other, so writers of this node or another never make it wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from gateway.mailstore.index import MAX_INDEXES
from gateway.mailstore.interface import MailStore

log = logging.getLogger("gateway.mailstore")

HINT_NAME = "imap-index-folders.json"
SAVE_SECONDS = 300.0


def read_hint(path: Path) -> list[int] | None:
    """The folder ids remembered, most recently used first; None when there is no file (the first start of
    this data directory, or of a version that kept none); [] for a damaged one."""
    try:
        ids = json.loads(path.read_text())["folders"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("index preload: %s ignored (%s)", path, exc)
        return []
    if not isinstance(ids, list):
        return []
    return [folder_id for folder_id in ids if isinstance(folder_id, int) and not isinstance(folder_id, bool)]


def write_hint(path: Path, folder_ids: list[int]) -> None:
    """Atomically (a reader never sees half a file), readable by the gateway's user only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump({"folders": folder_ids}, out)
    os.replace(temporary, path)


class IndexWarmup:
    """Preload the remembered folders' indexes, then keep the hint current; ``stop`` saves it a last time."""

    def __init__(self, store: MailStore, hint: Path, max_messages: int, save_seconds: float = SAVE_SECONDS) -> None:
        self.store = store
        self.hint = hint
        self.max_messages = max_messages
        self.save_seconds = save_seconds
        self._saved: list[int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.preloaded = asyncio.Event()      # set once the preload is over (done, failed or nothing to do)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="imap-index-warmup")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.save()

    def save(self) -> None:
        """Write the hint when the folders in memory changed since the last write; none in memory (a start
        stopped before any was loaded, a store without indexes) leaves the file as it was."""
        folders = self.store.indexed_folders()
        if not folders or folders == self._saved:
            return
        try:
            write_hint(self.hint, folders)
        except OSError as exc:
            log.warning("index preload: cannot write %s (%s)", self.hint, exc)
            return
        self._saved = folders

    async def _run(self) -> None:
        remembered = read_hint(self.hint)
        self._saved = remembered
        if self.max_messages > 0 and remembered != []:
            started = time.monotonic()
            try:
                if remembered is None:      # nothing known of the last run: the folders slowest to load first
                    remembered = await self.store.largest_folders(MAX_INDEXES)
                folders, messages = await self.store.warm_indexes(remembered, self.max_messages)
            except Exception:   # noqa: BLE001  (a hint: the SELECTs load what they need themselves)
                log.exception("index preload failed; folders are loaded at their first SELECT")
            else:
                log.info("index preload: %d folder(s), %d message(s) in %.2f s", folders, messages,
                         time.monotonic() - started)
        self.preloaded.set()
        while True:
            await asyncio.sleep(self.save_seconds)
            self.save()

"""Local delivery (the SMTP side) and mailbox provisioning.

``deliver`` is idempotent on (delivery key, mailbox): the SMTP queue passes its
(queue id, recipient) key, so a retry after a crash between the blob write and
the commit, or after a commit whose 250 was lost, never files the message twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.mailstore.errors import FolderExists, FolderNotFound
from gateway.mailstore.headers import CachedHeaders
from gateway.mailstore.interface import INBOX, FolderRef, MailStore, MessageSource
from gateway.mailstore.append_rows import AfterInsert, BeforeInsert

# RFC 6154 2 special-use folders every hosted mailbox gets (mox#66: clients that find
# none invent "Sent Messages" and "Deleted Messages" beside ours).
STANDARD_FOLDERS: tuple[tuple[str, str | None], ...] = (
    (INBOX, None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)


@dataclass(frozen=True)
class DeliveryResult:
    mailbox_id: int
    folder: str
    uidvalidity: int
    uid: int
    duplicate: bool  # True: this delivery key had already been filed; nothing was written


class LocalDelivery:
    def __init__(self, store: MailStore) -> None:
        self.store = store
        # The first deliveries to a mailbox never provisioned arrive together (every delivery worker): one of
        # them provisions, the others wait and find the folders made (instead of racing to create them all).
        self._provisioning: dict[int, asyncio.Lock] = {}

    @property
    def shares_commits(self) -> bool:
        """Concurrent deliveries share one transaction, run in arrival order (SQLite's group commit)."""
        return self.store.shares_commits

    async def provision(self, mailbox_id: int) -> None:
        """Create the standard folders with their special use, all subscribed (stalwart#1342); idempotent."""
        existing = {info.name for info in await self.store.list_folders(mailbox_id)}
        subscribed = set(await self.store.list_subscriptions(mailbox_id))
        for name, special_use in STANDARD_FOLDERS:
            if name not in existing:
                try:
                    await self.store.create_folder(mailbox_id, name, special_use=special_use, subscribe=True)
                except FolderExists:
                    pass  # a concurrent provision made it first
            elif name not in subscribed:
                await self.store.subscribe(mailbox_id, name)

    async def _provision_once(self, mailbox_id: int) -> None:
        lock = self._provisioning.setdefault(mailbox_id, asyncio.Lock())
        try:
            async with lock:
                await self.provision(mailbox_id)
        finally:
            if not lock.locked() and self._provisioning.get(mailbox_id) is lock:
                del self._provisioning[mailbox_id]

    async def deliver(self, mailbox_id: int, raw_message: MessageSource, *, delivery_key: str,
                      folder: str = INBOX, flags: Iterable[str] = (),
                      internaldate: dt.datetime | None = None, headers: CachedHeaders | None = None,
                      after: AfterInsert | None = None, before: BeforeInsert | None = None,
                      filing_due: bool = True) -> DeliveryResult:
        """File a message durably. Raises QuotaExceeded (552 5.2.2), StoreBusy (451 4.3.0), MailboxNotHosted.

        A missing target folder falls back to INBOX; a mailbox never provisioned is provisioned first.
        ``headers`` (parsed already), ``after`` (rows committed with the delivery) and ``before`` (the caller's
        check first in that transaction), ``filing_due`` (False: the delivery's filing job ended at
        delivery, the filing worker is not woken): see ``add_message``.
        """
        target = folder
        try:
            added = await self.store.add_message(FolderRef(mailbox_id, target), raw_message, flags=flags,
                                                 internaldate=internaldate, delivery_key=delivery_key,
                                                 headers=headers, after=after, before=before,
                                                 filing_due=filing_due)
        except FolderNotFound:
            target = INBOX
            await self._provision_once(mailbox_id)
            added = await self.store.add_message(FolderRef(mailbox_id, target), raw_message, flags=flags,
                                                 internaldate=internaldate, delivery_key=delivery_key,
                                                 headers=headers, after=after, before=before,
                                                 filing_due=filing_due)
        return DeliveryResult(mailbox_id, target, added.result.uidvalidity, added.result.uid, added.duplicate)

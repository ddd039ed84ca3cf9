"""Mail the gateway writes itself (MDNs, filing reports, patient notifications) into the one queue.

Such mail is trusted local mail: it skips the submission policy (its
reverse-path is null, RFC 5321 4.5.5, RFC 8098 3: no report is ever sent about
a report) and goes the same way as everything else once queued: local
recipients through local delivery, other operators' through the outbound
worker.

It is written in two steps so that a caller can make it part of its own
transaction (the DMP bridge commits a notice row with it, so a notice is
queued exactly once):

1. ``prepare`` writes the message to the spool durably and returns its queue rows;
2. the caller calls ``prepared.add_to(session)`` and commits; then calls
   ``dispatch`` (or ``discard`` when the commit failed).

A crash between 1 and 2 leaves a spool file without rows, which the
recovery pass of local delivery removes; a crash after 2 leaves a queued
message, which the recovery pass delivers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import format_datetime

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.directory.service import DirectoryService, LocalRoute, RemoteRoute
from gateway.pipeline.models import QueuedMessage, QueuedRecipient, RecipientState, RouteKind
from gateway.pipeline.spool import Spool
from gateway.storage.db import Database
from gateway.storage.models import utcnow

log = logging.getLogger("gateway.generated")
GENERATED_DOOR = "generated"


@dataclass(frozen=True)
class PreparedMail:
    queue_id: str
    message: QueuedMessage
    recipient: QueuedRecipient

    def add_to(self, session: AsyncSession) -> None:
        """Queue the message in the caller's transaction (it is queued once that commits)."""
        self.message.recipients = [self.recipient]
        session.add(self.message)

    @property
    def is_local(self) -> bool:
        return self.recipient.route == RouteKind.LOCAL.value


class GeneratedMailQueue:
    def __init__(self, settings: Settings, directory: DirectoryService, spool: Spool, *,
                 schedule_local: Callable[[str], None], wake_remote: Callable[[], None] | None = None) -> None:
        self.hostname = settings.hostname
        self.directory = directory
        self.spool = spool
        self.schedule_local = schedule_local
        self.wake_remote = wake_remote

    async def prepare(self, message: bytes, recipient: str, *, message_id: str | None) -> PreparedMail | None:
        """Spool ``message`` for ``recipient`` durably; None when that address cannot receive mail."""
        route = await self.directory.route_recipient(recipient)
        if not isinstance(route, (LocalRoute, RemoteRoute)):
            log.warning("generated mail to %s dropped: %s", recipient, getattr(route, "text", route))
            return None
        spool_file = self.spool.new_file()
        try:
            spool_file.write(message)
            await spool_file.make_durable()
        except BaseException:
            spool_file.discard()
            raise
        spool_file.keep()
        return PreparedMail(spool_file.queue_id, self._message_row(spool_file.queue_id, route.address, len(message),
                                                                   message_id, _has_8bit(message)),
                            _recipient_row(route))

    async def send(self, db: Database, message: bytes, recipient: str, *, message_id: str | None = None) -> str | None:
        """Both steps in one go, for mail that needs no companion row: the queue id, or None if undeliverable."""
        prepared = await self.prepare(message, recipient, message_id=message_id)
        if prepared is None:
            return None
        try:
            async with db.session() as session:
                prepared.add_to(session)
        except BaseException:
            self.discard(prepared)
            raise
        self.dispatch(prepared)
        return prepared.queue_id

    def dispatch(self, prepared: PreparedMail) -> None:
        """The rows are committed: hand the message to local delivery or wake the outbound worker."""
        if prepared.is_local:
            self.schedule_local(prepared.queue_id)
        elif self.wake_remote is not None:
            self.wake_remote()

    def discard(self, prepared: PreparedMail) -> None:
        """The rows were not committed: the message was never queued."""
        self.spool.remove(prepared.queue_id)

    def _message_row(self, queue_id: str, recipient: str, size: int, message_id: str | None, eight_bit: bool) -> QueuedMessage:
        trace = (f"Return-Path: <>\r\nReceived: by {self.hostname} (MSSante gateway) with local id {queue_id}"
                 f"\r\n\tfor <{recipient}>; {format_datetime(utcnow())}\r\n")
        return QueuedMessage(id=queue_id, door=GENERATED_DOOR, sender="", envid=None, ret=None,
                             body_type="8BITMIME" if eight_bit else "7BIT", smtputf8=False, size=size,
                             message_id_header=message_id, trace_headers=trace, authenticated_as=None,
                             client_address="127.0.0.1", client_helo=None, tls=None)


def _recipient_row(route: LocalRoute | RemoteRoute) -> QueuedRecipient:
    local = isinstance(route, LocalRoute)
    return QueuedRecipient(
        address=route.address, orcpt=None, notify="NEVER",
        route=RouteKind.LOCAL.value if local else RouteKind.REMOTE.value,
        mailbox_id=route.mailbox_id if isinstance(route, LocalRoute) else None,
        domain=route.address.split("@", 1)[1], state=RecipientState.PENDING.value, attempts=0)


def _has_8bit(message: bytes) -> bool:
    return any(byte > 0x7F for byte in message)

"""Mail the gateway writes itself into the one queue: DSNs, MDNs, filing reports, patient notifications.

The one way generated mail enters the queue, for the outbound worker's
delivery status notifications (RFC 3464) as for the DMP bridge's
acknowledgements and the FHIR API's patient notices. Such mail is trusted
local mail: it skips the submission policy and the inbound checks, so our own
rules never reject our own reports (maddy#327); its reverse-path is null
(RFC 5321 4.5.5, RFC 3461 5.2.1, RFC 8098 3: no report is ever sent about a
report). Once queued it goes the way of everything else: local recipients
through local delivery, other operators' through the outbound worker.

It is written in two steps so that a caller can make it part of its own
transaction (the outbound worker commits a DSN with the attempt it reports on;
the DMP bridge commits a notice row with the filing it acknowledges), which
makes every report durable and queued exactly once:

1. ``prepare`` (bytes in memory) or ``prepare_written`` (streamed into the
   spool, for a DSN that returns a large original) writes the message to the
   spool durably and returns its queue rows; ``prepare_many`` (a filing batch's
   notices) keeps a small message's sealed octets in its queue row instead of a
   file, durable with the caller's commit;
2. the caller calls ``prepared.add_to(session)`` and commits; then calls
   ``dispatch`` (or ``discard`` when the commit failed).

A crash between 1 and 2 leaves a spool file without rows, which the recovery
pass of local delivery removes; a crash after 2 leaves a queued message, which
the recovery pass (local) or the outbound worker's next poll (remote) delivers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import format_datetime

from typing import cast

from sqlalchemy import Table, insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Settings
from gateway.directory.service import DirectoryService, LocalRoute, RemoteRoute, Route
from gateway.queue.spool import Spool, SpoolFile, fsync_directory_in_thread
from gateway.queue.tables import (
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    RouteKind,
)
from gateway.storage.db import Database
from gateway.storage.models import utcnow
from gateway.storage.prepared import Prepared

log = logging.getLogger("gateway.generated")
_MESSAGES = cast(Table, QueuedMessage.__table__)
_RECIPIENTS = cast(Table, QueuedRecipient.__table__)
_INSERT_MESSAGE = Prepared(insert(_MESSAGES))
_INSERT_RECIPIENT = Prepared(insert(_RECIPIENTS))
GENERATED_DOOR = "generated"
DSN_DOOR = "dsn"


@dataclass(frozen=True)
class WrittenMail:
    """What a writer put into the spool file: the Message-ID, the size, and whether it has 8-bit octets."""

    message_id: str | None
    size: int
    eight_bit: bool


@dataclass(frozen=True)
class PreparedMail:
    """A generated message durably in the spool, with the queue rows still to be committed."""

    message: QueuedMessage
    recipient: QueuedRecipient

    @property
    def queue_id(self) -> str:
        return self.message.id

    @property
    def is_local(self) -> bool:
        return self.recipient.route == RouteKind.LOCAL.value

    def add_to(self, session: AsyncSession) -> None:
        """Queue the message in the caller's transaction (it is queued once that commits)."""
        self.message.recipients = [self.recipient]
        session.add(self.message)

    def insert_in(self, connection: Connection) -> None:
        """``add_to`` in a synchronous transaction (``Database.run_in_transaction``): the same two rows, by
        SQL Core (the columns left unset take their defaults)."""
        message = {column.key: getattr(self.message, column.key) for column in _MESSAGES.columns}
        _INSERT_MESSAGE.run(connection, {key: value for key, value in message.items() if value is not None})
        recipient = {column.key: getattr(self.recipient, column.key) for column in _RECIPIENTS.columns
                     if column.key != "id"}
        recipient["message_id"] = self.message.id
        _INSERT_RECIPIENT.run(connection, {key: value for key, value in recipient.items() if value is not None})


class GeneratedMailQueue:
    def __init__(self, settings: Settings, directory: DirectoryService, spool: Spool, *,
                 schedule_local: Callable[[str], None] | None, wake_remote: Callable[[], None] | None = None) -> None:
        self.hostname = settings.hostname
        self.directory = directory
        self.spool = spool
        self.schedule_local = schedule_local
        self.wake_remote = wake_remote

    async def prepare(self, message: bytes, recipient: str, *, message_id: str | None,
                      door: str = GENERATED_DOOR) -> PreparedMail | None:
        """Spool ``message`` for ``recipient`` durably; None when that address cannot receive mail."""
        def write(spool_file: SpoolFile) -> WrittenMail:
            spool_file.write(message)
            return WrittenMail(message_id, len(message), _has_8bit(message))
        return await self.prepare_written(recipient, write, door=door)

    async def prepare_written(self, recipient: str, write: Callable[[SpoolFile], WrittenMail], *,
                              door: str = GENERATED_DOOR, smtputf8: bool = False) -> PreparedMail | None:
        """Spool what ``write`` writes (synchronously) for ``recipient``; None when it cannot receive mail."""
        route = await self.directory.route_recipient(recipient)
        if not isinstance(route, (LocalRoute, RemoteRoute)):
            log.warning("generated mail (%s) to %s dropped: %s", door, recipient, getattr(route, "text", route))
            return None
        spool_file = self.spool.new_file()
        try:
            written = write(spool_file)
            await spool_file.make_durable()
        except BaseException:
            spool_file.discard()
            raise
        spool_file.keep()
        message = self._message_row(spool_file.queue_id, route.address, written, door=door, smtputf8=smtputf8)
        return PreparedMail(message, _recipient_row(route))

    async def prepare_many(self, messages: Sequence[tuple[bytes, str, str | None]], *,
                           door: str = GENERATED_DOOR) -> list[PreparedMail | None]:
        """``prepare`` for several (message, recipient, Message-ID) at once, in their order (a filing batch's
        notices): each distinct recipient routed once; a message whose sealed octets fit in a queue row
        (``Spool.keeps_in_row``) kept for its row (``queue_messages.content``: durable with the caller's
        commit, no file), the others written, their data fsynced side by side, then moved into the queue with
        one fsync of its directory (spool.py steps 1 and 2, grouped). All or none: if anything fails, every
        file written is removed and the error raised."""
        routes: dict[str, Route] = {}
        for _message, recipient, _message_id in messages:
            if recipient not in routes:
                routes[recipient] = await self.directory.route_recipient(recipient)
        files: list[SpoolFile] = []
        prepared: list[PreparedMail | None] = []
        try:
            for message, recipient, message_id in messages:
                route = routes[recipient]
                if not isinstance(route, (LocalRoute, RemoteRoute)):
                    log.warning("generated mail (%s) to %s dropped: %s", door, recipient, getattr(route, "text", route))
                    prepared.append(None)
                    continue
                spool_file = self.spool.new_file()
                files.append(spool_file)
                spool_file.write(message)
                written = WrittenMail(message_id, len(message), _has_8bit(message))
                prepared.append(PreparedMail(self._message_row(spool_file.queue_id, route.address, written, door=door,
                                                               smtputf8=False), _recipient_row(route)))
            # A small notice gets no file: its sealed octets go in its queue row, durable with the caller's
            # commit (as an accepted message's: spool.py, "In its row"); a larger one is a file, as before.
            await asyncio.gather(*(spool_file.sync_data(into_row=True) for spool_file in files))
            for spool_file, mail in zip(files, [mail for mail in prepared if mail is not None]):
                mail.message.content = spool_file.row_content
                spool_file.move_into_queue()
            if any(spool_file.in_queue_directory for spool_file in files):
                await fsync_directory_in_thread(self.spool.queue)
        except BaseException:
            for spool_file in files:
                spool_file.discard()
            raise
        for spool_file in files:
            spool_file.keep()
        return prepared

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
            if self.schedule_local is not None:
                self.schedule_local(prepared.queue_id)
        elif self.wake_remote is not None:
            self.wake_remote()

    def discard(self, prepared: PreparedMail) -> None:
        """The rows were not committed: the message was never queued."""
        self.spool.remove(prepared.queue_id)

    def _message_row(self, queue_id: str, recipient: str, written: WrittenMail, *, door: str,
                     smtputf8: bool) -> QueuedMessage:
        trace = (f"Return-Path: <>\r\nReceived: by {self.hostname} (MSSante gateway) with local id {queue_id}"
                 f"\r\n\tfor <{recipient}>; {format_datetime(utcnow())}\r\n")
        return QueuedMessage(id=queue_id, door=door, sender="", envid=None, ret=None,
                             body_type="8BITMIME" if written.eight_bit else "7BIT", smtputf8=smtputf8,
                             size=written.size, message_id_header=written.message_id, trace_headers=trace,
                             authenticated_as=None, client_address="127.0.0.1", client_helo=None, tls=None)


def _recipient_row(route: LocalRoute | RemoteRoute) -> QueuedRecipient:
    local = isinstance(route, LocalRoute)
    return QueuedRecipient(
        address=route.address, orcpt=None, notify="NEVER",
        route=RouteKind.LOCAL.value if local else RouteKind.REMOTE.value,
        mailbox_id=route.mailbox_id if isinstance(route, LocalRoute) else None,
        domain=route.address.split("@", 1)[1], state=RecipientState.PENDING.value, attempts=0)


def _has_8bit(message: bytes) -> bool:
    return not message.isascii()  # any octet above 0x7F (one C loop: the generator was 0.3 ms per notice)

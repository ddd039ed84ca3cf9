"""The one path every message takes, whatever door it came in by.

    parse -> policy -> security -> route -> (durable queue) -> deliver

A door (the SMTP handler, later the webmail) calls, in order:
``start_transaction`` (rate limits, sender rules), ``add_recipient`` (routing
and recipient rules) for each recipient, ``open_spool`` for the body, then
``accept`` once the body is complete. ``accept`` returns the queue id only when
the message is durable: spool file fsynced, its directory fsynced, queue rows
committed. Local recipients are then delivered in the background; remote ones
wait for the outbound worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError

from gateway.config import Settings
from gateway.directory.service import DirectoryService, LocalRoute
from gateway.pipeline.conversations import ConversationBook
from gateway.pipeline.delivery import LocalDelivery
from gateway.pipeline.limits import RateLimiter
from gateway.pipeline.models import QueuedMessage, QueuedRecipient, RecipientState, RouteKind
from gateway.pipeline.origin import Origin
from gateway.pipeline.parse import MessageFacts, ParseLimits, scan_message
from gateway.pipeline.policy import AcceptedRecipient, Policy
from gateway.pipeline.queue import QueueStore
from gateway.pipeline.spool import Spool, SpoolFile
from gateway.pipeline.trace import trace_header_block
from gateway.smtp import codes
from gateway.smtp.codes import SmtpRefusal
from gateway.smtp.parameters import MailParameters, RcptParameters
from gateway.smtp.paths import SmtpPath

log = logging.getLogger("gateway.pipeline")


@dataclass
class Transaction:
    """One message on its way in: the envelope as the pipeline accepted it."""

    origin: Origin
    sender: str
    params: MailParameters
    recipients: list[tuple[AcceptedRecipient, RcptParameters]] = field(default_factory=list)


class Pipeline:
    def __init__(self, settings: Settings, directory: DirectoryService, queue: QueueStore, spool: Spool,
                 delivery: LocalDelivery, conversations: ConversationBook) -> None:
        self.settings = settings
        self.smtp = settings.smtp
        self.queue = queue
        self.spool = spool
        self._remote_listeners: list[Callable[[], None]] = []
        self.delivery = delivery
        self.policy = Policy(directory, conversations, settings.smtp.patient_first_contact)
        self.user_rate = RateLimiter(settings.smtp.messages_per_minute_per_user)
        self.ip_rate = RateLimiter(settings.smtp.messages_per_minute_per_ip)
        self.parse_limits = ParseLimits(settings.smtp.max_header_count, settings.smtp.max_header_bytes,
                                        settings.smtp.max_mime_depth)

    # ----------------------------------------------------------------- envelope

    async def start_transaction(self, origin: Origin, path: SmtpPath | None, params: MailParameters) -> Transaction:
        self._check_rates(origin)
        sender = await self.policy.check_sender(origin, path)
        return Transaction(origin, sender, params)

    def _check_rates(self, origin: Origin) -> None:
        if origin.account is not None and not self.user_rate.allow(origin.account.address):
            raise SmtpRefusal(codes.RATE_LIMITED.format(who=origin.account.address, limit=self.user_rate.limit,
                                                        window=int(self.user_rate.window)))
        if not self.ip_rate.allow(origin.client_address):
            raise SmtpRefusal(codes.RATE_LIMITED.format(who=origin.client_address, limit=self.ip_rate.limit,
                                                        window=int(self.ip_rate.window)))

    async def add_recipient(self, transaction: Transaction, path: SmtpPath, params: RcptParameters) -> AcceptedRecipient:
        if len(transaction.recipients) >= self.smtp.max_recipients:
            raise SmtpRefusal(codes.TOO_MANY_RECIPIENTS.format(limit=self.smtp.max_recipients))
        accepted = await self.policy.check_recipient(transaction.origin, transaction.sender, path)
        if any(existing.address == accepted.address for existing, _ in transaction.recipients):
            return accepted                                           # RFC 5321 3.3: duplicates collapse
        transaction.recipients.append((accepted, params))
        return accepted

    def on_remote_queued(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a message with remote recipients is queued (wakes the outbound worker)."""
        self._remote_listeners.append(listener)

    def open_spool(self) -> SpoolFile:
        return self.spool.new_file()

    # ----------------------------------------------------------------- the message

    async def accept(self, transaction: Transaction, spool_file: SpoolFile) -> str:
        """Parse, check, make durable, queue; the queue id once the message is safe on disk."""
        try:
            facts = await asyncio.to_thread(scan_message, spool_file.incoming_path, self.parse_limits)
            message, recipients = self._queue_rows(transaction, spool_file, facts)
            changes = self.policy.conversation_changes(transaction.origin, transaction.sender,
                                                       [r for r, _ in transaction.recipients], facts)
            await spool_file.make_durable()
            await self.queue.commit(message, recipients, changes)
        except SmtpRefusal:
            spool_file.discard()
            raise
        except (DBAPIError, OSError) as exc:
            spool_file.discard()
            raise SmtpRefusal(codes.LOCAL_ERROR, detail=f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            spool_file.discard()
            raise
        spool_file.keep()
        if any(r.route == RouteKind.LOCAL.value for r in recipients):
            self.delivery.schedule(spool_file.queue_id)
        if any(r.route == RouteKind.REMOTE.value for r in recipients):
            for listener in self._remote_listeners:
                listener()
        log.info("queued %s from %s (%s) for %d recipient(s), %d octets", spool_file.queue_id, transaction.sender or "<>",
                 transaction.origin.door.value, len(recipients), spool_file.size)
        return spool_file.queue_id

    def _queue_rows(self, transaction: Transaction, spool_file: SpoolFile,
                    facts: MessageFacts) -> tuple[QueuedMessage, list[QueuedRecipient]]:
        origin = transaction.origin
        addresses = [accepted.address for accepted, _ in transaction.recipients]
        trace = trace_header_block(origin, hostname=self.settings.hostname, queue_id=spool_file.queue_id,
                                   sender=transaction.sender, recipients=addresses, facts=facts,
                                   x_mss_nil=self.smtp.x_mss_nil, smtputf8=transaction.params.smtputf8)
        message = QueuedMessage(
            id=spool_file.queue_id, door=origin.door.value, sender=transaction.sender,
            envid=transaction.params.envid, ret=transaction.params.ret, body_type=transaction.params.body,
            smtputf8=transaction.params.smtputf8, size=spool_file.size, message_id_header=facts.message_id,
            trace_headers=trace, authenticated_as=origin.account.address if origin.account else None,
            client_address=origin.client_address, client_helo=(origin.helo or "")[:255] or None,
            tls=origin.tls.describe()[:128] if origin.tls else None,
        )
        return message, [_recipient_row(accepted, params) for accepted, params in transaction.recipients]


def _recipient_row(accepted: AcceptedRecipient, params: RcptParameters) -> QueuedRecipient:
    local = isinstance(accepted.route, LocalRoute)
    return QueuedRecipient(
        address=accepted.address, orcpt=params.orcpt, notify=",".join(sorted(params.notify)) or None,
        route=RouteKind.LOCAL.value if local else RouteKind.REMOTE.value,
        mailbox_id=accepted.route.mailbox_id if isinstance(accepted.route, LocalRoute) else None,
        domain=accepted.address.split("@", 1)[1], state=RecipientState.PENDING.value, attempts=0,
    )

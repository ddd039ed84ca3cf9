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
from gateway.directory.generation import AnswerCache
from gateway.directory.service import DirectoryService, LocalRoute
from gateway.mail import codes
from gateway.mail.codes import MailRefusal
from gateway.mail.parameters import MailParameters, RcptParameters
from gateway.mail.paths import SmtpPath
from gateway.ops.metrics import MESSAGES_ACCEPTED
from gateway.pipeline.acceptance import AcceptanceCommitter, AcceptCancelled
from gateway.pipeline.conversations import ConversationBook
from gateway.pipeline.limits import MessageRates
from gateway.pipeline.origin import Door, Origin
from gateway.pipeline.parse import MessageFacts, ParseLimits, scan_stream
from gateway.pipeline.policy import AcceptedRecipient, Policy
from gateway.pipeline.trace import trace_header_block
from gateway.queue.local_delivery import LocalDeliveryWorker, ReadyMessage
from gateway.queue.spool import Spool, SpoolFile
from gateway.queue.store import AcceptedRows, QueueStore
from gateway.queue.tables import RecipientState, RouteKind
from gateway.security.dkim import DkimVerifier
from gateway.security.smime_service import InboundVerdict, SmimeService, is_smime_content_type
from gateway.storage.models import utcnow

log = logging.getLogger("gateway.pipeline")

INLINE_SCAN_BYTES = 64 * 1024      # messages up to this size are parsed in the event loop (see _scan_message)


@dataclass
class Transaction:
    """One message on its way in: the envelope as the pipeline accepted it."""

    origin: Origin
    sender: str
    params: MailParameters
    recipients: list[tuple[AcceptedRecipient, RcptParameters]] = field(default_factory=list)
    added_fields: list[str] = field(default_factory=list)          # e.g. a delegate's Sender (policy.check_author)
    verified: list[str] = field(default_factory=list)              # RFC 8601 results found now (dkim=...)


@dataclass
class _Copy:
    """One queued copy of an accepted message: S/MIME may split a message into an encrypted copy for the
    recipients with certificates and a signed one for the others (RFC 8551 3.7)."""

    spool_file: SpoolFile
    recipients: list[tuple[AcceptedRecipient, RcptParameters]]
    facts: MessageFacts
    verdict: InboundVerdict | None = None
    encrypted_here: bool = False  # this copy is the envelope we made for its recipients (sender's policy)


class Pipeline:
    def __init__(self, settings: Settings, directory: DirectoryService, queue: QueueStore, spool: Spool,
                 delivery: LocalDeliveryWorker, conversations: ConversationBook, *, smime: SmimeService | None = None) -> None:
        self.settings = settings
        self.smime = smime
        self.smtp = settings.smtp
        self.queue = queue
        self.spool = spool
        self.acceptance = AcceptanceCommitter(spool, queue)
        # Routes and S/MIME policy answers kept between transactions while the directory is unchanged;
        # refreshed at MAIL FROM and at the end of DATA (gateway.directory.generation).
        self.answers = AnswerCache(queue.db)
        self._remote_listeners: list[Callable[[], None]] = []
        self.delivery = delivery
        self.policy = Policy(directory, conversations, settings.smtp.patient_first_contact,
                             postmaster=settings.smtp.postmaster, primary_domain=settings.directory.professional_domain)
        # Replaced in an SMTP acceptor process by one that asks the main process (gateway.smtp.acceptors).
        self.rates = MessageRates(settings.smtp.messages_per_minute_per_user, settings.smtp.messages_per_minute_per_ip)
        self.parse_limits = ParseLimits(settings.smtp.max_header_count, settings.smtp.max_header_bytes,
                                        settings.smtp.max_mime_depth)
        self.dkim = DkimVerifier(settings.outbound) if settings.dkim.verify else None
        # prometheus_client's ``labels()`` looks its child up under a lock at every call: once per door here.
        self._accepted_counters = {door: MESSAGES_ACCEPTED.labels(door.value) for door in Door}

    # ----------------------------------------------------------------- envelope

    async def start_transaction(self, origin: Origin, path: SmtpPath | None, params: MailParameters) -> Transaction:
        await self._check_rates(origin)
        await self.answers.refresh()
        sender = await self.policy.check_sender(origin, path)
        return Transaction(origin, sender, params)

    async def _check_rates(self, origin: Origin) -> None:
        if self.rates.unlimited:
            return
        account = origin.account.address if origin.account is not None else None
        refused = await self.rates.check(account, origin.client_address)
        if refused == "user":
            raise MailRefusal(codes.RATE_LIMITED.format(who=account, limit=self.rates.user.limit,
                                                        window=int(self.rates.user.window)))
        if refused == "ip":
            raise MailRefusal(codes.RATE_LIMITED.format(who=origin.client_address, limit=self.rates.ip.limit,
                                                        window=int(self.rates.ip.window)))

    async def add_recipient(self, transaction: Transaction, path: SmtpPath, params: RcptParameters) -> AcceptedRecipient:
        if len(transaction.recipients) >= self.smtp.max_recipients:
            raise MailRefusal(codes.TOO_MANY_RECIPIENTS.format(limit=self.smtp.max_recipients))
        accepted = await self.policy.check_recipient(transaction.origin, transaction.sender, path, self.answers)
        if self.smime is not None and transaction.origin.door.is_submission:
            # S/MIME encrypt=always: refuse at RCPT a recipient we could not encrypt to
            await self.smime.check_recipient(transaction.sender, accepted.address, self.answers)
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
        """Parse, check, secure (S/MIME), make durable, queue; the queue id once the message is safe on disk."""
        copies = [_Copy(spool_file, list(transaction.recipients), MessageFacts())]
        try:
            await self.answers.refresh()                          # what changed since RCPT counts now
            if any(isinstance(accepted.route, LocalRoute) for accepted, _ in transaction.recipients):
                await self.delivery.wait_for_room()              # back-pressure from local delivery (queue/local_delivery.py)
            facts = await self._scan_message(spool_file)
            transaction.added_fields = await self.policy.check_author(transaction.origin, transaction.sender, facts)
            transaction.verified = await self._verify_dkim(transaction.origin, spool_file)
            copies = await self._secure(transaction, spool_file, facts)
            queued = [self._queue_rows(transaction, copy.spool_file, copy.facts, copy.recipients, copy.verdict)
                      for copy in copies]
            changes = self.policy.conversation_changes(transaction.origin, transaction.sender,
                                                       [r for r, _ in transaction.recipients], facts)
            await self.acceptance.commit([copy.spool_file for copy in copies], queued, changes)
        except MailRefusal:
            _discard(copies, spool_file)
            raise
        except (DBAPIError, OSError) as exc:
            _discard(copies, spool_file)
            raise MailRefusal(codes.LOCAL_ERROR, detail=f"{type(exc).__name__}: {exc}") from exc
        except AcceptCancelled as cancelled:
            if not cancelled.committed:
                _discard(copies, spool_file)
                raise
            log.warning("queued %s although its client left before the reply", spool_file.queue_id)
            self._hand_over(copies, queued)                # the client left, but its message is queued
            raise
        except BaseException:
            _discard(copies, spool_file)
            raise
        await self._queued(transaction, copies, queued)
        return spool_file.queue_id

    async def _queued(self, transaction: Transaction, copies: list[_Copy], queued: list[AcceptedRows]) -> None:
        """After the commit: the files belong to the queue, S/MIME verdicts are recorded, delivery starts."""
        for copy in copies:
            copy.spool_file.keep()
            await self._record_smime(copy)
        self._hand_over(copies, queued)
        if log.isEnabledFor(logging.INFO):
            log.info("queued %s from %s (%s) for %d recipient(s), %d octets", copies[0].spool_file.queue_id,
                     transaction.sender or "<>", transaction.origin.door.value,
                     sum(len(rows.recipients) for rows in queued), copies[0].spool_file.size)
        self._accepted_counters[transaction.origin.door].inc()

    def _hand_over(self, copies: list[_Copy], queued: list[AcceptedRows]) -> None:
        for copy in copies:
            copy.spool_file.keep()
        for copy, rows in zip(copies, queued, strict=True):
            self._dispatch(rows, copy)

    def _dispatch(self, rows: AcceptedRows, copy: _Copy) -> None:
        if rows.has_route(RouteKind.LOCAL):
            # Local delivery gets the rows as committed and the plaintext still in memory (SQLite; see
            # gateway.queue.local_delivery): it need not read either back.
            types = {a.route.mailbox_id: a.route.type for a, _ in copy.recipients if isinstance(a.route, LocalRoute)}
            ready = ReadyMessage(QueueStore.local_works(rows, types), copy.spool_file.plaintext(),
                                 in_row=copy.spool_file.row_content is not None) if rows.recipient_ids else None
            self.delivery.schedule(rows.queue_id, ready)
        if rows.has_route(RouteKind.REMOTE):
            self.remote_queued()

    def remote_queued(self) -> None:
        """A message for other operators was queued (here, or a DSN by local delivery): wake the listeners."""
        for listener in self._remote_listeners:
            listener()

    async def _verify_dkim(self, origin: Origin, spool_file: SpoolFile) -> list[str]:
        """RFC 6376 on the relay door, as received: recorded in Authentication-Results (RFC 8601 2.7.1).
        A failed or missing signature is as no signature (RFC 6376 6.3): trust rests on the peer's verified
        certificate and the From alignment (policy.check_author), which refuse our own domains whatever DKIM says."""
        if self.dkim is None or origin.door.is_submission:
            return []
        raw = await asyncio.to_thread(_read_all, spool_file)
        try:
            return [await self.dkim.verify(raw)]
        except Exception as exc:                                # dkimpy on hostile input: recorded, never a 451
            log.warning("DKIM verification of a message from %s failed: %s: %s", origin.client_address,
                        type(exc).__name__, exc)
            return [f"dkim=temperror (verifier error: {type(exc).__name__})"]

    async def _scan_message(self, spool_file: SpoolFile) -> MessageFacts:
        """A small message is scanned at once (well under a millisecond of CPU: a trip to a worker thread
        costs more, and waits behind the deliveries' work there); a large one in a worker thread."""
        if spool_file.size <= INLINE_SCAN_BYTES:
            return self._scan(spool_file)
        return await asyncio.to_thread(self._scan, spool_file)

    def _scan(self, spool_file: SpoolFile) -> MessageFacts:
        with spool_file.open_incoming() as stream:              # the spool is sealed: read its plaintext
            return scan_stream(stream, self.parse_limits)

    # ----------------------------------------------------------------- security step (S/MIME)

    async def _secure(self, transaction: Transaction, spool_file: SpoolFile, facts: MessageFacts) -> list[_Copy]:
        """Sign/encrypt what our users send (policy), then verify/decrypt what reaches our mailboxes."""
        copies = [_Copy(spool_file, list(transaction.recipients), facts)]
        if self.smime is None:
            return copies
        if transaction.origin.door.is_submission:
            copies = await self._protect(transaction, spool_file, facts)
        for copy in copies:
            await self._inspect(copy)
        return copies

    async def _protect(self, transaction: Transaction, spool_file: SpoolFile, facts: MessageFacts) -> list[_Copy]:
        assert self.smime is not None
        by_address = {accepted.address: (accepted, params) for accepted, params in transaction.recipients}
        variants = await self.smime.protect(lambda: _read_all(spool_file), facts.get("Content-Type"),
                                            transaction.sender, list(by_address), self.answers)
        copies: list[_Copy] = []
        try:
            for index, variant in enumerate(variants):
                target = spool_file if index == 0 else self.spool.new_file()
                copy = _Copy(target, [by_address[address] for address in variant.recipients], facts,
                             encrypted_here=variant.encrypted)
                copies.append(copy)
                if variant.content is not None:
                    target.replace_content(variant.content)
                    copy.facts = await self._scan_message(target)
        except BaseException:
            _discard(copies, spool_file)
            raise
        return copies

    async def _inspect(self, copy: _Copy) -> None:
        """Incoming S/MIME for our own mailboxes: the verdict joins the trace (Authentication-Results)."""
        assert self.smime is not None
        mailbox_ids = [a.route.mailbox_id for a, _ in copy.recipients if isinstance(a.route, LocalRoute)]
        if mailbox_ids and is_smime_content_type(copy.facts.get("Content-Type")):
            raw = await asyncio.to_thread(_read_all, copy.spool_file)
            copy.verdict = await self.smime.inspect(raw, mailbox_ids, encrypted_here=copy.encrypted_here)

    async def _record_smime(self, copy: _Copy) -> None:
        if self.smime is None or copy.verdict is None:
            return
        mailbox_ids = [a.route.mailbox_id for a, _ in copy.recipients if isinstance(a.route, LocalRoute)]
        try:
            await self.smime.record(copy.spool_file.queue_id, copy.verdict, mailbox_ids)
        except Exception:                                       # the message is queued: never fail the 250 now
            log.exception("S/MIME result of %s not recorded (the message is delivered as received)",
                          copy.spool_file.queue_id)

    def _queue_rows(self, transaction: Transaction, spool_file: SpoolFile, facts: MessageFacts,
                    accepted_recipients: list[tuple[AcceptedRecipient, RcptParameters]] | None = None,
                    verdict: InboundVerdict | None = None) -> AcceptedRows:
        origin = transaction.origin
        accepted_recipients = transaction.recipients if accepted_recipients is None else accepted_recipients
        addresses = [accepted.address for accepted, _ in accepted_recipients]
        trace = trace_header_block(origin, hostname=self.settings.hostname, queue_id=spool_file.queue_id,
                                   sender=transaction.sender, recipients=addresses, facts=facts,
                                   x_mss_nil=self.smtp.x_mss_nil, smtputf8=transaction.params.smtputf8,
                                   verified=transaction.verified, added_fields=transaction.added_fields)
        if verdict is not None:
            trace += verdict.authentication_results + "\r\n"      # RFC 8601 + RFC 7281 smime method
        message: dict[str, object] = dict(
            id=spool_file.queue_id, door=origin.door.value, sender=transaction.sender,
            envid=transaction.params.envid, ret=transaction.params.ret, body_type=transaction.params.body,
            smtputf8=transaction.params.smtputf8, size=spool_file.size, message_id_header=facts.message_id,
            received_at=utcnow(),
            trace_headers=trace, authenticated_as=origin.account.address if origin.account else None,
            client_address=origin.client_address, client_helo=(origin.helo or "")[:255] or None,
            tls=origin.tls.describe()[:128] if origin.tls else None,
        )
        return AcceptedRows(message, [_recipient_row(accepted, params) for accepted, params in accepted_recipients])


def _read_all(spool_file: SpoolFile) -> bytes:
    with spool_file.open_incoming() as stream:
        return stream.read()


def _discard(copies: list[_Copy], spool_file: SpoolFile) -> None:
    spool_file.discard()
    for copy in copies:
        copy.spool_file.discard()


def _recipient_row(accepted: AcceptedRecipient, params: RcptParameters) -> dict[str, object]:
    local = isinstance(accepted.route, LocalRoute)
    return dict(
        address=accepted.address, orcpt=params.orcpt, notify=",".join(sorted(params.notify)) or None,
        route=RouteKind.LOCAL.value if local else RouteKind.REMOTE.value,
        mailbox_id=accepted.route.mailbox_id if isinstance(accepted.route, LocalRoute) else None,
        domain=accepted.address.split("@", 1)[1], state=RecipientState.PENDING.value, attempts=0,
    )

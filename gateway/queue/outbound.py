"""The outbound queue worker: delivery to other operators over verified, mutual TLS.

One pass of the worker (``run_once``) claims the due remote recipients, groups
them by message and domain, and runs one SMTP transaction per group:

1. route: the static transport map, else MX records (gateway.queue.mx, RFC 5321 5.1);
2. per MX host, per address: connect, EHLO, **STARTTLS required** (RFC 3207; a
   peer that does not offer it is a temporary failure, never a plaintext
   delivery), certificate verified against the trust anchors and matched to the
   MX host name (RFC 6125), our client certificate presented, EHLO again;
   any failure before MAIL moves on to the next address or host;
3. MAIL FROM with SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531), RET and
   ENVID (RFC 3461 4.3, 4.4) as the peer supports them; RCPT TO with NOTIFY and
   ORCPT (RFC 3461 4.1, 4.2) when it supports DSN; DATA streamed from the spool
   with dot-stuffing (RFC 5321 4.5.2): DKIM-Signature, our trace fields, the message;
4. per recipient: 2yz delivered, 4yz deferred by the backoff table, 5yz failed
   (RFC 5321 4.2.1); every attempt recorded; a failure DSN, a delay DSN once
   (RFC 3464) and a "relayed" DSN when SUCCESS was asked of a peer without DSN
   (RFC 3461 5.2.2) are queued in the same transaction as the outcome.

Backoff (mox's table, ``outbound.retry_schedule_minutes``): attempt 1 at once,
then after 7.5 min, 15 min, 30 min, 1 h, 2 h (the delay DSN is due about here,
``delay_warning_minutes``), 4 h, 8 h, 16 h; a temporary failure after the last
entry, or past ``max_queue_lifetime_hours``, is final (5.4.7) with a failure DSN.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gateway.config import Settings
from gateway.mail.parameters import encode_xtext
from gateway.queue.dsn import (
    Action,
    OriginalMessage,
    RecipientReport,
    wants_report,
    write_dsn,
)
from gateway.queue.generated import (
    DSN_DOOR,
    GeneratedMailQueue,
    PreparedMail,
    WrittenMail,
)
from gateway.queue.mx import MxHost, MxResolver, RouteFailure
from gateway.queue.outbound_store import (
    AttemptRecord,
    DomainBatch,
    MessageWork,
    OutboundStore,
    RecipientWork,
)
from gateway.queue.smtp_client import HopFailure, PeerReply, SmtpClient
from gateway.queue.spool import Spool, SpoolFile
from gateway.queue.store import QueueStore
from gateway.queue.tables import RecipientState
from gateway.security.dkim import DkimKeys, DkimSigner, key_directory
from gateway.security.pki import TestPKI
from gateway.security.tls import client_context, describe_certificate
from gateway.storage.db import Database
from gateway.storage.models import utcnow

log = logging.getLogger("gateway.outbound")
CHUNK = 64 * 1024


# =========================================================================== the message as sent

def remote_trace_headers(trace_headers: str) -> bytes:
    """Our trace fields for another operator: without Return-Path, which only the final
    delivery adds (RFC 5321 4.4)."""
    kept: list[str] = []
    dropping = False
    for line in trace_headers.splitlines(keepends=True):
        if line[:1] in (" ", "\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith("return-path:")
        if not dropping:
            kept.append(line)
    return "".join(kept).encode("utf-8")


async def message_chunks(prefix: bytes, open_message: Callable[[], BinaryIO]) -> AsyncIterator[bytes]:
    """The prefix (signature and trace fields), then the spool file in chunks: never all of it in memory.
    ``open_message`` opens the spool's plaintext reader (the file itself is sealed at rest)."""
    yield prefix
    handle = await asyncio.to_thread(open_message)
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        handle.close()


def _header_lines(handle: BinaryIO) -> bytes:
    """The header section of a message, up to and including the empty line (RFC 5322 2.1)."""
    lines = []
    for line in handle:
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    return b"".join(lines)


# =========================================================================== results

@dataclass
class Outcome:
    """One recipient's result in one attempt, before the backoff table is applied."""

    recipient: RecipientWork
    kind: RecipientState                # DELIVERED | DEFERRED (temporary) | FAILED (permanent)
    text: str
    reply: PeerReply | None = None
    enhanced: str | None = None
    mx_host: str | None = None
    ip: str | None = None
    tls_version: str | None = None
    peer_has_dsn: bool = False
    final_status: str | None = None     # set when the queue, not the peer, decides (expiry)

    @property
    def status(self) -> str:
        """The RFC 3463 code for the DSN's Status field."""
        code = self.final_status or (self.reply.enhanced if self.reply and self.reply.enhanced else None) or self.enhanced
        if code is None and self.reply is not None:
            code = f"{str(self.reply.code)[0]}.0.0"
        return code or ("2.0.0" if self.kind is RecipientState.DELIVERED else "4.0.0")


@dataclass(frozen=True)
class HopContext:
    host: MxHost
    ip: str


def _all(batch: DomainBatch, kind: RecipientState, text: str, **details: Any) -> list[Outcome]:
    return [Outcome(recipient, kind, text, **details) for recipient in batch.recipients]


def _from_reply(recipient: RecipientWork, reply: PeerReply, hop: HopContext, tls_version: str | None,
                peer_has_dsn: bool, stage: str) -> Outcome:
    kind = RecipientState.DELIVERED if reply.is_success else (
        RecipientState.FAILED if reply.is_permanent else RecipientState.DEFERRED)
    text = str(reply) if reply.is_success else f"{hop.host.name}[{hop.ip}] said after {stage}: {reply}"
    return Outcome(recipient, kind, text, reply=reply, mx_host=hop.host.name, ip=hop.ip,
                   tls_version=tls_version, peer_has_dsn=peer_has_dsn)


# =========================================================================== DSN into the queue

class DsnReports:
    """The DSNs of the outbound worker (RFC 3464), queued through the one generated-mail queue.

    The report is trusted local mail with ``MAIL FROM:<>`` (RFC 5321 4.5.5); its recipient, the
    original sender, is routed by the directory: a local mailbox gets it from local delivery,
    another operator's address from this worker. It is streamed into the spool (the original may
    be large) and committed by the caller with the outcome it reports (``PreparedMail.add_to``).
    """

    def __init__(self, settings: Settings, queue: GeneratedMailQueue, spool: Spool) -> None:
        self.hostname = settings.hostname
        self.queue = queue
        self.spool = spool

    async def prepare(self, message: MessageWork, reports: Sequence[RecipientReport]) -> PreparedMail | None:
        """Write the DSN durably to the spool; the rows to commit with the outcome (None: nobody to tell)."""
        if not message.sender or not reports:
            return None                                  # RFC 3461 5.2.1: never bounce a bounce
        open_message = await self.spool.opener(message.id)      # its file, or its row's sealed content
        original = self._original(message, await asyncio.to_thread(self._original_content, message, open_message))

        def write(spool_file: SpoolFile) -> WrittenMail:
            dsn = write_dsn(spool_file, reporting_mta=self.hostname, original=original, recipients=reports)
            return WrittenMail(dsn.message_id, dsn.size, dsn.eight_bit)
        return await self.queue.prepare_written(message.sender, write, door=DSN_DOOR, smtputf8=message.smtputf8)

    @staticmethod
    def _original_content(message: MessageWork, open_message: Callable[[], BinaryIO]) -> bytes:
        """The returned message (RET=HDRS: its header section only), read through the sealed spool."""
        with open_message() as handle:
            return _header_lines(handle) if message.ret == "HDRS" else handle.read()

    def _original(self, message: MessageWork, content: bytes) -> OriginalMessage:
        return OriginalMessage(
            sender=message.sender, content=content,
            trace_headers=remote_trace_headers(message.trace_headers), envid=message.envid, ret=message.ret,
            arrival=message.received_at, message_id=message.message_id_header, size=message.size)

    def discard(self, prepared: PreparedMail) -> None:
        """The commit failed: the report was never queued."""
        self.queue.discard(prepared)

    def dispatch(self, prepared: PreparedMail) -> None:
        """The commit succeeded: local delivery or this worker takes the report."""
        self.queue.dispatch(prepared)


# =========================================================================== the worker

def outbound_tls_context(pki: TestPKI, settings: Settings, *, identity: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Verify peers against the trust anchors (this PKI's CAs and ``pki.trust_anchors``, never the system
    store), present our certificate (``identity``: chain and key, the operator's tls.* files as
    ``gateway serve`` passes them; by default the gateway's own, issued under the same PKI), check revocation."""
    if identity is None:
        issued = pki.ensure_gateway_server_cert(settings.hostname, settings.pki.server_names, settings.pki.server_ips)
        identity = (issued.chain_path, issued.key_path)
    crls = [path for path in pki.crl_paths if path.is_file()]
    return client_context(pki.ca_bundle_path, cert_chain=identity[0], key=identity[1], crls=crls,
                          extra_anchors=settings.pki.trust_anchors)


@dataclass
class Backoff:
    """The retry table and the lifetime (module docstring)."""

    schedule: list[dt.timedelta]
    lifetime: dt.timedelta
    delay_warning: dt.timedelta | None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Backoff":
        outbound = settings.outbound
        warning = dt.timedelta(minutes=outbound.delay_warning_minutes) if outbound.delay_warning_minutes else None
        return cls([dt.timedelta(minutes=m) for m in outbound.retry_schedule_minutes],
                   dt.timedelta(hours=outbound.max_queue_lifetime_hours), warning)

    def next_attempt(self, attempts_done: int, received_at: dt.datetime, now: dt.datetime) -> dt.datetime | None:
        """When to try again after ``attempts_done`` attempts, or None when it is over."""
        if attempts_done > len(self.schedule):
            return None
        retry_at = now + self.schedule[attempts_done - 1]
        return retry_at if retry_at <= received_at + self.lifetime else None

    def retry_until(self, received_at: dt.datetime) -> dt.datetime:
        return received_at + min(self.lifetime, sum(self.schedule, dt.timedelta()))


@dataclass
class WorkerStats:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    reports: int = 0
    transactions: int = 0


class OutboundWorker:
    """Delivers remote recipients; ``start``/``stop`` from ``gateway serve``, ``run_once`` for tests and tools."""

    def __init__(self, db: Database, settings: Settings, generated: GeneratedMailQueue, *, tls_context: ssl.SSLContext,
                 resolver: MxResolver | None = None, signer: DkimSigner | None = None) -> None:
        self.settings = settings
        self.outbound = settings.outbound
        self.store = OutboundStore(db)
        self.queue = QueueStore(db)
        self.tls_context = tls_context
        self.spool = generated.spool                 # the one sealed spool, the generated-mail queue's
        self.generated = generated                   # its DSNs take the one generated-mail queue (MailQueue's)
        self.reports = DsnReports(settings, generated, self.spool)
        self.mx = resolver or MxResolver(settings.outbound)
        self.signer = signer or DkimSigner(DkimKeys(key_directory(settings)), settings.dkim)
        self.backoff = Backoff.from_settings(settings)
        self.stats = WorkerStats()
        self._slots = asyncio.Semaphore(self.outbound.max_concurrent_deliveries)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="outbound-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)

    def wake(self) -> None:
        """Look for work now (a message was queued, or an administrator asked for a retry)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("outbound pass failed; trying again at the next poll")
            try:
                await asyncio.wait_for(self._wake.wait(), self.outbound.poll_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def run_once(self, *, wait: bool = True) -> int:
        """Claim what is due and deliver it (at most ``max_concurrent_deliveries`` at once); returns
        the number of transactions started."""
        lease = dt.timedelta(seconds=self.outbound.connect_timeout_seconds + 6 * self.outbound.command_timeout_seconds)
        batches = await self.store.claim_due(lease=lease)
        tasks = [asyncio.create_task(self._deliver_guarded(batch), name=f"outbound-{batch.message.id}-{batch.domain}")
                 for batch in batches]
        self._inflight.update(tasks)
        for task in tasks:
            task.add_done_callback(self._inflight.discard)
        if wait and tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def _deliver_guarded(self, batch: DomainBatch) -> None:
        async with self._slots:
            try:
                await self.deliver(batch)
            except Exception:
                log.exception("delivery of %s to %s crashed; its lease expires and it is tried again",
                              batch.message.id, batch.domain)

    # ----------------------------------------------------------------- one transaction

    async def deliver(self, batch: DomainBatch) -> None:
        self.stats.transactions += 1
        try:
            hosts = await self.mx.hosts_for(batch.domain)
        except RouteFailure as failure:
            kind = RecipientState.FAILED if failure.permanent else RecipientState.DEFERRED
            outcomes = _all(batch, kind, str(failure), enhanced=failure.enhanced)
        else:
            outcomes = await self._try_hosts(batch, hosts)
        await self._settle(batch, outcomes)

    async def _try_hosts(self, batch: DomainBatch, hosts: Sequence[MxHost]) -> list[Outcome]:
        """RFC 5321 5.1: each host in preference order, each of its addresses, until one takes the transaction."""
        problems: list[str] = []
        last: HopFailure | None = None
        last_hop: HopContext | None = None
        for host in hosts:
            for ip in host.addresses:
                hop = HopContext(host, ip)
                try:
                    return await self._transaction(batch, hop)
                except HopFailure as failure:
                    problems.append(f"{host.name}[{ip}]:{host.port}: {failure}")
                    last, last_hop = failure, hop
                    log.info("outbound %s via %s[%s]: %s", batch.message.id, host.name, ip, failure)
        assert last is not None and last_hop is not None
        return _all(batch, RecipientState.DEFERRED, "; ".join(problems), reply=last.reply, enhanced=last.enhanced,
                    mx_host=last_hop.host.name, ip=last_hop.ip, tls_version=last.tls_version)

    async def _transaction(self, batch: DomainBatch, hop: HopContext) -> list[Outcome]:
        client = await self._open_session(hop)
        try:
            return await self._send(client, batch, hop)
        except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError) as exc:
            raise HopFailure(f"connection lost during the transaction: {_describe_error(exc)}",
                             tls_version=client.tls_version) from None
        finally:
            await client.close()

    async def _open_session(self, hop: HopContext) -> SmtpClient:
        """Connect, greeting, EHLO, STARTTLS (required), verified handshake, EHLO again."""
        try:
            client = await SmtpClient.connect(hop.ip, hop.host.port, connect_timeout=self.outbound.connect_timeout_seconds,
                                              command_timeout=self.outbound.command_timeout_seconds)
        except (OSError, asyncio.TimeoutError) as exc:
            raise HopFailure(f"cannot connect: {_describe_error(exc)}", enhanced="4.4.1") from None
        try:
            await self._secure(client, hop)
        except HopFailure:
            await client.close()
            raise
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            await client.close()
            raise HopFailure(f"session failed before MAIL: {_describe_error(exc)}", enhanced="4.4.2") from None
        return client

    async def _secure(self, client: SmtpClient, hop: HopContext) -> None:
        greeting = await client.read_reply()
        if greeting.code != 220:
            raise HopFailure(f"greeting refused: {greeting}", reply=greeting, enhanced="4.4.1")
        reply = await client.ehlo(self.settings.hostname)
        if reply.code != 250:
            raise HopFailure(f"EHLO refused: {reply}", reply=reply, enhanced="4.4.1")
        if not client.supports("STARTTLS"):
            # MSSanté: TLS on every hop. RFC 3207 leaves the choice to the client; ours is to wait.
            raise HopFailure(f"{hop.host.name} does not offer STARTTLS; MSSanté requires TLS, mail is never sent "
                             "in plaintext", enhanced="4.7.10")
        reply = await client.command("STARTTLS")
        if reply.code != 220:
            raise HopFailure(f"STARTTLS refused: {reply}", reply=reply, enhanced="4.7.10")
        try:
            await client.starttls(self.tls_context, hop.host.name)
        except ssl.SSLCertVerificationError as exc:
            certificate = await self._describe_peer_certificate(hop)
            raise HopFailure(f"TLS certificate of {hop.host.name} not accepted: {exc.verify_message or exc.reason}"
                             f"{'; ' + certificate if certificate else ''}", enhanced="4.7.5") from None
        except ssl.SSLError as exc:
            raise HopFailure(f"TLS handshake with {hop.host.name} failed: {exc.reason or exc}", enhanced="4.7.5") from None
        try:
            reply = await client.ehlo(self.settings.hostname)          # RFC 3207 4.2: EHLO again after TLS
        except (OSError, ConnectionError) as exc:                      # ssl.SSLError is an OSError
            # TLS 1.3 (RFC 8446 4.4.2.4): the server checks our certificate after our side of the handshake
            # is done, so its refusal (an alert, or a reset racing it) only shows on the first read.
            raise HopFailure(f"{hop.host.name} ended the TLS session before answering EHLO ({_describe_error(exc)}): "
                             "it did not accept our client certificate (not under its trust anchors, expired or revoked?)",
                             enhanced="4.7.5", tls_version=client.tls_version) from None
        if reply.code != 250:
            raise HopFailure(f"EHLO after STARTTLS refused: {reply}", reply=reply, tls_version=client.tls_version)

    async def _describe_peer_certificate(self, hop: HopContext) -> str | None:
        """For the error message only (nhin-d#202: name the certificate): fetch the rejected certificate
        in a second handshake that verifies nothing and sends no mail."""
        try:
            client = await SmtpClient.connect(hop.ip, hop.host.port, connect_timeout=self.outbound.connect_timeout_seconds,
                                              command_timeout=min(30.0, self.outbound.command_timeout_seconds))
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            await client.read_reply()
            await client.ehlo(self.settings.hostname)
            if (await client.command("STARTTLS")).code != 220:
                return None
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.check_hostname = False
            probe.verify_mode = ssl.CERT_NONE
            await client.starttls(probe, hop.host.name)
            der = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        except (OSError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
            return None
        finally:
            client.writer.close()
        return _certificate_summary(der) if der else None

    async def _send(self, client: SmtpClient, batch: DomainBatch, hop: HopContext) -> list[Outcome]:
        message = batch.message
        tls, has_dsn = client.tls_version, client.supports("DSN")
        prefix = await self._prefix(message)
        size = len(prefix) + message.size
        refusal = self._cannot_send(client, message, size)
        if refusal is not None:
            return _all(batch, RecipientState.FAILED, refusal[1], enhanced=refusal[0], mx_host=hop.host.name,
                        ip=hop.ip, tls_version=tls)
        reply = await client.command(f"MAIL FROM:<{message.sender}>{self._mail_parameters(client, message, size)}")
        if not reply.is_success:
            return [_from_reply(r, reply, hop, tls, has_dsn, "MAIL FROM") for r in batch.recipients]
        outcomes: dict[int, Outcome] = {}
        accepted: list[RecipientWork] = []
        for recipient in batch.recipients:
            reply = await client.command(f"RCPT TO:<{recipient.address}>{self._rcpt_parameters(client, recipient)}")
            if reply.is_success:
                accepted.append(recipient)
            else:
                outcomes[recipient.id] = _from_reply(recipient, reply, hop, tls, has_dsn, "RCPT TO")
        if accepted:
            for outcome in await self._data(client, message, prefix, accepted, hop):
                outcomes[outcome.recipient.id] = outcome
        return [outcomes[r.id] for r in batch.recipients]

    async def _data(self, client: SmtpClient, message: MessageWork, prefix: bytes,
                    accepted: list[RecipientWork], hop: HopContext) -> list[Outcome]:
        tls, has_dsn = client.tls_version, client.supports("DSN")
        reply = await client.command("DATA")
        if reply.code != 354:
            return [_from_reply(r, reply, hop, tls, has_dsn, "DATA") for r in accepted]
        reply = await client.send_data(message_chunks(prefix, await self.spool.opener(message.id)))
        return [_from_reply(r, reply, hop, tls, has_dsn, "end of data") for r in accepted]

    async def _prefix(self, message: MessageWork) -> bytes:
        """DKIM-Signature (computed once, stored), then our trace fields."""
        signature = await self.store.dkim_signature(message.id)
        if signature is None:
            signature = await self.signer.signature_for_stream(await self.spool.opener(message.id))
            if signature is not None:
                await self.store.save_dkim_signature(message.id, signature)
        return (signature or "").encode("ascii") + remote_trace_headers(message.trace_headers)

    @staticmethod
    def _cannot_send(client: SmtpClient, message: MessageWork, size: int) -> tuple[str, str] | None:
        """Permanent refusals we can tell before MAIL: (enhanced code, text)."""
        if message.smtputf8 and not client.supports("SMTPUTF8"):
            return "5.6.7", "the message needs SMTPUTF8 (RFC 6531 3.4) and the receiving server does not offer it"
        limit = client.extensions.get("SIZE", "")
        if limit.isascii() and limit.isdigit() and int(limit) > 0 and size > int(limit):
            return "5.3.4", f"message of {size} octets exceeds the receiving server's SIZE limit of {limit} (RFC 1870)"
        return None

    @staticmethod
    def _mail_parameters(client: SmtpClient, message: MessageWork, size: int) -> str:
        params = []
        if client.supports("SIZE"):
            params.append(f"SIZE={size}")                                   # RFC 1870 6
        if message.body_type.upper() == "8BITMIME" and client.supports("8BITMIME"):
            params.append("BODY=8BITMIME")                                  # RFC 6152 3
        if message.smtputf8:
            params.append("SMTPUTF8")                                       # RFC 6531 3.4
        if client.supports("DSN"):
            if message.ret:
                params.append(f"RET={message.ret}")                         # RFC 3461 4.3
            if message.envid:
                params.append(f"ENVID={encode_xtext(message.envid)}")       # RFC 3461 4.4
        return "".join(" " + p for p in params)

    @staticmethod
    def _rcpt_parameters(client: SmtpClient, recipient: RecipientWork) -> str:
        if not client.supports("DSN"):
            return ""
        params = []
        if recipient.notify:
            params.append(f"NOTIFY={recipient.notify.upper()}")              # RFC 3461 4.1
        if recipient.orcpt:
            addr_type, _, address = recipient.orcpt.partition(";")
            params.append(f"ORCPT={addr_type};{encode_xtext(address)}")      # RFC 3461 4.2
        return "".join(" " + p for p in params)

    # ----------------------------------------------------------------- settling

    async def _settle(self, batch: DomainBatch, outcomes: list[Outcome]) -> None:
        now = utcnow()
        records = [self._record(batch.message, outcome, now) for outcome in outcomes]
        prepared = await self._reports(batch, outcomes, records, now)
        delay_mark = batch.message.id if any(action is Action.DELAYED for action, _ in prepared) else None
        rows = [row for _, row in prepared]
        try:
            await self.store.settle(records, rows, delay_reported=delay_mark)
        except BaseException:
            for row in rows:
                self.reports.discard(row)
            raise
        self._after_commit(batch, records, rows)
        await self._finish(batch.message.id)

    def _record(self, message: MessageWork, outcome: Outcome, now: dt.datetime) -> AttemptRecord:
        """Apply the backoff table; a temporary failure with no retry left becomes final (5.4.7)."""
        next_at = None
        if outcome.kind is RecipientState.DEFERRED:
            next_at = self.backoff.next_attempt(outcome.recipient.attempts + 1, message.received_at, now)
            if next_at is None:
                outcome.kind = RecipientState.FAILED
                outcome.text = f"gave up after {outcome.recipient.attempts + 1} attempts: {outcome.text}"
                outcome.final_status = "5.4.7"                        # RFC 3463 X.4.7: delivery time expired
        status = outcome.status
        if outcome.kind is RecipientState.FAILED and not status.startswith("5"):
            status = "5" + status[1:]                                 # RFC 3463 2: a permanent failure is class 5
        reply = outcome.reply
        return AttemptRecord(recipient_id=outcome.recipient.id, outcome=outcome.kind, reply=outcome.text,
                             reply_code=reply.code if reply else None, enhanced_code=status,
                             mx_host=outcome.mx_host, ip=outcome.ip, tls_version=outcome.tls_version,
                             next_attempt_at=next_at, attempted_at=now)

    async def _reports(self, batch: DomainBatch, outcomes: list[Outcome], records: list[AttemptRecord],
                       now: dt.datetime) -> list[tuple[Action, PreparedMail]]:
        """The DSNs this attempt calls for: failures, the one delay warning, relayed successes."""
        message = batch.message
        wanted: dict[Action, list[RecipientReport]] = {Action.FAILED: [], Action.DELAYED: [], Action.RELAYED: []}
        delay_due = await self._delay_due(message, now)
        for outcome, record in zip(outcomes, records):
            action = self._action_for(outcome, delay_due)
            if action is not None and wants_report(outcome.recipient.notify, action):
                wanted[action].append(self._recipient_report(message, outcome, record, action, now))
        prepared: list[tuple[Action, PreparedMail]] = []
        for action, reports in wanted.items():
            rows = await self.reports.prepare(message, reports) if reports else None
            if rows is not None:
                prepared.append((action, rows))
        return prepared

    @staticmethod
    def _action_for(outcome: Outcome, delay_due: bool) -> Action | None:
        if outcome.kind is RecipientState.FAILED:
            return Action.FAILED
        if outcome.kind is RecipientState.DEFERRED and delay_due:
            return Action.DELAYED
        if outcome.kind is RecipientState.DELIVERED and not outcome.peer_has_dsn and outcome.recipient.notify \
                and "SUCCESS" in outcome.recipient.notify.upper():
            return Action.RELAYED                      # RFC 3461 5.2.2: the peer will not report success
        return None

    async def _delay_due(self, message: MessageWork, now: dt.datetime) -> bool:
        warning = self.backoff.delay_warning
        if warning is None or now - message.received_at < warning:
            return False
        return not await self.store.delay_reported(message.id)

    def _recipient_report(self, message: MessageWork, outcome: Outcome, record: AttemptRecord, action: Action,
                          now: dt.datetime) -> RecipientReport:
        diagnostic = str(outcome.reply) if outcome.reply else outcome.text
        status = record.enhanced_code or outcome.status
        if action is Action.RELAYED:
            status = "2.0.0"
        elif action is Action.DELAYED:
            status = "4" + status[1:]
        return RecipientReport(
            final_recipient=outcome.recipient.address, action=action, status=status,
            diagnostic=diagnostic if action is not Action.RELAYED else None, remote_mta=outcome.mx_host,
            original_recipient=outcome.recipient.orcpt, last_attempt=now,
            will_retry_until=self.backoff.retry_until(message.received_at) if action is Action.DELAYED else None)

    def _after_commit(self, batch: DomainBatch, records: list[AttemptRecord], rows: list[PreparedMail]) -> None:
        for record in records:
            if record.outcome is RecipientState.DELIVERED:
                self.stats.delivered += 1
            elif record.outcome is RecipientState.FAILED:
                self.stats.failed += 1
            else:
                self.stats.deferred += 1
            log.info("outbound %s -> %s: %s via %s (%s)", batch.message.id, record.recipient_id, record.outcome.value,
                     record.mx_host or "-", record.reply[:200])
        self.stats.reports += len(rows)
        for row in rows:
            self.reports.dispatch(row)

    async def _finish(self, message_id: str) -> None:
        """Every recipient done: the message row is closed and its spool file goes."""
        if await self.queue.finish_if_done(message_id):
            self.spool.remove(message_id)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"address error: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _certificate_summary(der: bytes) -> str:
    from cryptography import x509
    info = describe_certificate(x509.load_der_x509_certificate(der))
    names = ", ".join(info["dns_names"]) or info["common_name"] or "no name"
    return (f"certificate subject {info['subject']} (names: {names}), issuer {info['issuer']}, "
            f"serial {info['serial']}, sha256 {info['fingerprint_sha256'][:16]}")

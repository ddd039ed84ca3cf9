"""Messages: the inbox, conversations with professionals, reading, attachments, replies.

Everything goes through the ``MailStore`` interface, on the signed-in
patient's own mailbox (a UID names a message of *their* INBOX, so another
patient's message cannot be named at all). Reading sets ``\\Seen`` in the same
store IMAP uses. A reply is submitted through the SMTP pipeline
(``Pipeline.start_transaction`` / ``add_recipient`` / ``accept`` with a webmail
``Origin``): the rule that a patient writes only to a professional who wrote
first, until ``X-MSS-MES: FIN``, is the pipeline's; this module only explains it.
"""

from __future__ import annotations

import datetime as dt
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from typing import Any
from urllib.parse import quote

from aiohttp import web
from sqlalchemy import select

from gateway.directory.addresses import normalise_address
from gateway.errors import UserError
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.errors import FolderNotFound, MessageNotFound
from gateway.mailstore.interface import INBOX, SEEN, All, FolderRef, Header, MessageMeta, StoreMode, UidIn, UidSet
from gateway.pipeline.tables import Conversation
from gateway.pipeline.origin import Door, Origin, TlsInfo
from gateway.mail import codes
from gateway.mail.codes import MailRefusal
from gateway.mail.parameters import MailParameters, RcptParameters
from gateway.mail.paths import SmtpPath
from gateway.storage.models import utcnow
from gateway.webmail import reading
from gateway.webmail.auth import PatientIdentity, require_patient
from gateway.webmail.web import N_, add_nav, client_ip, context, refusal, refused, render, translate

PAGE_SIZE = 50
CONVERSATION_WINDOW = 200   # newest messages of a folder a conversation page looks through
SENT = "Sent"
MAX_REPLY_CHARS = 20000

SMIME_WORDS = {
    "pass": N_("Signed by the sender: signature checked, the message has not been changed."),
    "none": N_("Not signed: the message came through the secure health messaging network."),
    "fail": N_("Warning: the signature of this message is not valid. Be careful with its content."),
    "policy": N_("Signed, but the signature does not match the sender's address. Be careful with its content."),
    "neutral": N_("Encrypted for another recipient: the signature could not be checked."),
    "permerror": N_("The signature of this message could not be read."),
}


def install(app: web.Application) -> None:
    app.router.add_get("/", inbox)
    app.router.add_get("/messages/{uid:\\d+}", read_message)
    app.router.add_get("/messages/{uid:\\d+}/pieces/{index:\\d+}", download_attachment)
    app.router.add_get("/conversations/{address}", conversation)
    app.router.add_post("/conversations/{address}/repondre", reply)
    add_nav(app, "/", N_("Messages"))


def _inbox(patient: PatientIdentity) -> FolderRef:
    return FolderRef(patient.mailbox_id, INBOX)


async def _uids(request: web.Request, folder: FolderRef, key: Any = None) -> list[int]:
    try:
        return list(await context(request).services.mailstore.search(folder, key or All(())))
    except FolderNotFound:
        return []   # nothing delivered yet: the folders are provisioned by the first delivery


async def _metas(request: web.Request, folder: FolderRef, uids: list[int]) -> list[MessageMeta]:
    if not uids:
        return []
    metas = await context(request).services.mailstore.fetch(folder, UidSet.from_uids(uids))
    return sorted(metas, key=lambda meta: meta.uid, reverse=True)


async def inbox(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    uids = await _uids(request, _inbox(patient))
    page_text = request.query.get("page", "1")
    page = max(1, int(page_text)) if page_text.isascii() and page_text.isdigit() else 1
    newest = sorted(uids, reverse=True)[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]
    metas = await _metas(request, _inbox(patient), newest)
    return render(request, "inbox.html", {"messages": metas, "total": len(uids), "page": page,
                                          "more": page * PAGE_SIZE < len(uids), "quote": quote})


async def _raw(request: web.Request, folder: FolderRef, uid: int) -> bytes | None:
    """The message's bytes, or None when it is not in this patient's own ``folder``."""
    try:
        async with await context(request).services.mailstore.open_message(folder, uid) as body:
            data: bytes = await body.read()
            return data
    except (MessageNotFound, FolderNotFound):
        return None


async def _own_raw(request: web.Request, folder: FolderRef, uid: int) -> bytes:
    """The message asked for by its id; 404 when it is not in the patient's own mailbox (the pages only link to
    its messages: another patient's id, or a probe), a refusal the door audits."""
    raw = await _raw(request, folder, uid)
    if raw is None:
        raise refusal(request, web.HTTPNotFound(), "not-yours")
    return raw


async def read_message(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    uid = int(request.match_info["uid"])
    ctx = context(request)
    raw = await _own_raw(request, _inbox(patient), uid)
    # RFC 3501 6.4.5: reading the body sets \Seen; the same store, so IMAP clients see it too.
    await ctx.services.mailstore.store_flags(_inbox(patient), UidSet.of(uid), StoreMode.ADD, [SEEN])
    message = reading.read(raw, authserv_id=ctx.settings.hostname)
    state = await conversation_state(request, patient, message.from_address)
    return render(request, "message.html", {
        "uid": uid, "m": message, "smime_words": translate(request, SMIME_WORDS.get(message.smime, SMIME_WORDS["permerror"])),
        "state": state, "quote": quote, "title": message.subject or translate(request, "(no subject)")})


async def download_attachment(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    raw = await _own_raw(request, _inbox(patient), int(request.match_info["uid"]))
    part = reading.attachment_part(raw, int(request.match_info["index"]))
    if part is None:
        raise web.HTTPNotFound()
    payload = part.get_payload(decode=True)
    name = reading.safe_filename(part.get_filename(), int(request.match_info["index"]))
    response = web.Response(body=payload if isinstance(payload, bytes) else b"")
    # Never rendered by the browser: a download, typed opaquely, sandboxed if opened anyway.
    response.headers["Content-Type"] = "application/octet-stream"
    response.headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(name)}"   # RFC 6266 4.3, RFC 8187
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
    return response


# ------------------------------------------------------------------ conversations

async def conversation_state(request: web.Request, patient: PatientIdentity, address: str) -> str:
    """open / ended / never: whether this professional wrote to the patient and did not end the exchange.

    Only an explanation for the page: the pipeline decides when a reply is submitted.
    """
    async with context(request).services.db.session() as s:
        row = await s.scalar(select(Conversation).where(Conversation.professional_address == address,
                                                        Conversation.patient_mailbox_id == patient.mailbox_id))
    if row is None:
        return "never"
    return "ended" if row.closed_at is not None else "open"


def _address(request: web.Request) -> str:
    try:
        return normalise_address(request.match_info["address"])
    except UserError:
        raise web.HTTPNotFound() from None


async def conversation(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    address = _address(request)
    received, inbox_window = await _exchanged(request, _inbox(patient), Header("from", address))
    sent, sent_window = await _exchanged(request, FolderRef(patient.mailbox_id, SENT), Header("to", address))
    state = await conversation_state(request, patient, address)
    if not received and not sent and state == "never":
        raise web.HTTPNotFound()
    names = [parseaddr(meta.from_addr or "")[0] for meta in received]
    thread = sorted([(meta, False) for meta in received] + [(meta, True) for meta in sent],
                    key=lambda item: item[0].internaldate)
    return render(request, "conversation.html", {
        "address": address, "who": next((n for n in names if n), address), "thread": thread, "state": state,
        "window": CONVERSATION_WINDOW if inbox_window or sent_window else None,
        "last_uid": received[0].uid if received else None, "quote": quote, "title": address,
        "sent": "envoye" in request.query})


async def _exchanged(request: web.Request, folder: FolderRef, header: Header) -> tuple[list[MessageMeta], bool]:
    """Messages matching ``header`` among the folder's newest CONVERSATION_WINDOW (the newest PAGE_SIZE of them),
    and whether older messages were left out. Sender and recipient are sealed at rest: the window bounds how
    many the server unseals for one page (bench/webmail.py)."""
    uids = sorted(await _uids(request, folder))
    window = uids[-CONVERSATION_WINDOW:]
    if not window:
        return [], False
    matching = await _uids(request, folder, All((UidIn(UidSet.from_uids(window)), header)))
    return await _metas(request, folder, sorted(matching)[-PAGE_SIZE:]), len(uids) > len(window)


async def reply(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    address = _address(request)
    form = await request.post()
    text = str(form.get("text", "")).strip()
    if not text or len(text) > MAX_REPLY_CHARS:
        raise web.HTTPBadRequest(text=translate(request, N_("Write your reply (at most %(count)s characters)."),
                                                count=MAX_REPLY_CHARS))
    original = await _original(request, patient, address, str(form.get("in_reply_to", "")))
    raw = compose_reply(patient, address, text, original, hostname=context(request).settings.hostname)
    try:
        await submit(request, patient, address, raw)
    except MailRefusal as mail_refusal:
        return await _refused(request, patient, address, mail_refusal)
    await _keep_in_sent(request, patient, raw)
    raise web.HTTPSeeOther(f"/conversations/{quote(address)}?envoye=1")


async def _original(request: web.Request, patient: PatientIdentity, address: str,
                    uid_text: str) -> reading.ReadMessage | None:
    """The message replied to: one of the patient's own, from this professional (else none)."""
    if not (uid_text.isascii() and uid_text.isdigit()):
        return None
    raw = await _raw(request, _inbox(patient), int(uid_text))
    if raw is None:
        return None
    message = reading.read(raw, authserv_id=context(request).settings.hostname)
    return message if message.from_address == address else None


def compose_reply(patient: PatientIdentity, address: str, text: str, original: reading.ReadMessage | None,
                  *, hostname: str) -> bytes:
    message = EmailMessage()
    message["From"] = formataddr((patient.display_name, patient.address))
    message["To"] = address
    subject = original.subject if original else ""
    message["Subject"] = subject if subject.lower().startswith("re:") else f"Re: {subject}".strip()
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = make_msgid(domain=hostname)
    if original and original.message_id:
        # RFC 5322 3.6.4: In-Reply-To the parent, References its references then the parent.
        message["In-Reply-To"] = original.message_id
        message["References"] = " ".join(filter(None, [original.references, original.message_id]))
    message.set_content(text, charset="utf-8", cte="quoted-printable")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


async def submit(request: web.Request, patient: PatientIdentity, address: str, raw: bytes) -> str:
    """Submit through the one pipeline, as an authenticated webmail origin; MailRefusal when policy says no."""
    ctx = context(request)
    pipeline = ctx.extras.get("pipeline")
    if pipeline is None:
        raise web.HTTPServiceUnavailable(text=translate(request, N_("Sending is not available at the moment.")))
    account = await ctx.services.directory.account(patient.address)
    if account is None:
        raise refusal(request, web.HTTPForbidden(), "no-account")
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    origin = Origin(door=Door.WEBMAIL, client_address=client_ip(request) or "127.0.0.1", account=account,
                    auth_mechanism="webmail", tls=TlsInfo.from_ssl_object(ssl_object) if ssl_object else None)
    sender_local, _, sender_domain = patient.address.partition("@")
    local, _, domain = address.partition("@")
    transaction = await pipeline.start_transaction(origin, SmtpPath(sender_local, sender_domain),
                                                   MailParameters(size=len(raw), body="8BITMIME"))
    await pipeline.add_recipient(transaction, SmtpPath(local, domain), RcptParameters())
    spool_file = pipeline.open_spool()
    try:
        spool_file.write(raw)
    except BaseException:
        spool_file.discard()
        raise
    queue_id: str = await pipeline.accept(transaction, spool_file)
    return queue_id


async def _keep_in_sent(request: web.Request, patient: PatientIdentity, raw: bytes) -> None:
    store = context(request).services.mailstore
    await LocalDelivery(store).provision(patient.mailbox_id)
    await store.append(FolderRef(patient.mailbox_id, SENT), raw, flags=[SEEN], internaldate=dt.datetime.now(dt.timezone.utc))


async def _refused(request: web.Request, patient: PatientIdentity, address: str, mail_refusal: MailRefusal) -> web.Response:
    if codes.is_policy_refusal(mail_refusal.reply):      # as the SMTP doors audit the same refusal
        refused(request, "mail-policy", str(mail_refusal.reply))
    reason = {"never": N_("You cannot start a conversation: only a professional who wrote to you can receive your reply."),
              "ended": N_("This professional has ended the conversation: you can no longer reply to it."),
              }.get(await conversation_state(request, patient, address),
                    N_("Your message could not be sent."))
    return render(request, "refused.html", {
        "title": translate(request, N_("Message not sent")), "reason": translate(request, reason),
        "detail": f"{mail_refusal.reply.code} {mail_refusal.reply.enhanced}", "address": address, "quote": quote},
        status=403)

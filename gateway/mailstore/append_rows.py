"""The rows of one APPEND or local delivery, written by one synchronous function over a ``Connection``.

``SqlMailStore.add_message`` runs ``insert_append`` through ``Database.run_in_transaction`` (on SQLite
inside the mail store's group commit, several deliveries per transaction): the whole transaction is one
hop to a database thread, where it used to be a thread hop and an event-loop wake-up per statement.
The statements are SQL Core built once at import and run on SQLite's driver directly
(``gateway.storage.prepared``); the blind index tokens are one packed row (``blind_index.pack``).

Per message: the quota (one SELECT), UIDNEXT and MODSEQ (one UPDATE ... RETURNING, which on PostgreSQL
also locks the folder row), the message row, its body when inline (``inline_blobs``), its index tokens, the delivery row, then the caller's rows
(``after``: the queue's outcome, the filing job). On SQLite the transaction began with BEGIN IMMEDIATE,
so the reads are already the writer's and no no-op write is needed to take the lock first.

Every refusal (over quota, folder gone, UIDVALIDITY changed) is raised before the first row is written,
so a refused writer leaves a shared group-commit transaction untouched.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.engine import Connection

from gateway.mailstore import flags as flagcodec
from gateway.mailstore import names
from gateway.mailstore.blind_index import message_tokens_row
from gateway.mailstore.errors import (
    FolderNotFound,
    MailboxNotHosted,
    QuotaExceeded,
    UidValidityChanged,
)
from gateway.mailstore.headers import CachedHeaders
from gateway.mailstore.interface import AppendResult, FolderRef
from gateway.mailstore.tables import Delivery, Folder, Message, MessageTokens
from gateway.storage.blobs import StoredBlob, insert_inline
from gateway.storage.models import Mailbox, utcnow
from gateway.storage.prepared import Prepared

# Rows committed with a delivery, in its transaction: ``after(connection, delivery row id)``.
AfterInsert = Callable[[Connection, "int | None"], None]
# The caller's check, first in the transaction (before any row): raises a MailStoreError to refuse.
BeforeInsert = Callable[[Connection], None]

MESSAGES = cast(Table, Message.__table__)
FOLDERS = cast(Table, Folder.__table__)
DELIVERIES = cast(Table, Delivery.__table__)
MESSAGE_TOKENS = cast(Table, MessageTokens.__table__)
MAILBOXES = cast(Table, Mailbox.__table__)

# RFC 9208 4.3: the quota and what the folders hold, in one statement (every delivery asks).
_QUOTA = Prepared(select(
    MAILBOXES.c.quota_bytes,
    select(func.coalesce(func.sum(FOLDERS.c.total_bytes), 0))
    .where(FOLDERS.c.mailbox_id == bindparam("mailbox")).scalar_subquery(),
).where(MAILBOXES.c.id == bindparam("mailbox")))

_BY_NAME = (FOLDERS.c.mailbox_id == bindparam("mailbox"), FOLDERS.c.name == bindparam("folder_name"))
# RFC 3501 2.3.1.1 / RFC 7162 3.1: the next UID and MODSEQ, taken in the statement that counts the message.
_TAKE_UID = (update(FOLDERS).where(*_BY_NAME)
             .values(uidnext=FOLDERS.c.uidnext + 1, highestmodseq=FOLDERS.c.highestmodseq + 1,
                     message_count=FOLDERS.c.message_count + 1,
                     total_bytes=FOLDERS.c.total_bytes + bindparam("added_size"))
             .returning(FOLDERS.c.id, FOLDERS.c.name, FOLDERS.c.uidvalidity, FOLDERS.c.uidnext,
                        FOLDERS.c.highestmodseq, FOLDERS.c.keywords))
_TAKE_UID_OF = Prepared(_TAKE_UID.where(FOLDERS.c.uidvalidity == bindparam("folder_uidvalidity")))
_TAKE_UID_ANY = Prepared(_TAKE_UID)
_FOLDER_VALIDITY = Prepared(select(FOLDERS.c.uidvalidity).where(*_BY_NAME))
_SET_KEYWORDS = Prepared(update(FOLDERS).where(FOLDERS.c.id == bindparam("folder"))
                         .values(keywords=bindparam("keywords")))
_INSERT_MESSAGE = Prepared(insert(MESSAGES).returning(MESSAGES.c.id))
_INSERT_DELIVERY = Prepared(insert(DELIVERIES).returning(DELIVERIES.c.id))
_INSERT_TOKENS = Prepared(insert(MESSAGE_TOKENS))


@dataclass(frozen=True)
class AppendRows:
    """What one APPEND or delivery writes, prepared in the event loop (blob stored, headers sealed, tokens)."""

    ref: FolderRef
    stored: StoredBlob
    headers: CachedHeaders               # sealed already when the store seals
    bits: int
    keywords: frozenset[str]
    internaldate: dt.datetime
    delivery_key: str | None
    tokens: set[int] | None              # the blind index tokens (None: the store has no index)
    after: AfterInsert | None = None
    before: BeforeInsert | None = None


def enforce_quota(connection: Connection, mailbox_id: int, adding: int) -> None:
    row = _QUOTA.run(connection, {"mailbox": mailbox_id}).fetchone()
    if row is None or row[0] is None:
        raise MailboxNotHosted(f"mailbox {mailbox_id} does not exist")
    limit, used = int(row[0]), int(row[1])
    if limit and used + adding > limit:
        # RFC 9208 4.3 / SMTP 552 5.2.2 (RFC 3463 3.3).
        raise QuotaExceeded(f"mailbox over quota ({used + adding} > {limit} octets)")


def insert_append(connection: Connection, rows: AppendRows) -> AppendResult:
    """The rows of one message, inside the caller's transaction; refusals before the first write."""
    ref, stored = rows.ref, rows.stored
    if rows.before is not None:
        rows.before(connection)
    enforce_quota(connection, ref.mailbox_id, stored.size)
    wanted = {"mailbox": ref.mailbox_id, "folder_name": names.normalise(ref.name), "added_size": stored.size}
    if ref.uidvalidity is None:
        folder = _TAKE_UID_ANY.run(connection, wanted).fetchone()
    else:
        folder = _TAKE_UID_OF.run(connection, {**wanted, "folder_uidvalidity": ref.uidvalidity}).fetchone()
    if folder is None:                   # nothing was written: the folder is gone, or was re-created
        # Only a ref that names a UIDVALIDITY can find it changed. Without one, the folder was absent when the
        # UPDATE ran; on PostgreSQL (READ COMMITTED) a concurrent first delivery may have created it since, and
        # the next statement would see it: still "not found", so that the caller provisions (idempotently) and
        # retries, rather than "re-created".
        if ref.uidvalidity is not None and _FOLDER_VALIDITY.run(connection, wanted).fetchone() is not None:
            raise UidValidityChanged(f"folder {ref.name!r} was re-created")
        raise FolderNotFound(f"no folder {ref.name!r}")
    folder_id, folder_name, uidvalidity, uidnext, modseq, folder_keywords = folder
    uid = uidnext - 1
    known = flagcodec.keywords_of(folder_keywords)
    if not known.issuperset(rows.keywords):
        _SET_KEYWORDS.run(connection, {"folder": folder_id,
                                       "keywords": flagcodec.keywords_column(known | rows.keywords)})
    headers = rows.headers
    message_id = _INSERT_MESSAGE.run(connection, {
        "folder_id": folder_id, "uid": uid, "modseq": modseq, "system_flags": rows.bits,
        "keywords": flagcodec.keywords_column(rows.keywords), "internaldate": rows.internaldate,
        "size": stored.size, "blob_id": stored.blob_id, "message_id": headers.message_id,
        "subject": headers.subject, "from_addr": headers.from_addr, "to_addr": headers.to_addr,
        "cc_addr": headers.cc_addr, "sent_date": headers.sent_date, "envelope": headers.envelope,
        "envelope_sealed": headers.envelope_sealed,
    }).fetchone()[0]
    if stored.sealed is not None:        # an inline body: durable with this commit (``storage/blobs.py``)
        insert_inline(connection, stored)
    if rows.tokens:                      # the blind index row, in the message's transaction
        write_tokens(connection, ref.mailbox_id, message_id, rows.tokens)
    delivery_id = None
    if rows.delivery_key is not None:
        delivery_id = _INSERT_DELIVERY.run(connection, {
            "delivery_key": rows.delivery_key, "mailbox_id": ref.mailbox_id, "folder_name": folder_name,
            "uidvalidity": uidvalidity, "uid": uid, "delivered_at": utcnow()}).fetchone()[0]
    if rows.after is not None:
        rows.after(connection, delivery_id)
    return AppendResult(uidvalidity, uid, modseq)


def write_tokens(connection: Connection, mailbox_id: int, message_id: int, tokens: set[int]) -> None:
    """One row, its about 140 tokens packed and not posted yet (a fold adds them to the mailbox's posting
    lists later, in batches; SEARCH reads the unposted rows until then)."""
    _INSERT_TOKENS.run(connection, message_tokens_row(message_id, mailbox_id, tokens))

"""The cached header columns of messages stored before raw 8-bit header octets were read as text.

Until then a header field's 8-bit octets became U+FFFD in the columns SEARCH compares (subject, From, To,
Cc, Message-ID), whether they were RFC 6532 UTF-8 or legacy ISO-8859-1 (``headers.octets_text`` now reads
them); so SEARCH SUBJECT "Café" missed those messages, and their blind-index tokens were of the U+FFFD text.
``recompute_search_columns`` (``gateway mailbox reindex``) finds the rows whose unsealed columns hold U+FFFD,
parses their header again from the sealed message, and rewrites the columns (and the ENVELOPE, from the same
parse) when they differ; the message's index row is deleted with it, so the backfill that follows indexes the
new text. Resumable: a rewritten row no longer holds U+FFFD (unless its header does), so a second run
rewrites nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, delete, select, update

from gateway.mailstore.blind_index import BlindIndex, backfill
from gateway.mailstore.envelopes import upgrade_envelopes
from gateway.mailstore.headers import MAX_HEADER_BYTES, header_section, parse_headers
from gateway.mailstore.tables import Folder, Message, MessageTokens
from gateway.security.at_rest import MESSAGE_ID_PLAINTEXT_LIMIT, HeaderSealer
from gateway.security.keys import mailbox_owner
from gateway.storage.blobs import BlobNotFound, BlobStore
from gateway.storage.db import Database

MESSAGES: Table = Message.__table__  # type: ignore[assignment]
TOKENS: Table = MessageTokens.__table__  # type: ignore[assignment]
SEARCH_COLUMNS = ("subject", "from_addr", "to_addr", "cc_addr", "message_id")
RECOMPUTE_BATCH = 500
REPLACEMENT = "\ufffd"

_ROWS = (select(MESSAGES.c.id, MESSAGES.c.blob_id, *(MESSAGES.c[column] for column in SEARCH_COLUMNS))
         .join(Folder.__table__, Folder.__table__.c.id == MESSAGES.c.folder_id)
         .where(Folder.__table__.c.mailbox_id == bindparam("mailbox"), MESSAGES.c.id > bindparam("after"))
         .order_by(MESSAGES.c.id).limit(bindparam("batch")))
# The blob id too: on SQLite a message id expunged meanwhile may name another message since.
_SET_COLUMNS = (update(MESSAGES).where(MESSAGES.c.id == bindparam("row_id"), MESSAGES.c.blob_id == bindparam("blob"))
                .values(**{column: bindparam(f"new_{column}")
                           for column in (*SEARCH_COLUMNS, "envelope", "envelope_sealed")}))


@dataclass(frozen=True)
class ReindexReport:
    recomputed: int      # messages whose header columns were recomputed
    indexed: int         # messages given their blind-index row
    envelopes: int       # ENVELOPEs rendered from an earlier form


async def reindex_mailbox(database: Database, blobs: BlobStore, sealer: HeaderSealer, index: BlindIndex,
                          mailbox_id: int, *, batch: int = RECOMPUTE_BATCH) -> ReindexReport:
    """``gateway mailbox reindex`` of one mailbox, each step resumable: the header columns recomputed first
    (their index rows deleted), then the blind index filled in and re-packed, then the ENVELOPEs rendered."""
    recomputed = await recompute_search_columns(database, blobs, sealer, mailbox_id, batch=batch)
    report = await backfill(database, index, sealer.fields, mailbox_id, batch=batch)
    rendered = await upgrade_envelopes(database, sealer.fields, mailbox_id, batch=batch)
    return ReindexReport(recomputed, report.indexed, rendered)


async def recompute_search_columns(database: Database, blobs: BlobStore, sealer: HeaderSealer, mailbox_id: int, *,
                                   batch: int = RECOMPUTE_BATCH) -> int:
    """Rewrite the search columns of the mailbox's messages that hold U+FFFD where their header's octets say
    otherwise, ``batch`` rows read per transaction; returns how many were rewritten."""
    owner = mailbox_owner(mailbox_id)
    after, rewritten = 0, 0
    while True:
        async with database.session() as session:
            rows = (await session.execute(_ROWS, {"mailbox": mailbox_id, "after": after, "batch": batch})).all()
        if not rows:
            return rewritten
        after = rows[-1][0]
        changes = [change for row in rows if (change := await _recomputed(blobs, sealer, owner, row)) is not None]
        if changes:
            async with database.session() as session:
                await session.execute(_SET_COLUMNS, changes)
                await session.execute(delete(TOKENS).where(TOKENS.c.message_id.in_(
                    [change["row_id"] for change in changes])))
                await session.commit()
            rewritten += len(changes)


async def _recomputed(blobs: BlobStore, sealer: HeaderSealer, owner: str, row: Any) -> dict[str, Any] | None:
    """The new sealed columns of one row (``_ROWS``), or None when it keeps its own."""
    row_id, blob_id, *sealed = row
    opened = {column: await sealer.fields.open(owner, column, value)
              for column, value in zip(SEARCH_COLUMNS, sealed, strict=True)}
    if not any(value is not None and REPLACEMENT in value for value in opened.values()):
        return None
    try:
        prefix = await blobs.read(owner, blob_id, 0, MAX_HEADER_BYTES)
    except BlobNotFound:        # expunged since the read
        return None
    headers = parse_headers(header_section(prefix))
    fresh = {column: getattr(headers, column) for column in SEARCH_COLUMNS}
    if fresh["message_id"] is not None:
        fresh["message_id"] = fresh["message_id"][:MESSAGE_ID_PLAINTEXT_LIMIT]
    if fresh == opened:
        return None
    resealed = await sealer.seal(owner, headers)
    return {"row_id": row_id, "blob": blob_id, "new_envelope": resealed.envelope,
            "new_envelope_sealed": resealed.envelope_sealed,
            **{f"new_{column}": getattr(resealed, column) for column in SEARCH_COLUMNS}}

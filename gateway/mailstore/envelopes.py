"""The ENVELOPE column of a sealed store: what it holds, and the upgrade of earlier rows to its rendering.

A sealed store keeps each message's RFC 3501 7.4.2 ENVELOPE as IMAP renders it (without UTF8=ACCEPT),
sealed under the mailbox's data key: ``{"imap1": token}`` (``gateway.imap.protocol.envelope.WIRE_VERSION``),
so that a FETCH decrypts one value per message and sends it as is. Rows written before it hold the
sealed JSON structure (``{"sealed": token}``) or, older still, the structure in clear: they still answer
(rendered per FETCH), and ``upgrade_envelopes`` (``gateway mailbox reindex``) rewrites them, resumably.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Table, Text, bindparam, select, type_coerce, update

from gateway.imap.protocol.envelope import WIRE_VERSION, render_envelope
from gateway.mailstore.tables import Folder, Message
from gateway.security.at_rest import ENVELOPE_WIRE_COLUMN, FieldSealer
from gateway.security.keys import mailbox_owner
from gateway.storage.db import Database

MESSAGES: Table = Message.__table__  # type: ignore[assignment]
SEALED_JSON = ('{"sealed": "', '"}')             # how json.dumps writes {"sealed": token}
SEALED_WIRE = (f'{{"{WIRE_VERSION}": "', '"}')  # and {"imap1": token}
UPGRADE_BATCH = 500


def sealed_token(text: str, form: tuple[str, str] = SEALED_JSON) -> str | None:
    """The token of a sealed ENVELOPE column without a JSON parse (base64url: no quote or escape in it)."""
    head, tail = form
    if text.startswith(head) and text.endswith(tail) and '"' not in text[len(head):-len(tail)] \
            and "\\" not in text:
        return text[len(head):-len(tail)]
    return None


def envelope_form(stored: Any) -> tuple[str, Any]:
    """What an ENVELOPE column holds (JSON text on SQLite, decoded by PostgreSQL's driver): (WIRE_VERSION,
    token) its sealed rendering, ("sealed", token) its sealed structure, ("clear", dict) the structure
    itself, ("other", None) another version's rendering (not used: the message's header is parsed)."""
    if isinstance(stored, str):
        token = sealed_token(stored, SEALED_WIRE)
        if token is not None:
            return WIRE_VERSION, token
        token = sealed_token(stored)
        if token is not None:
            return "sealed", token
        stored = json.loads(stored)
    if not isinstance(stored, dict) or not stored:
        return "clear", {}
    if len(stored) == 1:
        (key, value), = stored.items()
        if key in (WIRE_VERSION, "sealed") and isinstance(value, str):
            return key, value
        if key.startswith("imap"):
            return "other", None
    return "clear", stored


_UPGRADE_ROWS = (select(MESSAGES.c.id, type_coerce(MESSAGES.c.envelope, Text))
                 .join(Folder.__table__, Folder.__table__.c.id == MESSAGES.c.folder_id)
                 .where(Folder.__table__.c.mailbox_id == bindparam("mailbox"), MESSAGES.c.id > bindparam("after"))
                 .order_by(MESSAGES.c.id).limit(bindparam("batch")))
_SET_ENVELOPE = update(MESSAGES).where(MESSAGES.c.id == bindparam("row_id")).values(envelope=bindparam("wire"))


async def upgrade_envelopes(database: Database, fields: FieldSealer, mailbox_id: int, *,
                            batch: int = UPGRADE_BATCH) -> int:
    """Render and seal the ENVELOPE of every message of a mailbox that holds an earlier form, ``batch`` rows
    read per transaction; returns how many were rewritten. Resumable: a rewritten row is skipped next time."""
    owner = mailbox_owner(mailbox_id)
    after, upgraded = 0, 0
    while True:
        async with database.session() as session:
            rows = (await session.execute(_UPGRADE_ROWS, {"mailbox": mailbox_id, "after": after,
                                                          "batch": batch})).all()
        if not rows:
            return upgraded
        after = rows[-1][0]
        changes = []
        for row_id, stored in rows:
            form, value = envelope_form(stored)
            if form == "sealed":
                value = json.loads(await fields.open(owner, "envelope", value) or "{}")
            elif form != "clear" or not value:
                continue
            wire = await fields.seal_bytes(owner, ENVELOPE_WIRE_COLUMN, render_envelope(value))
            changes.append({"row_id": row_id, "wire": {WIRE_VERSION: wire}})
        if changes:
            async with database.session() as session:
                await session.execute(_SET_ENVELOPE, changes)
                await session.commit()
            upgraded += len(changes)

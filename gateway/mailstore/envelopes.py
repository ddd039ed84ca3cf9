"""The ENVELOPE columns of a sealed store: what they hold, and the upgrade of earlier rows to the current form.

A sealed store keeps each message's RFC 3501 7.4.2 ENVELOPE as IMAP renders it (without UTF8=ACCEPT),
sealed under the mailbox's data key, as raw octets in ``envelope_sealed``: ``WIRE_VERSION`` and a NUL
(``ENVELOPE_SEALED_TAG``), then ``key id | nonce | AES-GCM ciphertext || tag`` (the ``envelope`` JSON column
is then ``{}``), so that a FETCH decrypts one value per message and sends it as is: no JSON, no base64.
Rows written before it hold the same sealed rendering as a token in the JSON column (``{"imap1": token}``),
the sealed JSON structure (``{"sealed": token}``) or, older still, the structure in clear: they still answer
(the structures rendered per FETCH), and ``upgrade_envelopes`` (``gateway mailbox reindex``) rewrites them,
resumably (a token is moved as it is: no decryption).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    ColumnElement,
    LargeBinary,
    Table,
    Text,
    bindparam,
    case,
    func,
    literal,
    select,
    type_coerce,
    update,
)

from gateway.imap.protocol.envelope import WIRE_VERSION, render_envelope
from gateway.mailstore.tables import Folder, Message
from gateway.security.at_rest import (
    ENVELOPE_SEALED_TAG,
    ENVELOPE_WIRE_COLUMN,
    FIELD_NONCE_BYTES,
    KEY_ID,
    FieldSealer,
    sealed_octets,
)
from gateway.security.keys import mailbox_owner
from gateway.storage.db import Database

MESSAGES: Table = Message.__table__  # type: ignore[assignment]
SEALED_JSON = ('{"sealed": "', '"}')             # how json.dumps writes {"sealed": token}
SEALED_WIRE = (f'{{"{WIRE_VERSION}": "', '"}')  # and {"imap1": token}
UPGRADE_BATCH = 500


def sealed_envelope_parts() -> tuple[ColumnElement[bytes], ColumnElement[bytes], ColumnElement[bytes]]:
    """``envelope_sealed`` cut by the database into what ``FieldSealer.open_many_parts`` takes (key id, nonce,
    ciphertext || tag): no slicing per message in Python. The key id is NULL when the column is (an earlier
    form in ``envelope``) or holds another version's rendering (the header is parsed instead)."""
    column = MESSAGES.c.envelope_sealed
    tag, key, nonce = len(ENVELOPE_SEALED_TAG), KEY_ID.size, FIELD_NONCE_BYTES
    current = func.substr(column, 1, tag, type_=LargeBinary) == literal(ENVELOPE_SEALED_TAG, LargeBinary)
    return (case((current, func.substr(column, tag + 1, key, type_=LargeBinary)), else_=None),
            func.substr(column, tag + key + 1, nonce, type_=LargeBinary),
            func.substr(column, tag + key + nonce + 1, type_=LargeBinary))


def sealed_envelope_octets(value: bytes | memoryview) -> bytes | None:
    """The sealed octets of an ``envelope_sealed`` value of this rendering version; None for another version
    (its header is parsed instead)."""
    if not isinstance(value, bytes):          # a driver's memoryview
        value = bytes(value)
    return value[len(ENVELOPE_SEALED_TAG):] if value.startswith(ENVELOPE_SEALED_TAG) else None


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
                 .where(Folder.__table__.c.mailbox_id == bindparam("mailbox"), MESSAGES.c.id > bindparam("after"),
                        MESSAGES.c.envelope_sealed.is_(None))
                 .order_by(MESSAGES.c.id).limit(bindparam("batch")))
_SET_ENVELOPE = (update(MESSAGES).where(MESSAGES.c.id == bindparam("row_id"))
                 .values(envelope=bindparam("cleared"), envelope_sealed=bindparam("sealed")))


async def upgrade_envelopes(database: Database, fields: FieldSealer, mailbox_id: int, *,
                            batch: int = UPGRADE_BATCH) -> int:
    """Move the ENVELOPE of every message of a mailbox that holds an earlier form to ``envelope_sealed``
    (a sealed rendering as it is; a structure rendered and sealed), ``batch`` rows read per transaction;
    returns how many were rewritten. Resumable: a rewritten row is skipped next time."""
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
            sealed = await _sealed_rendering(fields, owner, stored)
            if sealed is not None:
                changes.append({"row_id": row_id, "cleared": {}, "sealed": ENVELOPE_SEALED_TAG + sealed})
        if changes:
            async with database.session() as session:
                await session.execute(_SET_ENVELOPE, changes)
                await session.commit()
            upgraded += len(changes)


async def _sealed_rendering(fields: FieldSealer, owner: str, stored: Any) -> bytes | None:
    """The sealed octets of the current rendering of an ENVELOPE column in an earlier form; None when it holds
    nothing to render (another version's rendering: the header is parsed per FETCH, as before)."""
    form, value = envelope_form(stored)
    if form == WIRE_VERSION:
        return sealed_octets(owner, ENVELOPE_WIRE_COLUMN, value)
    if form == "sealed":
        value = json.loads(await fields.open(owner, "envelope", value) or "{}")
    elif form != "clear":
        return None
    if not value:
        return None
    return await fields.seal_raw(owner, ENVELOPE_WIRE_COLUMN, render_envelope(value))

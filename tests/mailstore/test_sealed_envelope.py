"""A sealed store keeps each ENVELOPE rendered (RFC 3501 7.4.2) and sealed, as raw octets: FETCH decrypts it and
sends it as is; earlier rows (the sealed rendering as a token in JSON, the sealed JSON structure) still answer,
and ``upgrade_envelopes`` moves them to the raw column in place."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Text, cast, select

from gateway.imap.protocol.envelope import WIRE_VERSION, render_envelope
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.envelopes import upgrade_envelopes
from gateway.mailstore.headers import header_section, parse_headers
from gateway.mailstore.interface import INBOX, FolderRef, UidSet
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.mailstore.tables import Message
from gateway.security.at_rest import (
    ENVELOPE_SEALED_TAG,
    ENVELOPE_WIRE_COLUMN,
    FieldSealer,
    HeaderSealer,
    SealedDataError,
    sealed_octets,
)
from gateway.security.keys import KeyManager, mailbox_owner
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from tests.mailstore.conftest import MakeMailbox

RAW = (b"From: Dr Martin <martin@demo.mssante.localhost>\r\nTo: soins: a@x.org, b@y.org;\r\n"
       b"Subject: =?UTF-8?Q?Compte_rendu_=C3=A9cho?= confidentiel\r\nMessage-ID: <1@x>\r\n\r\nBonjour\r\n")


async def _stored(database: Database, box: int) -> list[tuple[str, bytes | None]]:
    """(the JSON column as text, the binary column) of every message."""
    async with database.session() as session:
        rows = await session.execute(select(cast(Message.envelope, Text), Message.envelope_sealed)
                                     .order_by(Message.id))
        return [(text, None if sealed is None else bytes(sealed)) for text, sealed in rows]


async def _as_token(database: Database, fields: FieldSealer, box: int, uids: range) -> None:
    """Rewrite messages as the previous code stored them: the sealed rendering as a token in the JSON column."""
    owner = mailbox_owner(box)
    async with database.session() as session:
        for uid in uids:
            wire = render_envelope(parse_headers(header_section(RAW)).envelope)
            token = await fields.seal_bytes(owner, ENVELOPE_WIRE_COLUMN, wire)
            await session.execute(Message.__table__.update().where(Message.uid == uid).values(
                envelope={WIRE_VERSION: token}, envelope_sealed=None))
        await session.commit()


async def test_envelope_is_kept_rendered_and_sealed(database: Database, blobs: BlobStore, keys: KeyManager,
                                                    make_mailbox: MakeMailbox) -> None:
    store = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    box = await make_mailbox()
    await LocalDelivery(store).provision(box)
    await store.append(FolderRef(box, INBOX), RAW)
    ((text, sealed),) = await _stored(database, box)
    assert text == "{}" and sealed is not None and sealed.startswith(ENVELOPE_SEALED_TAG)
    assert b"Martin" not in sealed and b"soins" not in sealed
    (meta,) = await store.fetch_meta(FolderRef(box, INBOX), UidSet.from_uids([1]), headers=False)
    assert meta.envelope_wire == render_envelope(parse_headers(header_section(RAW)).envelope)
    assert b'(NIL NIL "soins" NIL)' in meta.envelope_wire and b"=?UTF-8?Q?Compte_rendu_=C3=A9cho?=" in meta.envelope_wire
    # FETCH's listing: two columns, the renderings opened in one loop; UIDs that do not exist are absent.
    assert await store.fetch_envelopes(FolderRef(box, INBOX), UidSet.from_uids([1, 7])) == {1: meta.envelope_wire}


async def test_earlier_sealed_structure_answers_and_is_upgraded(database: Database, blobs: BlobStore,
                                                               keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    fields = FieldSealer(keys)
    store = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(fields))
    box = await make_mailbox()
    await LocalDelivery(store).provision(box)
    for _ in range(3):
        await store.append(FolderRef(box, INBOX), RAW)
    structure = parse_headers(header_section(RAW)).envelope
    async with database.session() as session:     # as the earlier code wrote it: the sealed JSON structure
        sealed = await fields.seal(mailbox_owner(box), "envelope", json.dumps(structure, ensure_ascii=False))
        await session.execute(Message.__table__.update().where(Message.uid < 3).values(envelope={"sealed": sealed},
                                                                                   envelope_sealed=None))
        await session.commit()
    metas = await store.fetch_meta(FolderRef(box, INBOX), UidSet.from_uids([1, 2, 3]), headers=False)
    assert [meta.envelope_wire for meta in metas[:2]] == [None, None] and metas[0].envelope == structure
    assert metas[2].envelope_wire == render_envelope(structure)
    assert await store.fetch_envelopes(FolderRef(box, INBOX), UidSet.from_uids([1, 2, 3])) == {
        1: structure, 2: structure, 3: render_envelope(structure)}

    assert await upgrade_envelopes(database, fields, box, batch=1) == 2
    assert await upgrade_envelopes(database, fields, box, batch=1) == 0      # resumable: nothing left
    assert all(text == "{}" and sealed is not None and sealed.startswith(ENVELOPE_SEALED_TAG)
               for text, sealed in await _stored(database, box))
    metas = await store.fetch_meta(FolderRef(box, INBOX), UidSet.from_uids([1, 2, 3]), headers=False)
    assert [meta.envelope_wire for meta in metas] == [render_envelope(structure)] * 3


async def test_rendering_stored_as_a_token_answers_and_moves_to_the_raw_column(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    fields = FieldSealer(keys)
    store = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(fields))
    box = await make_mailbox()
    await LocalDelivery(store).provision(box)
    for _ in range(4):
        await store.append(FolderRef(box, INBOX), RAW)
    await _as_token(database, fields, box, range(1, 4))
    wire = render_envelope(parse_headers(header_section(RAW)).envelope)
    everything = UidSet.from_uids([1, 2, 3, 4])
    # Both forms side by side in one FETCH: opened in the same loop, the same octets.
    assert await store.fetch_envelopes(FolderRef(box, INBOX), everything) == dict.fromkeys([1, 2, 3, 4], wire)
    before = await _stored(database, box)
    assert [sealed is None for _, sealed in before] == [True, True, True, False]

    assert await upgrade_envelopes(database, fields, box, batch=2) == 3
    after = await _stored(database, box)
    assert all(text == "{}" and sealed is not None for text, sealed in after)
    # Moved, not sealed again: the token's own octets, behind the version tag.
    for (token_json, _), (_, sealed) in zip(before[:3], after[:3], strict=True):
        token = json.loads(token_json)[WIRE_VERSION]
        assert sealed == ENVELOPE_SEALED_TAG + sealed_octets(mailbox_owner(box), ENVELOPE_WIRE_COLUMN, token)
    assert await store.fetch_envelopes(FolderRef(box, INBOX), everything) == dict.fromkeys([1, 2, 3, 4], wire)
    assert await upgrade_envelopes(database, fields, box) == 0


async def test_raw_envelope_of_another_mailbox_or_altered_does_not_open(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    """Sealed at rest under the mailbox's key, bound to its owner: octets copied into another mailbox's row, or
    changed, fail authentication instead of answering."""
    store = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    first, second = await make_mailbox(), await make_mailbox()
    for box in (first, second):
        await LocalDelivery(store).provision(box)
        await store.append(FolderRef(box, INBOX), RAW)
    rows = await _stored(database, first)
    theirs, mine = rows[0][1], rows[1][1]
    assert theirs is not None and mine is not None and theirs != mine
    second_row = Message.__table__.update().where(Message.id == select(Message.id).order_by(Message.id.desc())
                                                  .limit(1).scalar_subquery())
    async with database.session() as session:
        await session.execute(second_row.values(envelope_sealed=theirs))
        await session.commit()
    with pytest.raises(SealedDataError):
        await store.fetch_envelopes(FolderRef(second, INBOX), UidSet.from_uids([1]))
    altered = mine[:-1] + bytes([mine[-1] ^ 1])
    async with database.session() as session:
        await session.execute(second_row.values(envelope_sealed=altered))
        await session.commit()
    with pytest.raises(SealedDataError):
        await store.fetch_envelopes(FolderRef(second, INBOX), UidSet.from_uids([1]))

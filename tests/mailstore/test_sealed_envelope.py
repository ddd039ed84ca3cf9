"""A sealed store keeps each ENVELOPE rendered (RFC 3501 7.4.2) and sealed: FETCH decrypts it and sends it as
is; earlier rows (the sealed JSON structure) still answer, and ``upgrade_envelopes`` renders them in place."""

from __future__ import annotations

import json

from sqlalchemy import Text, cast, select

from gateway.imap.protocol.envelope import WIRE_VERSION, render_envelope
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.envelopes import upgrade_envelopes
from gateway.mailstore.headers import header_section, parse_headers
from gateway.mailstore.interface import INBOX, FolderRef, UidSet
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.mailstore.tables import Message
from gateway.security.at_rest import FieldSealer, HeaderSealer
from gateway.security.keys import KeyManager, mailbox_owner
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from tests.mailstore.conftest import MakeMailbox

RAW = (b"From: Dr Martin <martin@demo.mssante.localhost>\r\nTo: soins: a@x.org, b@y.org;\r\n"
       b"Subject: =?UTF-8?Q?Compte_rendu_=C3=A9cho?= confidentiel\r\nMessage-ID: <1@x>\r\n\r\nBonjour\r\n")


async def _stored(database: Database, box: int) -> list[str]:
    async with database.session() as session:
        return list(await session.scalars(select(cast(Message.envelope, Text)).order_by(Message.id)))


async def test_envelope_is_kept_rendered_and_sealed(database: Database, blobs: BlobStore, keys: KeyManager,
                                                    make_mailbox: MakeMailbox) -> None:
    store = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    box = await make_mailbox()
    await LocalDelivery(store).provision(box)
    await store.append(FolderRef(box, INBOX), RAW)
    (stored,) = await _stored(database, box)
    assert stored.startswith(f'{{"{WIRE_VERSION}": "') and "Martin" not in stored and "soins" not in stored
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
        await session.execute(Message.__table__.update().where(Message.uid < 3).values(envelope={"sealed": sealed}))
        await session.commit()
    metas = await store.fetch_meta(FolderRef(box, INBOX), UidSet.from_uids([1, 2, 3]), headers=False)
    assert [meta.envelope_wire for meta in metas[:2]] == [None, None] and metas[0].envelope == structure
    assert metas[2].envelope_wire == render_envelope(structure)
    assert await store.fetch_envelopes(FolderRef(box, INBOX), UidSet.from_uids([1, 2, 3])) == {
        1: structure, 2: structure, 3: render_envelope(structure)}

    assert await upgrade_envelopes(database, fields, box, batch=1) == 2
    assert await upgrade_envelopes(database, fields, box, batch=1) == 0      # resumable: nothing left
    assert all(text.startswith(f'{{"{WIRE_VERSION}": "') for text in await _stored(database, box))
    metas = await store.fetch_meta(FolderRef(box, INBOX), UidSet.from_uids([1, 2, 3]), headers=False)
    assert [meta.envelope_wire for meta in metas] == [render_envelope(structure)] * 3

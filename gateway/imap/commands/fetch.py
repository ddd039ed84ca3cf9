"""FETCH and UID FETCH (RFC 3501 6.4.5, 6.4.8; CHANGEDSINCE of RFC 7162 3.1.4.1; BINARY of RFC 3516).

UID comes first in every FETCH response (ProtonMail bridge #204: Thunderbird
shows the wrong message otherwise).  Flags and sizes come from the store's
metadata; the body is read only when an item needs it.  Items that set
``\\Seen`` (BODY[...] without .PEEK, RFC822, RFC822.TEXT) set it before the
response is built, and the new FLAGS are returned with them (RFC 3501 6.4.5).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import datetime as dt
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from gateway.imap.commands.base import Completion
from gateway.imap.commands.content import MessageContent, binary_octets, find_part
from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response
from gateway.imap.protocol.envelope import EnvelopeWriter, usable_wire
from gateway.imap.protocol.errors import EXPUNGEISSUED
from gateway.imap.protocol.fetch import FetchAttribute
from gateway.imap.protocol.structure import format_bodystructure, format_envelope
from gateway.imap.selected import Message, SelectedMailbox
from gateway.mailstore.errors import MessageNotFound
from gateway.mailstore.interface import (
    SEEN,
    FlagListing,
    MessageMeta,
    StoreMode,
    UidSet,
)

if TYPE_CHECKING:
    from gateway.imap.session import Handler, Session

BODY_ITEMS = frozenset({"BODY", "BODYSTRUCTURE", "RFC822", "RFC822.HEADER", "RFC822.TEXT"})
RENDER_BATCH = 16   # messages whose bodies are read at the same time
FLAG_ITEMS = frozenset({"UID", "FLAGS", "MODSEQ"})   # answered from the store's index alone
ENVELOPE_ITEMS = FLAG_ITEMS | {"ENVELOPE"}            # and the ENVELOPEs, without a MessageMeta per message
WRITE_BATCH = 2000  # FETCH responses joined per write


async def fetch(session: Session, command: c.Command) -> Completion:
    assert isinstance(command, c.Fetch)
    selected = session.require_selected()
    if command.changed_since is not None or any(item.name == "MODSEQ" for item in command.attributes):
        session.enable_condstore()                    # RFC 7162 3.1: these enable CONDSTORE
    attributes = _with_implied(command, selected)
    if all(item.section is None and item.name in FLAG_ITEMS for item in attributes):
        return await _fetch_flags(session, selected, command, attributes)
    if all(item.section is None and item.name in ENVELOPE_ITEMS for item in attributes):
        return await _fetch_envelopes(session, selected, command, attributes)
    messages = selected.resolve(command.sequence_set, uid=command.uid)
    if not messages:
        return Completion("FETCH completed")
    metas = await _metadata(session, selected, messages, command.changed_since, attributes)
    newly_seen: set[int] = set()
    if not selected.read_only and any(item.sets_seen() for item in attributes):
        newly_seen = await _set_seen(session, selected, metas)
    # Expunged by another session and not yet reported (RFC 3501 7.4.1), or unchanged: skipped.
    present = [(message, metas[message.uid]) for message in messages if message.uid in metas]
    answered = 0
    batch = RENDER_BATCH if _reads_bodies(attributes) else len(present) or 1
    writer = EnvelopeWriter(utf8=session.utf8)
    for start in range(0, len(present), batch):
        answered += await _answer_batch(session, selected, present[start:start + batch], attributes, newly_seen,
                                        writer)
    return _completion(command, answered, len(present) if command.changed_since is not None else len(messages))


async def _fetch_flags(session: Session, selected: SelectedMailbox, command: c.Fetch,
                       attributes: tuple[FetchAttribute, ...]) -> Completion:
    """FETCH of UID, FLAGS and MODSEQ only (a client's resynchronisation, e.g. UID FETCH 1:* (UID FLAGS)):
    from the store's flag listing, one response line per message, no object per message."""
    ranges, wanted = selected.uid_ranges(command.sequence_set, uid=command.uid)
    if not ranges:
        return Completion("FETCH completed")
    listing = await _flag_listing(session, selected, UidSet(tuple(ranges)), command.changed_since)
    render = _FlagLineRenderer(selected, attributes)
    start = _aligned(selected, listing)
    if start is not None and render.bulk_ready():
        return await _write_bulk(session, command, render, listing, start, wanted)
    out = _Batched(session)
    for number, uid, modseq, flag_id in _present(selected, listing):
        await out.add(render.line(number, uid, modseq, flag_id, listing.flag_sets))
    answered = await out.finish()
    return _completion(command, answered, answered if command.changed_since is not None else wanted)


async def _fetch_envelopes(session: Session, selected: SelectedMailbox, command: c.Fetch,
                           attributes: tuple[FetchAttribute, ...]) -> Completion:
    """FETCH of ENVELOPE with UID, FLAGS or MODSEQ (a client listing a folder): flags from the store's flag
    listing, ENVELOPEs as sent before or as the store keeps them (rendered at delivery: sent as stored), the
    response lines of the whole range built from columns, ``WRITE_BATCH`` lines a write; no object per message."""
    ranges, wanted = selected.uid_ranges(command.sequence_set, uid=command.uid)
    if not ranges:
        return Completion("FETCH completed")
    listing = await _flag_listing(session, selected, UidSet(tuple(ranges)), command.changed_since)
    numbers, uids, modseqs, flag_ids = _listed(selected, listing)
    envelopes = await _envelopes_of(session, selected, uids)
    if len(envelopes) < len(uids):              # expunged meanwhile: RFC 3501 6.4.8, as the others
        kept = [position for position, uid in enumerate(uids) if uid in envelopes]
        numbers, uids = [numbers[i] for i in kept], [uids[i] for i in kept]
        modseqs, flag_ids = [modseqs[i] for i in kept], [flag_ids[i] for i in kept]
    render = _FlagLineRenderer(selected, attributes)
    announcements = render.prepare(listing)
    if announcements:
        session.write(announcements)
    for offset in range(0, len(uids), WRITE_BATCH):
        window = slice(offset, offset + WRITE_BATCH)
        session.write(render.lines(numbers[window], uids[window], modseqs[window], flag_ids[window],
                                   listing.flag_sets, envelopes))
        await session.connection.drain()
    answered = len(uids)
    return _completion(command, answered, answered if command.changed_since is not None else wanted)


def _listed(selected: SelectedMailbox, listing: FlagListing) -> tuple[Sequence[int], Sequence[int], Sequence[int],
                                                                       Sequence[int]]:
    """Sequence numbers, UIDs, MODSEQs and flag set ids of the listed messages this view holds, as columns:
    counted when they are a contiguous run of the view's messages (the usual case), else walked."""
    start = _aligned(selected, listing)
    if start is not None:
        return range(start + 1, start + 1 + len(listing)), listing.uids, listing.modseqs, listing.flag_ids
    present = list(_present(selected, listing))
    return ([row[0] for row in present], [row[1] for row in present], [row[2] for row in present],
            [row[3] for row in present])


async def _envelopes_of(session: Session, selected: SelectedMailbox, uids: Sequence[int]) -> dict[int, bytes]:
    """RFC 3501 7.4.2 ENVELOPEs of ``uids`` (listed by the store for this session's folder just now): as sent
    before, else read from the store in one call (rendered at delivery: sent as stored); a message that no
    longer exists is left out."""
    view = (selected.ref.mailbox_id, selected.uidvalidity, session.utf8)
    known = RENDERED_ENVELOPES.found(view, uids)
    missing = [uid for uid in uids if uid not in known]
    if missing:
        contiguous = missing[-1] - missing[0] + 1 == len(missing)     # ascending, distinct: one range
        wanted = UidSet(((missing[0], missing[-1]),)) if contiguous else UidSet.from_uids(missing)
        stored = await session.store.fetch_envelopes(selected.ref, wanted)
        fresh = await _rendered(session, selected, stored)
        RENDERED_ENVELOPES.put_many(view, fresh)
        known.update(fresh)
    return known


async def _rendered(session: Session, selected: SelectedMailbox,
                    stored: dict[int, bytes | dict[str, Any]]) -> dict[int, bytes]:
    """The ENVELOPEs the store answered, ready to send: a sealed rendering as it is (when the session can
    take it: ``usable_wire``), else rendered from the cached structure, else from the message's header."""
    utf8 = session.utf8
    rendered: dict[int, bytes] = {}
    writer: EnvelopeWriter | None = None
    for uid, envelope in stored.items():
        if isinstance(envelope, bytes) and (not utf8 or usable_wire(envelope, utf8=True)):
            rendered[uid] = envelope
        elif isinstance(envelope, dict) and envelope:
            writer = writer or EnvelopeWriter(utf8=utf8)
            rendered[uid] = writer.envelope(envelope)
        else:
            try:
                head = await MessageContent(session.store, selected.ref, uid).head_message()
            except MessageNotFound:
                continue
            rendered[uid] = format_envelope(head, utf8=utf8)
    return rendered


async def _flag_listing(session: Session, selected: SelectedMailbox, uids: UidSet,
                        changed_since: int | None) -> FlagListing:
    """UID, MODSEQ and flags of ``uids``: from the store's shared index while the session trusts it, else read."""
    known = session.store.flags_known(selected.ref, uids, changed_since=changed_since) \
        if session.trusts_memory(selected) else None
    if known is not None:
        return known
    return await session.store.fetch_flags(selected.ref, uids, changed_since=changed_since)


class _Batched:
    """FETCH responses joined ``WRITE_BATCH`` at a time into one write, the transport drained between: a
    listing of 100,000 messages neither makes 100,000 writes nor holds them all in memory."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pending: list[bytes] = []
        self.count = 0

    async def add(self, line: bytes) -> None:
        self.pending.append(line)
        self.count += 1
        if len(self.pending) >= WRITE_BATCH:
            self.session.write(b"".join(self.pending))
            self.pending.clear()
            await self.session.connection.drain()

    async def finish(self) -> int:
        """Write what is left; how many responses were added."""
        if self.pending:
            self.session.write(b"".join(self.pending))
            self.pending.clear()
        await self.session.connection.drain()
        return self.count


async def _write_bulk(session: Session, command: c.Fetch, render: _FlagLineRenderer, listing: FlagListing,
                      start: int, wanted: int) -> Completion:
    """The listed messages are this view's messages ``start + 1`` onwards, in order: numbers by counting."""
    session.write(render.prepare(listing))
    for offset in range(0, len(listing), WRITE_BATCH):
        session.write(render.bulk(start + offset + 1, listing.uids[offset:offset + WRITE_BATCH],
                                  listing.flag_ids[offset:offset + WRITE_BATCH], listing.flag_sets))
        await session.connection.drain()
    answered = len(listing)
    return _completion(command, answered, answered if command.changed_since is not None else wanted)


def _aligned(selected: SelectedMailbox, listing: FlagListing) -> int | None:
    """The index in this view of the first listed message when the listed UIDs are a contiguous run of the
    view's (one C comparison of two arrays), else None."""
    mine, listed = selected.uids, listing.uids
    if not listed or not isinstance(mine, array) or not isinstance(listed, array):
        return None
    start = bisect.bisect_left(mine, listed[0])
    return start if mine[start:start + len(listed)] == listed else None


def _present(selected: SelectedMailbox, listing: FlagListing) -> Iterator[tuple[int, int, int, int]]:
    """(sequence number, UID, MODSEQ, flag set id) of the listed messages this view holds, in order."""
    mine = selected.uids
    size = len(mine)
    position = bisect.bisect_left(mine, listing.uids[0]) if len(listing.uids) else 0   # not a walk from 1
    for uid, modseq, flag_id in zip(listing.uids, listing.modseqs, listing.flag_ids, strict=True):
        while position < size and mine[position] < uid:
            position += 1
        if position == size:
            return
        if mine[position] == uid:
            yield position + 1, uid, modseq, flag_id


class _FlagLineRenderer:
    """``* n FETCH (UID u FLAGS (...) MODSEQ (m))`` lines; each flag set rendered once per command."""

    def __init__(self, selected: SelectedMailbox, attributes: Sequence[FetchAttribute]) -> None:
        self.selected = selected
        self.names = [item.name for item in attributes if item.name != "UID"]
        self.with_uid = len(self.names) < len(attributes)
        self.flags = "FLAGS" in self.names
        self._rendered: dict[tuple[int, bool], bytes] = {}
        self._announced: set[int] = set()

    def bulk_ready(self) -> bool:
        """UID and/or one FLAGS: lines from two numbers and one pre-rendered piece each."""
        return self.names in ([], ["FLAGS"]) and (self.with_uid or bool(self.names))

    def prepare(self, listing: FlagListing) -> bytes:
        """Before the lines: RFC 3501 7.2.6 ``* FLAGS`` for every keyword they will show, and the flag
        changes this session is now told of (``note_reported``; none when nothing is newer than its MODSEQ)."""
        if not self.flags:
            return b""
        announcement = b"".join(line for flag_id in sorted(set(listing.flag_ids))
                                for line in self.selected.announce(listing.flag_sets[flag_id]))
        if listing.modseqs and max(listing.modseqs) > self.selected.modseq:
            for uid, modseq in zip(listing.uids, listing.modseqs, strict=True):
                self.selected.note_reported(uid, modseq)
        return announcement

    def bulk(self, first_number: int, uids: Sequence[int], flag_ids: Sequence[int],
             flag_sets: Sequence[frozenset[str]]) -> bytes:
        numbers = range(first_number, first_number + len(uids))
        if not self.flags:
            return b"".join([b"* %d FETCH (UID %d)\r\n" % pair for pair in zip(numbers, uids, strict=True)])
        recent = self.selected.recent
        pieces = [self._flag_list(uid if recent else 0, flag_id, flag_sets) for uid, flag_id in zip(uids, flag_ids,
                                                                                                      strict=True)]
        if self.with_uid:
            return b"".join([b"* %d FETCH (UID %d %s)\r\n" % line for line in zip(numbers, uids, pieces, strict=True)])
        return b"".join([b"* %d FETCH (%s)\r\n" % line for line in zip(numbers, pieces, strict=True)])

    def lines(self, numbers: Sequence[int], uids: Sequence[int], modseqs: Sequence[int], flag_ids: Sequence[int],
              flag_sets: Sequence[frozenset[str]], envelopes: dict[int, bytes]) -> bytes:
        """The ``* n FETCH (...)`` lines of these messages, one format per line over columns of values, in the
        order the items were asked (UID first); ``prepare`` has announced their keywords."""
        columns: list[Sequence[Any]] = [numbers]
        pieces = []
        if self.with_uid:
            columns.append(uids)
            pieces.append(b"UID %d")
        for name in self.names:
            if name == "FLAGS":
                recent = self.selected.recent
                columns.append([self._flag_list(uid if recent else 0, flag_id, flag_sets)
                                for uid, flag_id in zip(uids, flag_ids, strict=True)])
                pieces.append(b"%s")
            elif name == "ENVELOPE":
                columns.append([envelopes[uid] for uid in uids])
                pieces.append(b"ENVELOPE %s")
            else:
                columns.append(modseqs)
                pieces.append(b"MODSEQ (%d)")                               # RFC 7162 3.1.4
        line = b"* %d FETCH (" + b" ".join(pieces) + b")\r\n"
        return b"".join([line % values for values in zip(*columns, strict=True)])

    def line(self, number: int, uid: int, modseq: int, flag_id: int, flag_sets: Sequence[frozenset[str]]) -> bytes:
        selected = self.selected
        prefix = b""
        if self.flags:
            if flag_id not in self._announced:
                self._announced.add(flag_id)
                prefix = b"".join(selected.announce(flag_sets[flag_id]))   # RFC 3501 7.2.6: * FLAGS first
            selected.note_reported(uid, modseq)
        parts = [b"UID %d" % uid] if self.with_uid else []
        for name in self.names:
            if name == "FLAGS":
                parts.append(self._flag_list(uid, flag_id, flag_sets))
            else:
                parts.append(b"MODSEQ (%d)" % modseq)                   # RFC 7162 3.1.4
        return prefix + b"* %d FETCH (%s)\r\n" % (number, b" ".join(parts))

    def _flag_list(self, uid: int, flag_id: int, flag_sets: Sequence[frozenset[str]]) -> bytes:
        recent = uid in self.selected.recent
        rendered = self._rendered.get((flag_id, recent))
        if rendered is None:
            shown = self.selected.flags_for(uid, flag_sets[flag_id])
            rendered = self._rendered[(flag_id, recent)] = b"FLAGS " + response.flag_list(shown)
        return rendered


def _completion(command: c.Fetch, answered: int, wanted: int) -> Completion:
    """RFC 3501 6.4.8: UIDs that no longer exist are ignored.  A message number whose message another
    session expunged (not yet reported, RFC 3501 7.4.1) is skipped and the others answered; the command
    still succeeds, saying so with RFC 5530 [EXPUNGEISSUED], as Dovecot does (RFC 2180 4.1.2)."""
    if answered < wanted and not command.uid:
        return Completion("Some messages were already expunged", EXPUNGEISSUED)
    return Completion("FETCH completed")


async def _answer_batch(session: Session, selected: SelectedMailbox, batch: Sequence[tuple[Message, MessageMeta]],
                        attributes: tuple[FetchAttribute, ...], newly_seen: set[int], writer: EnvelopeWriter) -> int:
    """Render a few messages concurrently (their bodies are read and decrypted in worker threads),
    then write them in sequence order; memory stays bounded by the batch, not by the whole set.
    Returns how many were answered: a body expunged between the metadata and its reading is skipped."""
    renders = (_render_present(session, selected, meta,
                               _ensure(attributes, "FLAGS") if message.uid in newly_seen else attributes, writer)
               for message, meta in batch)
    if _reads_bodies(attributes):
        rendered = await asyncio.gather(*renders)
    else:                                   # nothing to wait for: no task per message
        rendered = [await render_one for render_one in renders]
    answered = 0
    lines: list[bytes] = []
    for (message, meta), items in zip(batch, rendered, strict=True):
        if items is not None:
            if any(name == "FLAGS" for name, _ in items):
                lines += selected.announce(meta.flags)                # RFC 3501 7.2.6: * FLAGS first
            lines.append(response.fetch(message.number, items))
            answered += 1
            if len(lines) >= WRITE_BATCH:
                session.write(b"".join(lines))
                lines.clear()
    session.write(b"".join(lines))
    await session.connection.drain()
    return answered


async def _render_present(session: Session, selected: SelectedMailbox, meta: MessageMeta,
                          attributes: Sequence[FetchAttribute], writer: EnvelopeWriter) -> list[tuple[str, bytes]] | None:
    try:
        return await render(session, selected, meta, attributes, writer)
    except MessageNotFound:
        return None


def _reads_bodies(attributes: Sequence[FetchAttribute]) -> bool:
    return any(item.section is not None or item.name in BODY_ITEMS for item in attributes)


def _with_implied(command: c.Fetch, selected: SelectedMailbox) -> tuple[FetchAttribute, ...]:
    attributes = command.attributes
    if command.uid:
        attributes = _ensure(attributes, "UID")       # RFC 3501 6.4.8
    if command.changed_since is not None:
        attributes = _ensure(attributes, "MODSEQ")    # RFC 7162 3.1.4.1
    return attributes


def _ensure(attributes: tuple[FetchAttribute, ...], name: str) -> tuple[FetchAttribute, ...]:
    if any(item.name == name and item.section is None for item in attributes):
        return attributes
    return (*attributes, FetchAttribute(name))


async def _metadata(session: Session, selected: SelectedMailbox, messages: Sequence[Message],
                    changed_since: int | None, attributes: Sequence[FetchAttribute]) -> dict[int, MessageMeta]:
    """Flags, dates and sizes; the ENVELOPE only when asked (sealed at rest: one decryption each)."""
    uids = UidSet.from_uids(message.uid for message in messages)
    envelope = any(item.name == "ENVELOPE" and item.section is None for item in attributes)
    if envelope and all(_envelope_key(session, selected, message.uid) in RENDERED_ENVELOPES for message in messages):
        envelope = False                        # all already rendered: the sealed column is not even read
    found = await session.store.fetch_meta(selected.ref, uids, changed_since=changed_since, envelope=envelope,
                                           headers=False)
    return {meta.uid: meta for meta in found}


async def _set_seen(session: Session, selected: SelectedMailbox, metas: dict[int, MessageMeta]) -> set[int]:
    """RFC 3501 6.4.5: BODY[...] sets \\Seen, in one STORE before answering; the FLAGS of the
    messages it changed are then returned with them.  Returns their UIDs."""
    unseen = [uid for uid, meta in metas.items() if SEEN not in meta.flags]
    if not unseen:
        return set()
    result = await session.store.store_flags(selected.ref, UidSet.from_uids(unseen), StoreMode.ADD, [SEEN])
    for update in result.updated:
        selected.note_reported(update.uid, update.modseq)
        old = metas[update.uid]
        metas[update.uid] = dataclasses.replace(old, flags=update.flags, modseq=update.modseq)
    return {update.uid for update in result.updated}


async def render(session: Session, selected: SelectedMailbox, meta: MessageMeta,
                 attributes: Sequence[FetchAttribute], writer: EnvelopeWriter) -> list[tuple[str, bytes]]:
    """The (name, value) items of one ``* n FETCH`` response; ``response.fetch`` puts UID first."""
    content = MessageContent(session.store, selected.ref, meta.uid)
    items: list[tuple[str, bytes]] = []
    for attribute in attributes:
        items.append((attribute.response_name(), await _value(session, selected, meta, content, attribute, writer)))
    if any(name == "FLAGS" for name, _ in items):
        selected.note_reported(meta.uid, meta.modseq)
    return items


async def _value(session: Session, selected: SelectedMailbox, meta: MessageMeta, content: MessageContent,
                 attribute: FetchAttribute, writer: EnvelopeWriter) -> bytes:
    name = attribute.name
    if attribute.section is not None:
        return await _section_value(content, attribute)
    simple = _simple_value(selected, meta, name)
    if simple is not None:
        return simple
    if name == "ENVELOPE":
        return await _envelope(session, selected, meta, content, writer)
    if name in ("BODYSTRUCTURE", "BODY"):
        return format_bodystructure(await content.parsed(), extensible=name == "BODYSTRUCTURE", utf8=session.utf8)
    if name == "RFC822":
        return response.literal(await content.raw())
    if name == "RFC822.HEADER":
        return response.literal(await content.head())
    if name == "RFC822.TEXT":
        return response.literal((await content.raw())[len(await content.head()):])
    raise ValueError(f"unhandled fetch item {name}")


def _simple_value(selected: SelectedMailbox, meta: MessageMeta, name: str) -> bytes | None:
    if name == "UID":
        return str(meta.uid).encode()
    if name == "FLAGS":
        return response.flag_list(selected.flags_for(meta.uid, meta.flags))
    if name == "INTERNALDATE":
        return response.internal_date(_aware(meta.internaldate))
    if name == "RFC822.SIZE":
        return str(meta.size).encode()
    if name == "MODSEQ":
        return b"(%d)" % meta.modseq                  # RFC 7162 3.1.4
    return None


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


async def _section_value(content: MessageContent, attribute: FetchAttribute) -> bytes:
    assert attribute.section is not None
    if attribute.name in ("BINARY", "BINARY.SIZE"):
        octets = await _binary(content, attribute)
        if attribute.name == "BINARY.SIZE":
            return str(len(octets)).encode()          # RFC 3516 4.3
    else:
        octets = await content.section(attribute.section)
    if attribute.partial is not None:
        start, length = attribute.partial             # RFC 3501 6.4.5 <origin.octets>
        octets = octets[start:start + length]
    if attribute.name == "BINARY" and b"\x00" in octets:
        return response.literal8(octets)
    return response.literal(octets)


async def _binary(content: MessageContent, attribute: FetchAttribute) -> bytes:
    assert attribute.section is not None
    message = await content.parsed()
    part = find_part(message, attribute.section.part) if attribute.section.part else message
    return binary_octets(part) if part is not None else b""


async def _envelope(session: Session, selected: SelectedMailbox, meta: MessageMeta, content: MessageContent,
                    writer: EnvelopeWriter) -> bytes:
    """RFC 3501 7.4.2 ENVELOPE: as rendered before, else from the store's cached header fields, else parsed
    from the message's header."""
    key = _envelope_key(session, selected, meta.uid)
    rendered = RENDERED_ENVELOPES.get(key)
    if rendered is None:
        cached = meta.envelope
        if meta.envelope_wire is not None and usable_wire(meta.envelope_wire, utf8=session.utf8):
            rendered = meta.envelope_wire       # rendered at delivery: sent as stored
        elif cached:
            rendered = writer.envelope(cached)
        else:
            rendered = format_envelope(await content.head_message(), utf8=session.utf8)
        RENDERED_ENVELOPES.put(key, rendered)
    return rendered


EnvelopeKey = tuple[int, int, int, bool]


def _envelope_key(session: Session, selected: SelectedMailbox, uid: int) -> EnvelopeKey:
    return selected.ref.mailbox_id, selected.uidvalidity, uid, session.utf8


EnvelopeView = tuple[int, int, bool]   # mailbox id, UIDVALIDITY, UTF8=ACCEPT
_Block = tuple[int, int, bool, int]    # a view and a block number


class RenderedEnvelopes:
    """ENVELOPEs as last sent, by (mailbox id, UIDVALIDITY, UTF8=ACCEPT) and UID, kept in blocks of
    ``BLOCK_UIDS`` consecutive UIDs (a FETCH of 1,000 ENVELOPEs looks up one or two blocks, not 1,000 keys),
    the least recently used blocks dropped beyond ``max_octets``.  Such a key always names the same message:
    UIDVALIDITY values are never reused within a mailbox and UIDs never within a UIDVALIDITY (RFC 3501
    2.3.1.1), and the ENVELOPE of a message never changes.  It is only read for messages the store has just
    listed for the session's own folder, so the store still decides, on every FETCH, what exists and what
    the session may see."""

    BLOCK_BITS = 10
    BLOCK_UIDS = 1 << BLOCK_BITS

    def __init__(self, max_octets: int) -> None:
        self.max_octets = max_octets
        self.octets = 0
        self._blocks: OrderedDict[_Block, dict[int, bytes]] = OrderedDict()
        self._block_octets: dict[_Block, int] = {}

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 4:
            return False
        mailbox_id, uidvalidity, uid, utf8 = key
        block = self._blocks.get((mailbox_id, uidvalidity, utf8, uid >> self.BLOCK_BITS))
        return block is not None and uid in block

    def get(self, key: EnvelopeKey) -> bytes | None:
        mailbox_id, uidvalidity, uid, utf8 = key
        block_key = (mailbox_id, uidvalidity, utf8, uid >> self.BLOCK_BITS)
        block = self._blocks.get(block_key)
        if block is None or uid not in block:
            return None
        self._blocks.move_to_end(block_key)
        return block[uid]

    def put(self, key: EnvelopeKey, rendered: bytes) -> None:
        mailbox_id, uidvalidity, uid, utf8 = key
        self.put_many((mailbox_id, uidvalidity, utf8), {uid: rendered})

    def found(self, view: EnvelopeView, uids: Sequence[int]) -> dict[int, bytes]:
        """The ENVELOPEs kept of the blocks ``uids`` (ascending) fall in: a new dictionary, which may hold
        UIDs beyond ``uids`` (look them up by UID); the blocks become the most recently used."""
        found: dict[int, bytes] = {}
        if not uids or not self._blocks:
            return found
        for number in range(uids[0] >> self.BLOCK_BITS, (uids[-1] >> self.BLOCK_BITS) + 1):
            key = (*view, number)
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                found.update(block)
        return found

    def put_many(self, view: EnvelopeView, rendered: dict[int, bytes]) -> None:
        block_key: _Block | None = None
        block: dict[int, bytes] = {}
        added = 0
        for uid, value in rendered.items():
            number = uid >> self.BLOCK_BITS
            if block_key is None or block_key[3] != number:
                if block_key is not None:
                    self._grown(block_key, added)
                block_key, added = (*view, number), 0
                block = self._blocks.setdefault(block_key, {})
                self._blocks.move_to_end(block_key)
            old = block.get(uid)
            block[uid] = value
            added += len(value) - (len(old) if old is not None else 0)
        if block_key is not None:
            self._grown(block_key, added)
        while self.octets > self.max_octets and self._blocks:
            dropped, _ = self._blocks.popitem(last=False)
            self.octets -= self._block_octets.pop(dropped, 0)

    def _grown(self, key: _Block, octets: int) -> None:
        self._block_octets[key] = self._block_octets.get(key, 0) + octets
        self.octets += octets


RENDERED_ENVELOPES = RenderedEnvelopes(8 * 1024 * 1024)   # ~20,000 envelopes of a few hundred octets


HANDLERS: dict[type[c.Command], Handler] = {c.Fetch: fetch}

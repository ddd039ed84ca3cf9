"""A keyed blind index of the sealed header columns, so that SEARCH on them needs (almost) no decryption.

The cached header columns (From, To, Cc, Subject, Message-ID) are sealed at rest
(``gateway.security.at_rest.HeaderSealer``): SQL cannot compare them. RFC 3501
6.4.4 wants a SEARCH string to match as a case-insensitive substring, so the index
holds, for every message, one token per distinct trigram (three code points) of each
field's case-folded value (``str.casefold``, what the evaluator compares):

    token = first 8 octets of BLAKE2b-keyed(index key, field tag | kind | trigram)

BLAKE2b in keyed mode is a MAC (RFC 7693 2.5), faster than HMAC-SHA256 in Python.
The index key is HKDF-SHA256 of the owner's data key with its own purpose string
(``gateway-search-index-v1``): it is never stored, never the data key itself, and it
differs per owner, so one owner's tokens say nothing about another's. Crypto-shredding
the data key makes the tokens unlinkable to any text.

Every substring of length >= 3 of a value has all its trigrams among the value's, so
the messages holding every trigram of a needle are a superset of the matches; the
store then unseals only those candidates and checks the substring exactly (false
positives from token collisions or trigrams in the wrong order are removed there).
A needle shorter than three code points cannot be narrowed: the store unseals every
row, as before. Other tokens per message:

- *present* (field, kind ``p``): the field exists (``HEADER name ""``);
- *overflow* (field, kind ``o``): the field has more than ``MAX_GRAMS_PER_FIELD``
  trigrams, which are then not stored (a hostile 200 KB Subject must not write 200,000
  rows): such a message is a candidate for every needle on that field;
- *indexed* (kind ``i``): written for every indexed message, so that a message without
  any row (stored before the index existed, or by a copy made by older code) is known
  as not indexed: SEARCH unseals it (the index never hides a match), and
  ``backfill`` (``gateway mailbox reindex``) indexes it in resumable batches.

What the index reveals to someone holding the database but not the key files: which
messages of one owner share a trigram in the same field, and how often each (unknown)
trigram occurs in that owner's mailbox (frequency analysis over a large mailbox could
guess common trigrams); the number of distinct trigrams per field (about the length of
the value). Nothing links two owners' tokens.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import Select, Table, delete, exists, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from gateway.mailstore.headers import CachedHeaders
from gateway.mailstore.tables import Folder, Message, SearchToken
from gateway.security.at_rest import MESSAGE_ID_PLAINTEXT_LIMIT, FieldSealer, _derive
from gateway.security.keys import KeyManager, mailbox_owner
from gateway.storage.db import Database
from gateway.storage.models import Mailbox

log = logging.getLogger(__name__)
TOKENS: Table = SearchToken.__table__  # type: ignore[assignment]  # Core inserts: the ORM's bulk path cost more than the rows themselves

INDEX_PURPOSE = b"gateway-search-index-v1"
GRAM = 3
MAX_GRAMS_PER_FIELD = 2048
TOKEN_BYTES = 8
BACKFILL_BATCH = 500
PROBE_CAP = 4096  # posting list lengths are counted up to this, to pick the one to walk
# The cached columns the index covers, each with its own tag (a token of one field never matches another's).
FIELD_TAGS = {"from_addr": b"f", "to_addr": b"t", "cc_addr": b"c", "subject": b"s", "message_id": b"m"}
_GRAM, _PRESENT, _OVERFLOW, _INDEXED = b"g", b"p", b"o", b"i"


def trigrams(text: str) -> set[str]:
    return {text[start:start + GRAM] for start in range(len(text) - GRAM + 1)}


def indexed_value(column: str, value: str | None) -> str | None:
    """The plaintext the sealed column holds (what the evaluator compares after unsealing)."""
    if column == "message_id" and value is not None:
        return value[:MESSAGE_ID_PLAINTEXT_LIMIT]
    return value


@dataclass(frozen=True)
class IndexKey:
    """One owner's index key: turns (field, kind, text) into a signed 64-bit token."""

    key: bytes

    def token(self, column: str, kind: bytes, text: str = "") -> int:
        digest = hashlib.blake2b(FIELD_TAGS.get(column, b"-") + kind + text.encode("utf-8", "surrogatepass"),
                                 key=self.key, digest_size=TOKEN_BYTES).digest()
        return int.from_bytes(digest, "big", signed=True)

    @cached_property
    def _gram_states(self) -> dict[str, Any]:
        """Per field, BLAKE2b keyed and fed ``field tag | g`` already: a trigram's token is a copy of it fed the
        trigram, the same octets ``token`` hashes without processing the key block again (the key alone is
        one of the three compressions a trigram's token costs)."""
        states = {}
        for column, tag in FIELD_TAGS.items():
            state = hashlib.blake2b(key=self.key, digest_size=TOKEN_BYTES)
            state.update(tag + _GRAM)
            states[column] = state
        return states

    def message_tokens(self, values: dict[str, str | None]) -> set[int]:
        """Every token of one message, from its cached columns in clear (``FIELD_TAGS`` names): the
        tokens ``token`` gives, computed from the keyed states of ``_gram_states``."""
        tokens = {self.token("", _INDEXED)}
        from_bytes = int.from_bytes
        for column, value in values.items():
            if value is None:
                continue
            tokens.add(self.token(column, _PRESENT))
            grams = trigrams(value.casefold())
            if len(grams) > MAX_GRAMS_PER_FIELD:
                tokens.add(self.token(column, _OVERFLOW))
                continue
            keyed = self._gram_states.get(column)
            if keyed is None:                      # not an indexed column: the reference computation
                tokens.update(self.token(column, _GRAM, gram) for gram in grams)
                continue
            for gram in grams:
                state = keyed.copy()
                state.update(gram.encode("utf-8", "surrogatepass"))
                tokens.add(from_bytes(state.digest(), "big", signed=True))
        return tokens

    def needle_tokens(self, column: str, needle: str) -> list[int] | None:
        """The tokens every message matching ``needle`` holds, or None when the index cannot narrow."""
        if needle == "":
            return [self.token(column, _PRESENT)]  # RFC 3501 6.4.4 HEADER: "" matches any message with the field
        grams = trigrams(needle.casefold())
        return sorted(self.token(column, _GRAM, gram) for gram in grams) or None

    async def candidates(self, session: AsyncSession, column: str, needle: str) -> frozenset[int] | None:
        """Ids of the indexed messages that may match (in any of this owner's folders), or None (no narrowing).

        The intersection is driven from the shortest posting list (lengths counted up to ``PROBE_CAP``, so
        a common trigram costs a bounded scan), the other tokens probed per message on the primary key:
        SEARCH HEADER Message-ID "<load-77777@" walks the few messages holding "777", not 100,000 "<lo"."""
        tokens = self.needle_tokens(column, needle)
        if tokens is None:
            return None
        lengths = (await session.execute(select(*(
            select(func.count()).select_from(
                select(SearchToken.message_id).where(SearchToken.token == token).limit(PROBE_CAP).subquery())
            .scalar_subquery() for token in tokens)))).one()
        driver = tokens[min(range(len(tokens)), key=lambda position: lengths[position])]
        found: set[int] = set()
        if min(lengths):
            walked = aliased(SearchToken)
            probes = []
            for token in tokens:
                if token != driver:
                    probed = aliased(SearchToken)
                    probes.append(exists().where(probed.token == token, probed.message_id == walked.message_id))
            found.update(await session.scalars(select(walked.message_id).where(walked.token == driver, *probes)))
        if needle != "":
            found.update(await session.scalars(
                select(SearchToken.message_id).where(SearchToken.token == self.token(column, _OVERFLOW))))
        return frozenset(found)


def headers_values(headers: CachedHeaders) -> dict[str, str | None]:
    return {column: indexed_value(column, getattr(headers, column)) for column in FIELD_TAGS}


def token_rows(message_id: int, tokens: Iterable[int]) -> list[dict[str, int]]:
    return [{"message_id": message_id, "token": token} for token in tokens]


def unindexed(folder_id: int) -> Select[int]:
    """Ids of the folder's messages that have no index rows yet."""
    return select(Message.id).where(Message.folder_id == folder_id,
                                    ~exists().where(SearchToken.message_id == Message.id))


async def unindexed_ids(session: AsyncSession, key: IndexKey, mailbox_id: int, folder_id: int) -> frozenset[int]:
    """The folder's messages not indexed yet. Every indexed message holds the owner's *indexed* token, and
    only this owner's messages hold it: when that posting list is as long as the owner's message count,
    nothing is missing and the per-message test (one probe per message) is skipped. Both counts come
    from one statement, hence one snapshot (PostgreSQL's READ COMMITTED takes one per statement)."""
    indexed = (select(func.count()).select_from(SearchToken)
               .where(SearchToken.token == key.token("", _INDEXED)).scalar_subquery())
    stored = (select(func.count()).select_from(Message).join(Folder, Folder.id == Message.folder_id)
              .where(Folder.mailbox_id == mailbox_id).scalar_subquery())
    counted, total = (await session.execute(select(indexed, stored))).one()
    if counted == total:
        return frozenset()
    return frozenset(await session.scalars(unindexed(folder_id)))


class BlindIndex:
    """Index keys per owner (derived once per process from the key manager) and the index's writes."""

    def __init__(self, keys: KeyManager) -> None:
        self.keys = keys
        self._keys: dict[str, IndexKey] = {}

    async def key_for(self, mailbox_id: int) -> IndexKey:
        owner = mailbox_owner(mailbox_id)
        cached = self._keys.get(owner)
        if cached is None:
            # The owner's current data key: one live key per owner (KeyManager creates another only after
            # crypto-shredding, when the old messages can no longer be read anyway).
            material = await self.keys.current_key(owner)
            cached = IndexKey(_derive(material.key, INDEX_PURPOSE, owner))
            self._keys[owner] = cached
        return cached

    async def tokens_for(self, mailbox_id: int, headers: CachedHeaders) -> set[int]:
        """Tokens of a message about to be inserted (computed before its transaction)."""
        return (await self.key_for(mailbox_id)).message_tokens(headers_values(headers))

    def forget(self, owner: str) -> None:
        """Drop an owner's index key from memory (crypto-shredding destroyed the data key it came from)."""
        self._keys.pop(owner, None)

    @staticmethod
    async def delete_mailbox_tokens(session: AsyncSession, mailbox_id: int) -> int:
        """Every token of a mailbox's messages (crypto-shredding: the sealed rows become unreadable, and
        the tokens' equalities and frequencies must not outlive them)."""
        messages = select(Message.id).join(Folder, Folder.id == Message.folder_id).where(Folder.mailbox_id == mailbox_id)
        result = await session.execute(delete(SearchToken).where(SearchToken.message_id.in_(messages)))
        return int(getattr(result, "rowcount", 0) or 0)

    @staticmethod
    async def write(session: AsyncSession, message_id: int, tokens: Iterable[int]) -> None:
        rows = token_rows(message_id, tokens)
        if rows:
            await session.execute(insert(TOKENS), rows)

    @staticmethod
    async def copy(session: AsyncSession, pairs: Sequence[tuple[int, int]]) -> None:
        """The tokens of each (source id, copy id): a COPY within one mailbox keeps the owner, hence the key."""
        for source, target in pairs:
            await session.execute(insert(TOKENS).from_select(
                ["message_id", "token"],
                select(literal(target), SearchToken.token).where(SearchToken.message_id == source)))


@dataclass
class BackfillReport:
    indexed: int = 0
    batches: int = 0


async def backfill(database: Database, index: BlindIndex, fields: FieldSealer, mailbox_id: int, *,
                   batch: int = BACKFILL_BATCH) -> BackfillReport:
    """Index every not yet indexed message of a mailbox, ``batch`` per transaction (resumable: progress is
    the index itself; a message expunged meanwhile is simply skipped on the next round)."""
    key = await index.key_for(mailbox_id)
    owner = mailbox_owner(mailbox_id)
    report = BackfillReport()
    columns = [getattr(Message, column) for column in FIELD_TAGS]
    while True:
        async with database.session() as session:
            rows = (await session.execute(
                select(Message.id, *columns).join(Folder, Folder.id == Message.folder_id)
                .where(Folder.mailbox_id == mailbox_id, ~exists().where(SearchToken.message_id == Message.id))
                .order_by(Message.id).limit(batch))).all()
        if not rows:
            return report
        prepared = [(row[0], key.message_tokens(await _opened(fields, owner, row[1:]))) for row in rows]
        try:
            async with database.session() as session:
                still_there = set(await session.scalars(select(Message.id).where(
                    Message.id.in_([message_id for message_id, _ in prepared]),
                    ~exists().where(SearchToken.message_id == Message.id))))
                entries = [entry for message_id, tokens in prepared if message_id in still_there
                           for entry in token_rows(message_id, tokens)]
                if entries:
                    await session.execute(insert(TOKENS), entries)
        except IntegrityError:
            log.info("search index backfill of mailbox %d raced another writer; retrying the batch", mailbox_id)
            continue
        report.indexed += len(still_there)
        report.batches += 1


async def _opened(fields: FieldSealer, owner: str, sealed: Sequence[Any]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for column, value in zip(FIELD_TAGS, sealed, strict=True):
        values[column] = indexed_value(column, await fields.open(owner, column, value))
    return values


async def hosted_mailboxes(database: Database, address: str | None = None) -> list[tuple[int, str]]:
    """(id, address) of the hosted mailboxes (or of the one with ``address``), the ones ``backfill`` serves."""
    query = select(Mailbox.id, Mailbox.address).where(Mailbox.hosted.is_(True)).order_by(Mailbox.id)
    if address is not None:
        query = query.where(func.lower(Mailbox.address) == address.strip().lower())
    async with database.session() as session:
        return [(int(mailbox_id), str(name)) for mailbox_id, name in (await session.execute(query)).all()]


def chunked(values: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]

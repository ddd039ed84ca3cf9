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
- *indexed* (kind ``i``): in every indexed message's tokens. Whether a message is indexed
  is whether it has its ``MessageTokens`` row: one without (stored before the index
  existed, or while the store kept none) is not indexed: SEARCH unseals it (the index
  never hides a match), and ``backfill`` (``gateway mailbox reindex``) indexes it in
  resumable batches.

Storage (``MessageTokens``, ``TokenPostings``): a delivery writes its message's tokens as one packed row
(``pack``: 8 octets a token), never one row per token at a random place of a B-tree (that cost 0.7-1.35 ms
and 160-380 KB of pages written per message). ``fold`` later turns the unposted rows of a mailbox into
posting lists, one new segment per token for the whole batch (message ids packed the same way), and
``compact`` merges a token's segments when they grow many. SEARCH intersects the needle's posting lists
(a few rows each, decoded in C) and adds the mailbox's unposted messages whose own tokens hold the
needle's, so a message is found whether or not it was folded yet.

What the index reveals to someone holding the database but not the key files: which
messages of one owner share a trigram in the same field, and how often each (unknown)
trigram occurs in that owner's mailbox (frequency analysis over a large mailbox could
guess common trigrams); the number of distinct trigrams per field (about the length of
the value). Nothing links two owners' tokens. The packed rows and posting lists hold the
same (token, message) pairs the row-per-token table did, grouped.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import sys
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

from sqlalchemy import Table, and_, delete, exists, false, func, insert, or_, select, true, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.mailstore.headers import CachedHeaders
from gateway.mailstore.tables import Folder, Message, MessageTokens, TokenPostings
from gateway.security.at_rest import MESSAGE_ID_PLAINTEXT_LIMIT, FieldSealer, _derive
from gateway.security.keys import KeyManager, mailbox_owner
from gateway.storage.db import Database
from gateway.storage.models import Mailbox
from gateway.storage.prepared import Prepared

log = logging.getLogger(__name__)
MESSAGE_TOKENS = cast(Table, MessageTokens.__table__)
POSTINGS = cast(Table, TokenPostings.__table__)

INDEX_PURPOSE = b"gateway-search-index-v1"
GRAM = 3
MAX_GRAMS_PER_FIELD = 2048
TOKEN_BYTES = 8
BACKFILL_BATCH = 500
FOLD_AT = 512            # unposted messages of a mailbox that make the store fold them into the posting lists
FOLD_BATCH = 4096        # messages posted per fold transaction
COMPACT_EVERY = 8        # folds of a mailbox (in this process) between two compactions
MAX_SEGMENTS = 32        # a token with more segments than this in a mailbox gets its small ones merged
COMPACT_TOKENS = 256     # tokens merged per compaction transaction at most
# Octets of posting lists (8 per id) one compaction or sweep transaction reads and rewrites at most: it holds the
# write lock (SQLite's, or the mailbox row's on PostgreSQL), so a delivery or an IMAP write waiting behind it
# waits for about this much unpacking, merging and writing (32,768 ids), not for a whole mailbox's lists.
COMPACT_BYTES = 256 * 1024
SWEEP_ROWS = 4096        # segments looked at per sweep statement (their sizes first, their ids within the budget)
SWEEP_SHARE = 0.25       # stale ids (of messages gone) in this share of the posted messages make a sweep due
SWEEP_MIN = 1024         # and at least this many
MAX_PASSES = 4096        # bounded transactions one background compaction or sweep runs at most
LARGE_SEGMENT = 4096     # ids from which a segment is left alone by the usual compaction
SEGMENT_IDS = 65536      # message ids per merged segment at most (512 KB)
COMMON_SHARE = 0.9       # a token in this share of a mailbox's messages narrows too little to be read
LOOKUP_RATIO = 16        # candidates this many times fewer than a list's ids: bisect the list, no set of it
MAX_IDS_PER_QUERY = 5000  # ids bound per statement (SQLite's and drivers' parameter limits)
# The cached columns the index covers, each with its own tag (a token of one field never matches another's).
FIELD_TAGS = {"from_addr": b"f", "to_addr": b"t", "cc_addr": b"c", "subject": b"s", "message_id": b"m"}
_GRAM, _PRESENT, _OVERFLOW, _INDEXED = b"g", b"p", b"o", b"i"
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def pack(values: Iterable[int]) -> bytes:
    """Signed 64-bit integers (tokens, message ids) as little-endian octets, 8 each."""
    packed = array("q", values)
    if _BIG_ENDIAN_HOST:
        packed.byteswap()
    return packed.tobytes()


def unpack(blob: bytes) -> array[int]:
    values = array("q")
    values.frombytes(blob)
    if _BIG_ENDIAN_HOST:
        values.byteswap()
    return values


def trigrams(text: str) -> set[str]:
    """Every run of ``GRAM`` (three) consecutive code points of ``text`` (none when shorter)."""
    return set(map("".join, zip(text, text[1:], text[2:], strict=False)))   # GRAM == 3: C loops, no slice per start


def indexed_value(column: str, value: str | None) -> str | None:
    """The plaintext the sealed column holds (what the evaluator compares after unsealing)."""
    if column == "message_id" and value is not None:
        return value[:MESSAGE_ID_PLAINTEXT_LIMIT]
    return value


class _GramMemo:
    """Trigram -> token, per index key and field, of the trigrams hashed lately, so that a delivery hashes only
    the trigrams it is the first (since the last reset) to bring: the sender's and recipient's addresses, the
    domain of a Message-ID and the words of subjects come back message after message. Same tokens, no
    re-keying: a hit is the value a hash computed before.

    Bounded for the whole process (``MEMO_GRAMS`` entries over every owner): when full, it is emptied and
    fills again with what comes next (no per-hit bookkeeping, which would cost what the memo saves).
    Holding trigram -> token pairs in memory discloses nothing the process does not hold already (the index
    keys, the plaintext it delivers); an owner's entries go with its key (``BlindIndex.forget``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries = 0
        self._by_key: dict[bytes, dict[str, dict[str, int]]] = {}

    def of(self, key: bytes) -> dict[str, dict[str, int]]:
        memos = self._by_key.get(key)
        if memos is None:
            memos = self._by_key[key] = {}
        return memos

    def room(self, count: int) -> bool:
        """Whether ``count`` more entries fit (True after emptying the memo when they did not)."""
        if count > self.capacity:
            return False
        if self.entries + count > self.capacity:
            for memos in self._by_key.values():
                memos.clear()
            self._by_key.clear()
            self.entries = 0
        self.entries += count
        return True

    def drop(self, key: bytes) -> None:
        memos = self._by_key.pop(key, None)
        if memos is not None:
            self.entries -= sum(len(memo) for memo in memos.values())
            memos.clear()


MEMO_GRAMS = 65536       # trigram tokens the process remembers, every owner together (about 10 MB)
_MEMO = _GramMemo(MEMO_GRAMS)


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

    @cached_property
    def _fixed_tokens(self) -> dict[str, int]:
        """The tokens every message (``""``: indexed) or every message with the field (present) holds."""
        fixed = {column: self.token(column, _PRESENT) for column in FIELD_TAGS}
        fixed[""] = self.token("", _INDEXED)
        return fixed

    def message_tokens(self, values: dict[str, str | None]) -> set[int]:
        """Every token of one message, from its cached columns in clear (``FIELD_TAGS`` names): the
        tokens ``token`` gives, computed from the keyed states of ``_gram_states``, a trigram met lately
        taken from the memo (``_GramMemo``) instead of hashed again."""
        fixed = self._fixed_tokens
        tokens = {fixed[""]}
        memos = _MEMO.of(self.key)
        for column, value in values.items():
            if value is None:
                continue
            present = fixed.get(column)
            tokens.add(self.token(column, _PRESENT) if present is None else present)
            grams = trigrams(value.casefold())
            if len(grams) > MAX_GRAMS_PER_FIELD:
                tokens.add(self.token(column, _OVERFLOW))
                continue
            keyed = self._gram_states.get(column)
            if keyed is None:                      # not an indexed column: the reference computation
                tokens.update(self.token(column, _GRAM, gram) for gram in grams)
                continue
            memo = memos.get(column)
            if memo is None:
                memo = memos[column] = {}
            known = memo.keys() & grams            # set operations and map() in C: no Python step per hit
            tokens.update(map(memo.__getitem__, known))
            if len(known) < len(grams):
                tokens.update(self._hash_grams(column, keyed, grams - known))
        return tokens

    def _hash_grams(self, column: str, keyed: Any, grams: set[str]) -> list[int]:
        """The tokens of trigrams not in the memo, each from a copy of the field's keyed state; remembered."""
        from_bytes = int.from_bytes
        hashed = []
        for gram in grams:
            state = keyed.copy()
            state.update(gram.encode("utf-8", "surrogatepass"))
            hashed.append(from_bytes(state.digest(), "big", signed=True))
        if _MEMO.room(len(grams)):              # (which may have emptied the memo: looked up again)
            _MEMO.of(self.key).setdefault(column, {}).update(zip(grams, hashed))
        return hashed

    def needle_tokens(self, column: str, needle: str) -> list[int] | None:
        """The tokens every message matching ``needle`` holds, or None when the index cannot narrow."""
        if needle == "":
            return [self.token(column, _PRESENT)]  # RFC 3501 6.4.4 HEADER: "" matches any message with the field
        grams = trigrams(needle.casefold())
        return sorted(self.token(column, _GRAM, gram) for gram in grams) or None

    def overflow_token(self, column: str) -> int:
        return self.token(column, _OVERFLOW)


def headers_values(headers: CachedHeaders) -> dict[str, str | None]:
    return {column: indexed_value(column, getattr(headers, column)) for column in FIELD_TAGS}


@dataclass
class MailboxPostings:
    """What one SEARCH read of a mailbox's index, in one transaction: the posting lists' lengths of the
    tokens it asked for, the segments of those worth intersecting, and the tokens of the messages not
    posted yet."""

    segments: dict[int, list[bytes]]                       # token -> its packed segments (tokens read)
    lengths: dict[int, int]                                # token -> ids in its list (every token that has one)
    common: frozenset[int]                                 # held by nearly every message: neither read nor used
    unposted: list[tuple[int, frozenset[int]]]             # (message id, its tokens)

    @classmethod
    def read(cls, connection: Connection, mailbox_id: int, tokens: Iterable[int], indexed: int) -> MailboxPostings:
        """``indexed``: the mailbox's indexed messages. A token whose list holds ``COMMON_SHARE`` of them
        ("<lo" of every Message-ID, "sen" of every sender@) would rule out almost nothing: its list (800 KB
        at 100,000 messages) is not read; the exact check after unsealing removes what it would have."""
        # The unposted rows first: a fold committing between the reads (PostgreSQL's READ COMMITTED takes a
        # snapshot per statement) then leaves its messages in both answers, never in neither.
        unposted = [(message_id, frozenset(unpack(blob))) for message_id, blob in connection.execute(
            select(MESSAGE_TOKENS.c.message_id, MESSAGE_TOKENS.c.tokens).where(
                MESSAGE_TOKENS.c.mailbox_id == mailbox_id, MESSAGE_TOKENS.c.posted == false()))]
        wanted = sorted(set(tokens))
        lengths: dict[int, int] = {}
        for chunk in chunked(wanted, MAX_IDS_PER_QUERY):   # from the index alone (it holds each segment's size)
            lengths.update((token, int(size)) for token, size in connection.execute(
                select(POSTINGS.c.token, func.sum(POSTINGS.c.size)).where(
                    POSTINGS.c.mailbox_id == mailbox_id, POSTINGS.c.token.in_(chunk)).group_by(POSTINGS.c.token)))
        common = frozenset(token for token, size in lengths.items() if indexed and size >= COMMON_SHARE * indexed)
        segments: dict[int, list[bytes]] = {}
        for chunk in chunked([token for token in lengths if token not in common], MAX_IDS_PER_QUERY):
            for token, ids in connection.execute(select(POSTINGS.c.token, POSTINGS.c.ids).where(
                    POSTINGS.c.mailbox_id == mailbox_id, POSTINGS.c.token.in_(chunk))):
                segments.setdefault(token, []).append(bytes(ids))
        return cls(segments, lengths, common, unposted)

    def holding_all(self, tokens: Sequence[int]) -> set[int] | None:
        """A superset of the ids of the messages holding every one of ``tokens`` (None: all of them are
        common, no narrowing): the posting lists intersected from the shortest (until nothing is left), and
        the unposted messages holding them."""
        telling = [token for token in tokens if token not in self.common]
        if not telling:
            return None
        found: set[int] = set()
        if all(token in self.lengths for token in telling):
            by_length = sorted(telling, key=self.lengths.__getitem__)
            for segment in self.segments[by_length[0]]:
                found.update(unpack(segment))
            for token in by_length[1:]:
                if not found:
                    break
                segments = [unpack(packed) for packed in self.segments[token]]
                if len(found) * LOOKUP_RATIO < self.lengths[token]:
                    # Few candidates left, a long list: each candidate looked up by bisection (a segment's ids
                    # ascend) instead of a set of the whole list.
                    found = {message_id for message_id in found if any(_holds(ids, message_id) for ids in segments)}
                    continue
                holding: set[int] = set()
                for ids in segments:
                    holding.update(ids)
                found.intersection_update(holding)
        wanted = frozenset(tokens)
        found.update(message_id for message_id, held in self.unposted if wanted <= held)
        return found


def _holds(segment: array[int], message_id: int) -> bool:
    at = bisect.bisect_left(segment, message_id)
    return at < len(segment) and segment[at] == message_id


def candidates(key: IndexKey, postings: MailboxPostings, column: str, needle: str) -> frozenset[int] | None:
    """Ids of the indexed messages of the mailbox that may match (any folder), or None (no narrowing): those
    holding every token of the needle, and, for a non-empty needle, those whose field overflowed."""
    tokens = key.needle_tokens(column, needle)
    if tokens is None:
        return None
    found = postings.holding_all(tokens)
    if found is None:
        return None
    if needle != "":
        overflowed = postings.holding_all([key.overflow_token(column)])
        if overflowed is None:
            return None
        found |= overflowed
    return frozenset(found)


def wanted_tokens(key: IndexKey, leaves: Iterable[tuple[str, str]]) -> set[int]:
    """Every token SEARCH reads the posting lists of, for these (column, needle) keys."""
    tokens: set[int] = set()
    for column, needle in leaves:
        tokens.update(key.needle_tokens(column, needle) or ())
        if needle != "":
            tokens.add(key.overflow_token(column))
    return tokens


_COUNT_INDEXED = select(func.count()).select_from(MESSAGE_TOKENS)
# Runs a synchronous step as one transaction (the store's ``_sync_transaction`` to write, ``_run`` to read).
Transaction = Callable[[Callable[[Connection], Any]], Awaitable[Any]]
_INSERT_POSTINGS = Prepared(insert(POSTINGS))   # a fold writes thousands of rows: on SQLite, to the driver


def indexed_counts(connection: Connection, mailbox_id: int) -> tuple[int, int]:
    """(messages of the mailbox with an index row, messages of the mailbox), from one statement, hence one
    snapshot (PostgreSQL's READ COMMITTED takes one per statement)."""
    indexed = _COUNT_INDEXED.where(MESSAGE_TOKENS.c.mailbox_id == mailbox_id).scalar_subquery()
    stored = (select(func.count()).select_from(Message).join(Folder, Folder.id == Message.folder_id)
              .where(Folder.mailbox_id == mailbox_id).scalar_subquery())
    counted, total = connection.execute(select(indexed, stored)).one()
    return int(counted), int(total)


def unindexed_in(connection: Connection, folder_id: int, counts: tuple[int, int]) -> frozenset[int]:
    """The folder's messages not indexed yet (no ``MessageTokens`` row: stored before the index existed, or
    while the store kept no index). Rows exist only for messages of their mailbox and go with them, so
    when the mailbox's row count (``indexed_counts``) equals its message count nothing is missing and the
    per-message test is skipped."""
    if counts[0] == counts[1]:
        return frozenset()
    return frozenset(connection.execute(unindexed(folder_id)).scalars())


def unindexed(folder_id: int) -> Any:
    """Ids of the folder's messages that have no index row yet."""
    return select(Message.id).where(Message.folder_id == folder_id,
                                    ~exists().where(MessageTokens.message_id == Message.id))


def message_tokens_row(message_id: int, mailbox_id: int, tokens: Iterable[int]) -> dict[str, Any]:
    return {"message_id": message_id, "mailbox_id": mailbox_id, "posted": False, "tokens": pack(tokens)}


def unposted_count(connection: Connection, mailbox_id: int) -> int:
    return int(connection.execute(_COUNT_INDEXED.where(
        MESSAGE_TOKENS.c.mailbox_id == mailbox_id, MESSAGE_TOKENS.c.posted == false())).scalar() or 0)


def fold(connection: Connection, mailbox_id: int, *, limit: int = FOLD_BATCH, written: set[int] | None = None) -> int:
    """Post up to ``limit`` unposted messages of a mailbox, in the caller's write transaction: one new
    segment per token of theirs (its message ids), and the messages marked posted. Returns how many;
    ``written`` gets the tokens that received a segment."""
    _lock_mailbox(connection, mailbox_id)
    pending = connection.execute(
        select(MESSAGE_TOKENS.c.message_id, MESSAGE_TOKENS.c.tokens)
        .where(MESSAGE_TOKENS.c.mailbox_id == mailbox_id, MESSAGE_TOKENS.c.posted == false())
        .order_by(MESSAGE_TOKENS.c.message_id).limit(limit)).all()
    if not pending:
        return 0
    lists: dict[int, list[int]] = {}
    for message_id, blob in pending:
        for token in unpack(blob):
            held = lists.get(token)
            if held is None:
                lists[token] = [message_id]
            else:
                held.append(message_id)
    _INSERT_POSTINGS.run_many(connection, [{"mailbox_id": mailbox_id, "token": token, "size": len(ids),
                                            "ids": pack(ids)} for token, ids in lists.items()])
    if written is not None:
        written.update(lists)
    ids = [message_id for message_id, _ in pending]
    for chunk in chunked(ids, MAX_IDS_PER_QUERY):
        connection.execute(update(MESSAGE_TOKENS).where(MESSAGE_TOKENS.c.message_id.in_(chunk)).values(posted=True))
    return len(pending)


def _lock_mailbox(connection: Connection, mailbox_id: int) -> None:
    """One fold or compaction of a mailbox at a time (PostgreSQL; SQLite's writer is alone already): a
    compaction that read the posted messages before a fold committed would drop the fold's new ids."""
    if connection.dialect.name != "sqlite":
        connection.execute(select(Mailbox.id).where(Mailbox.id == mailbox_id).with_for_update())


def compact(connection: Connection, mailbox_id: int, *, max_segments: int = MAX_SEGMENTS, whole: bool = False,
            among: Iterable[int] | None = None, limit: int | None = None, max_bytes: int | None = None) -> int:
    """Merge segments of every token of a mailbox that has more than ``max_segments`` of them (in the
    caller's write transaction). Size-tiered, so that a big mailbox does not rewrite its longest lists
    every time: a token's small segments (under ``LARGE_SEGMENT`` ids, the recent folds) merge into one;
    ``whole`` (``gateway mailbox reindex``) merges all of them and drops the ids of messages that are gone. ``among``: only these tokens are considered (the
    last fold's: a token that gets crowded is in most folds), not every list of the mailbox (a scan that
    grows with it). ``limit``: at most that many tokens, the most crowded first; ``max_bytes``: at most
    that many octets of segments read and rewritten, a token's smallest segments first, or the first token's two
    smallest when even they exceed it (each is under ``LARGE_SEGMENT`` ids: ``COMPACT_BYTES`` holds two); a
    compaction holds the write lock: its length is bounded, later ones do the rest. Returns the tokens merged."""
    query = (select(POSTINGS.c.token, func.count()).where(POSTINGS.c.mailbox_id == mailbox_id)
             .group_by(POSTINGS.c.token).having(func.count() > max_segments))
    counted: list[tuple[int, int]] = []
    if among is None:
        counted.extend((int(token), int(count)) for token, count in connection.execute(query))
    else:
        for chunk in chunked(sorted(set(among)), MAX_IDS_PER_QUERY):
            counted.extend((int(token), int(count))
                           for token, count in connection.execute(query.where(POSTINGS.c.token.in_(chunk))))
    counted.sort(key=lambda pair: (-pair[1], pair[0]))
    crowded = [token for token, _ in (counted if limit is None else counted[:limit])]
    if not crowded:
        return 0
    _lock_mailbox(connection, mailbox_id)
    live: set[int] | None = None      # the whole rewrite drops the ids of messages gone; the usual merge keeps them
    if whole:
        live = set(connection.execute(select(MESSAGE_TOKENS.c.message_id).where(
            MESSAGE_TOKENS.c.mailbox_id == mailbox_id, MESSAGE_TOKENS.c.posted == true())).scalars())
    budget = _Budget(max_bytes)
    merged_tokens = 0
    for chunk in chunked(crowded, MAX_IDS_PER_QUERY // 2):
        sizes: dict[int, list[tuple[int, int]]] = {}      # token -> (row id, size) of its segments
        for row_id, token, size in connection.execute(select(POSTINGS.c.id, POSTINGS.c.token, POSTINGS.c.size).where(
                POSTINGS.c.mailbox_id == mailbox_id, POSTINGS.c.token.in_(chunk)).order_by(POSTINGS.c.id)):
            sizes.setdefault(token, []).append((row_id, size))
        chosen: list[int] = []
        for token in chunk:
            picked = budget.take(_to_merge(sizes.get(token, []), max_segments, whole))
            chosen.extend(picked)
            merged_tokens += bool(picked)
        merged: dict[int, set[int]] = {}
        for ids_chunk in chunked(chosen, MAX_IDS_PER_QUERY):
            for token, ids in connection.execute(select(POSTINGS.c.token, POSTINGS.c.ids).where(
                    POSTINGS.c.id.in_(ids_chunk))):
                merged.setdefault(token, set()).update(unpack(ids))
            connection.execute(delete(POSTINGS).where(POSTINGS.c.id.in_(ids_chunk)))
        rows: list[dict[str, Any]] = []
        for token, ids in merged.items():
            kept = sorted(ids if live is None else ids & live)
            rows.extend({"mailbox_id": mailbox_id, "token": token, "size": len(part), "ids": pack(part)}
                        for part in chunked(kept, SEGMENT_IDS))
        _INSERT_POSTINGS.run_many(connection, rows)
        if budget.spent:
            break
    return merged_tokens


def _to_merge(segments: list[tuple[int, int]], max_segments: int, whole: bool) -> list[tuple[int, int]]:
    """The segments (row id, size) of one crowded token to merge, smallest first (a bounded compaction then
    merges the most segments its budget allows)."""
    if whole:
        return segments
    small = sorted(((row_id, size) for row_id, size in segments if size < LARGE_SEGMENT), key=lambda pair: pair[1])
    return small if len(small) > 1 else []


class _Budget:
    """The octets of segments one compaction may still read and rewrite (None: no bound)."""

    def __init__(self, max_bytes: int | None) -> None:
        self.left = max_bytes
        self.spent = False
        self.first = True

    def take(self, segments: list[tuple[int, int]]) -> list[int]:
        """Row ids of the first of ``segments`` that fit (two at least, or none: one segment merges into
        nothing new); the first token's first two always do, so every compaction moves on."""
        if self.left is None:
            return [row_id for row_id, _ in segments]
        taken: list[int] = []
        for row_id, size in segments:
            cost = size * TOKEN_BYTES
            if cost > self.left and not (self.first and len(taken) < 2):
                self.spent = True
                break
            taken.append(row_id)
            self.left -= cost
        if len(taken) < 2:
            return []
        self.first = False
        return taken


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep of a mailbox's posting lists starts from: the highest segment row id (``upto``: the sweep
    stops there, so it ends) and the ids of its messages that had an index row just after (``live``: those are
    kept without a look; any other is looked up in the sweep's own transaction before it is dropped)."""

    upto: int
    live: frozenset[int]


def stale_ids(connection: Connection, mailbox_id: int, indexed_token: int) -> tuple[int, int]:
    """(ids in the posting list of the token every indexed message holds, the mailbox's posted messages), in
    one statement: the first exceeds the second by the ids of messages expunged since they were posted."""
    listed = (select(func.coalesce(func.sum(POSTINGS.c.size), 0))
              .where(POSTINGS.c.mailbox_id == mailbox_id, POSTINGS.c.token == indexed_token).scalar_subquery())
    posted = (_COUNT_INDEXED.where(MESSAGE_TOKENS.c.mailbox_id == mailbox_id, MESSAGE_TOKENS.c.posted == true())
              .scalar_subquery())
    counted_listed, counted_posted = connection.execute(select(listed, posted)).one()
    return int(counted_listed), int(counted_posted)


def sweep_due(listed: int, posted: int) -> bool:
    stale = listed - posted
    return stale >= SWEEP_MIN and stale >= SWEEP_SHARE * posted


def sweep_plan(connection: Connection, mailbox_id: int) -> SweepPlan:
    """Read in this order: the highest segment row id, then the live ids (PostgreSQL's READ COMMITTED: the
    second statement's snapshot is the later one)."""
    upto = connection.execute(select(func.max(POSTINGS.c.id)).where(POSTINGS.c.mailbox_id == mailbox_id)).scalar()
    live = frozenset(connection.execute(select(MESSAGE_TOKENS.c.message_id)
                                        .where(MESSAGE_TOKENS.c.mailbox_id == mailbox_id)).scalars())
    return SweepPlan(int(upto or 0), live)


def sweep(connection: Connection, mailbox_id: int, plan: SweepPlan, after: tuple[int, int] | None, *,
          max_bytes: int = COMPACT_BYTES) -> tuple[tuple[int, int] | None, int]:
    """One bounded step of a sweep, in the caller's write transaction: the segments after ``after`` (token,
    row id), up to ``plan.upto``, within ``max_bytes`` of ids (one segment at least), rewritten without the
    ids of messages gone (a segment left empty deleted). Returns where the next step starts (None: done) and
    the ids dropped. A segment written by a fold or compaction since the plan is above ``plan.upto``:
    left to the next sweep."""
    _lock_mailbox(connection, mailbox_id)
    query = (select(POSTINGS.c.id, POSTINGS.c.token, POSTINGS.c.size)
             .where(POSTINGS.c.mailbox_id == mailbox_id, POSTINGS.c.id <= plan.upto)
             .order_by(POSTINGS.c.token, POSTINGS.c.id).limit(SWEEP_ROWS))
    if after is not None:
        query = query.where(or_(POSTINGS.c.token > after[0], and_(POSTINGS.c.token == after[0],
                                                                  POSTINGS.c.id > after[1])))
    picked: list[tuple[int, int]] = []
    left = max_bytes
    for row_id, token, size in connection.execute(query):
        if picked and size * TOKEN_BYTES > left:
            break
        picked.append((int(token), int(row_id)))
        left -= size * TOKEN_BYTES
    if not picked:
        return None, 0
    segments: list[tuple[int, int, array[int]]] = []
    doubtful: set[int] = set()
    for ids_chunk in chunked([row_id for _, row_id in picked], MAX_IDS_PER_QUERY):
        for row_id, token, ids in connection.execute(select(POSTINGS.c.id, POSTINGS.c.token, POSTINGS.c.ids).where(
                POSTINGS.c.id.in_(ids_chunk))):
            held = unpack(ids)
            segments.append((row_id, token, held))
            doubtful.update(message_id for message_id in held if message_id not in plan.live)
    # Dropped only when gone now, in this transaction: an id the plan did not know may have an index row since
    # (a backfilled message; on SQLite, an id given out again), and must not leave a segment that holds it.
    alive = set(plan.live)
    for ids_chunk in chunked(sorted(doubtful), MAX_IDS_PER_QUERY):
        alive.update(connection.execute(select(MESSAGE_TOKENS.c.message_id).where(
            MESSAGE_TOKENS.c.message_id.in_(ids_chunk))).scalars())
    dropped = 0
    rows: list[dict[str, Any]] = []
    for row_id, token, held in segments:
        kept = [message_id for message_id in held if message_id in alive]
        if len(kept) == len(held):
            continue
        dropped += len(held) - len(kept)
        connection.execute(delete(POSTINGS).where(POSTINGS.c.id == row_id))
        if kept:
            rows.append({"mailbox_id": mailbox_id, "token": token, "size": len(kept), "ids": pack(kept)})
    if rows:
        _INSERT_POSTINGS.run_many(connection, rows)
    return picked[-1], dropped


class BlindIndex:
    """Index keys per owner (derived once per process from the key manager), the index's writes, and when a
    mailbox's unposted messages are due for a fold (counted in this process)."""

    def __init__(self, keys: KeyManager) -> None:
        self.keys = keys
        self._keys: dict[str, IndexKey] = {}
        self._unposted: dict[int, int] = {}     # mailbox id -> messages indexed since its last fold here
        self._folds: dict[int, int] = {}        # mailbox id -> folds since its last compaction here

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
        key = self._keys.pop(owner, None)
        if key is not None:
            _MEMO.drop(key.key)

    def note_unposted(self, mailbox_id: int, count: int = 1) -> bool:
        """``count`` messages of the mailbox were indexed unposted (committed); True when a fold is due."""
        pending = self._unposted.get(mailbox_id, 0) + count
        self._unposted[mailbox_id] = pending
        return pending >= FOLD_AT

    def fold_all(self, connection: Connection, mailbox_id: int) -> int:
        """Every unposted message of the mailbox folded (``FOLD_BATCH`` at a time, in the caller's write
        transaction). Returns the messages posted."""
        return self._fold_pending(connection, mailbox_id, set())

    def _fold_pending(self, connection: Connection, mailbox_id: int, written: set[int]) -> int:
        self._unposted[mailbox_id] = 0
        posted = 0
        while (done := fold(connection, mailbox_id, limit=FOLD_BATCH, written=written)) > 0:
            posted += done
            if done < FOLD_BATCH:     # all there were (on PostgreSQL, deliveries committing meanwhile wait)
                break
        return posted

    async def maintain(self, mailbox_id: int, write: Transaction, read: Transaction) -> None:
        """The background work after deliveries (``SqlMailStore._fold``), each step a transaction of its own:
        the unposted messages folded, ``FOLD_AT`` per transaction; every ``COMPACT_EVERY`` folds, the crowded tokens of this fold compacted
        in transactions of at most ``COMPACT_BYTES`` of ids each; then, when the ids of messages expunged since
        they were posted reach ``SWEEP_SHARE`` of the posted ones, a sweep that drops them (same bound per
        transaction), so a mailbox that churns keeps an index the size of what it holds."""
        written: set[int] = set()
        self._unposted[mailbox_id] = 0
        for _ in range(MAX_PASSES):      # ``FOLD_AT`` messages per transaction: the lock held for one batch
            done = await write(lambda connection: fold(connection, mailbox_id, limit=FOLD_AT, written=written))
            if done < FOLD_AT:
                break
        folds = self._folds.get(mailbox_id, 0) + 1
        self._folds[mailbox_id] = 0 if folds >= COMPACT_EVERY else folds
        if folds >= COMPACT_EVERY and written:
            await self.compact_bounded(mailbox_id, write, among=written)
        indexed = (await self.key_for(mailbox_id)).token("", _INDEXED)
        if sweep_due(*await read(lambda connection: stale_ids(connection, mailbox_id, indexed))):
            await self.sweep_bounded(mailbox_id, write, read)

    @staticmethod
    async def compact_bounded(mailbox_id: int, write: Transaction, *, among: Iterable[int] | None = None) -> None:
        tokens = None if among is None else sorted(among)
        for _ in range(MAX_PASSES):
            merged = await write(lambda connection: compact(connection, mailbox_id, max_segments=MAX_SEGMENTS,
                                                             among=tokens, limit=COMPACT_TOKENS,
                                                             max_bytes=COMPACT_BYTES))
            if not merged:
                return

    @staticmethod
    async def sweep_bounded(mailbox_id: int, write: Transaction, read: Transaction) -> int:
        """A whole sweep (see ``sweep``) in bounded transactions. Returns the ids dropped."""
        plan = await read(lambda connection: sweep_plan(connection, mailbox_id))
        after: tuple[int, int] | None = None
        dropped = 0
        for _ in range(MAX_PASSES):
            start = after
            after, count = await write(lambda connection: sweep(connection, mailbox_id, plan, start))
            dropped += count
            if after is None:
                break
        return dropped

    @staticmethod
    async def delete_mailbox_tokens(session: AsyncSession, mailbox_id: int) -> int:
        """Every token of a mailbox's messages (crypto-shredding: the sealed rows become unreadable, and
        the tokens' equalities and frequencies must not outlive them). Returns the rows deleted."""
        deleted = 0
        for table in (MESSAGE_TOKENS, POSTINGS):
            result = await session.execute(delete(table).where(table.c.mailbox_id == mailbox_id))
            deleted += int(getattr(result, "rowcount", 0) or 0)
        return deleted

    @staticmethod
    async def copy(session: AsyncSession, pairs: Sequence[tuple[int, int]]) -> None:
        """The tokens of each (source id, copy id), unposted: a COPY within one mailbox keeps the owner, hence
        the key."""
        by_source = dict(pairs)
        rows = []
        for chunk in chunked(sorted(by_source), MAX_IDS_PER_QUERY):
            for source, mailbox_id, tokens in (await session.execute(
                    select(MessageTokens.message_id, MessageTokens.mailbox_id, MessageTokens.tokens)
                    .where(MessageTokens.message_id.in_(chunk)))).all():
                rows.append({"message_id": by_source[source], "mailbox_id": mailbox_id, "posted": False,
                             "tokens": tokens})
        if rows:
            await session.execute(insert(MESSAGE_TOKENS), rows)


@dataclass
class BackfillReport:
    indexed: int = 0
    batches: int = 0


async def backfill(database: Database, index: BlindIndex, fields: FieldSealer, mailbox_id: int, *,
                   batch: int = BACKFILL_BATCH) -> BackfillReport:
    """Index every not yet indexed message of a mailbox, ``batch`` per transaction (resumable: progress is
    the index itself; a message expunged meanwhile is simply skipped on the next round); then fold every
    unposted message into the posting lists and merge each token's segments into one (at most
    ``SEGMENT_IDS`` ids a segment): the compact form SEARCH reads fastest."""
    key = await index.key_for(mailbox_id)
    owner = mailbox_owner(mailbox_id)
    report = BackfillReport()
    columns = [getattr(Message, column) for column in FIELD_TAGS]
    while True:
        async with database.session() as session:
            rows = (await session.execute(
                select(Message.id, *columns).join(Folder, Folder.id == Message.folder_id)
                .where(Folder.mailbox_id == mailbox_id, ~exists().where(MessageTokens.message_id == Message.id))
                .order_by(Message.id).limit(batch))).all()
        if not rows:
            await database.run_in_transaction(lambda connection: _repack(connection, index, mailbox_id), write=True)
            return report
        prepared = [(row[0], key.message_tokens(await _opened(fields, owner, row[1:]))) for row in rows]
        try:
            async with database.session() as session:
                still_there = set(await session.scalars(select(Message.id).where(
                    Message.id.in_([message_id for message_id, _ in prepared]),
                    ~exists().where(MessageTokens.message_id == Message.id))))
                entries = [message_tokens_row(message_id, mailbox_id, tokens) for message_id, tokens in prepared
                           if message_id in still_there]
                if entries:
                    await session.execute(insert(MESSAGE_TOKENS), entries)
        except IntegrityError:
            log.info("search index backfill of mailbox %d raced another writer; retrying the batch", mailbox_id)
            continue
        report.indexed += len(still_there)
        report.batches += 1


def _repack(connection: Connection, index: BlindIndex, mailbox_id: int) -> None:
    index.fold_all(connection, mailbox_id)
    compact(connection, mailbox_id, max_segments=1, whole=True)


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

"""The keyed blind index of sealed header columns never changes a SEARCH answer, only how many rows are unsealed.

Each test compares the store with the index against the same store reading the same rows without it
(``index=None``: every candidate row unsealed and compared in Python, the path SEARCH took before).
"""

from __future__ import annotations

import asyncio
import email.header
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from gateway.mailstore import blind_index
from gateway.mailstore.blind_index import (
    FIELD_TAGS,
    MAX_GRAMS_PER_FIELD,
    IndexKey,
    backfill,
    compact,
    fold,
    trigrams,
    unpack,
)
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.interface import (
    INBOX,
    All,
    AnyOf,
    FolderRef,
    Header,
    Not,
    SearchKey,
    StoreMode,
    UidSet,
)
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.mailstore.tables import Message, MessageTokens, TokenPostings
from gateway.security.at_rest import FieldSealer, HeaderSealer
from gateway.security.keys import KeyManager, mailbox_owner
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from tests.mailstore.conftest import MakeMailbox

# Few letters, so that random needles often occur; case pairs whose folding differs (ß -> ss, İ, Σ/ς).
LETTERS = "abAB é.Éß@<>İΣς-"
FIELDS = ("FROM", "TO", "CC", "SUBJECT", "MESSAGE-ID")


def sealed_pair(database: Database, blobs: BlobStore, keys: KeyManager) -> tuple[SqlMailStore, SqlMailStore]:
    """The same sealed store twice: with the blind index, and reading every row without it."""
    indexed = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    unsealing = SqlMailStore(database, blobs, ChangeHub(), headers=HeaderSealer(FieldSealer(keys)))
    unsealing.index = None
    return indexed, unsealing


async def sealed_inbox(database: Database, blobs: BlobStore, keys: KeyManager,
                       make_mailbox: MakeMailbox) -> tuple[SqlMailStore, SqlMailStore, int, FolderRef]:
    """``sealed_pair``'s two stores and a new mailbox's provisioned INBOX."""
    indexed, unsealing = sealed_pair(database, blobs, keys)
    box = await make_mailbox()
    await LocalDelivery(indexed).provision(box)
    return indexed, unsealing, box, FolderRef(box, INBOX)


def encoded(text: str) -> str:
    return text if text.isascii() else email.header.Header(text, "utf-8").encode()


def raw_message(subject: str, name: str, local: str, cc: str | None, message_id: str) -> bytes:
    lines = [f"From: {encoded(name)} <{local}@example.org>", f"To: {local}.to@example.org",
             f"Subject: {encoded(subject)}", f"Message-ID: <{message_id}@example.org>"]
    if cc is not None:
        lines.append(f"Cc: {encoded(cc)} <cc@example.org>")
    return ("\r\n".join(lines) + "\r\n\r\nBonjour\r\n").encode()


text = st.text(alphabet=LETTERS, max_size=12)
mail = st.tuples(text, text, st.text(alphabet="abAB.", min_size=1, max_size=6), st.none() | text,
                 st.text(alphabet="ab12.", min_size=1, max_size=8))
messages = st.lists(mail, min_size=1, max_size=5)


@st.composite
def search_keys(draw: st.DrawFn, values: list[str]) -> SearchKey:
    def leaf() -> SearchKey:
        if values and draw(st.booleans()):
            source = draw(st.sampled_from(values))
            start = draw(st.integers(0, len(source)))
            needle = source[start:draw(st.integers(start, len(source)))]
            needle = draw(st.sampled_from([needle, needle.upper(), needle.lower(), needle.swapcase()]))
        else:
            needle = draw(text)
        return Header(draw(st.sampled_from(FIELDS)), needle)

    shape = draw(st.sampled_from(["leaf", "not", "or", "and"]))
    if shape == "leaf":
        return leaf()
    if shape == "not":
        return Not(leaf())
    if shape == "or":
        return AnyOf([leaf(), leaf()])
    return All([leaf(), Not(leaf())])


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data(), mails=messages)
async def test_index_answers_as_unsealing_every_row(database: Database, blobs: BlobStore, keys: KeyManager,
                                                    make_mailbox: MakeMailbox, data: st.DataObject,
                                                    mails: list[tuple[str, str, str, str | None, str]]) -> None:
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for subject, name, local, cc, message_id in mails:
        await indexed.append(inbox, raw_message(subject, name, local, cc, message_id))
    values = [value for mail in mails for value in mail if value]
    for _ in range(6):
        key = data.draw(search_keys(values))
        assert await indexed.search(inbox, key) == await unsealing.search(inbox, key), key


async def test_messages_without_index_rows_are_still_found_then_backfilled(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for number in range(4):      # stored before the index existed
        await unsealing.append(inbox, raw_message(f"Vaccination {number}", "Dr Ève", "eve", None, f"m{number}"))
    await indexed.append(inbox, raw_message("Vaccination 9", "Dr Ève", "eve", "Jean", "m9"))
    keys_to_try: list[SearchKey] = [Header("SUBJECT", "VACCINATION"), Header("FROM", "ève"), Header("CC", ""),
                                    Not(Header("CC", "jean")), Header("MESSAGE-ID", "<m2@")]
    expected = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [5], [1, 2, 3, 4], [3]]
    assert [await indexed.search(inbox, key) for key in keys_to_try] == expected

    assert indexed.index is not None and indexed.headers is not None
    report = await backfill(database, indexed.index, indexed.headers.fields, box, batch=3)
    assert report.indexed == 4 and report.batches == 2
    assert (await backfill(database, indexed.index, indexed.headers.fields, box)).indexed == 0  # resumable, idempotent
    assert await _messages_without_tokens(database) == 0
    assert [await indexed.search(inbox, key) for key in keys_to_try] == expected


async def test_index_rows_follow_copy_move_and_expunge(database: Database, blobs: BlobStore, keys: KeyManager,
                                                       make_mailbox: MakeMailbox) -> None:
    indexed, _ = sealed_pair(database, blobs, keys)
    box = await make_mailbox()
    await LocalDelivery(indexed).provision(box)
    inbox, archive = FolderRef(box, INBOX), FolderRef(box, "Archive")
    for number in range(3):
        await indexed.append(inbox, raw_message(f"Compte rendu {number}", "Dr Martin", "martin", None, f"c{number}"))
    await indexed.copy(inbox, UidSet.of((1, 2)), archive)
    await indexed.move(inbox, UidSet.of(3), archive)
    assert await _messages_without_tokens(database) == 0
    assert await indexed.search(archive, Header("SUBJECT", "rendu 2")) == [3]
    assert await indexed.search(archive, Header("SUBJECT", "RENDU")) == [1, 2, 3]
    assert await indexed.search(inbox, Header("SUBJECT", "rendu 2")) == []
    before = await _token_count(database)
    await indexed.store_flags(inbox, UidSet.of((1, 2)), StoreMode.ADD, ["\\Deleted"])
    await indexed.expunge(inbox)
    assert await _token_count(database) < before    # rows go with their message (ON DELETE CASCADE)
    async with database.session() as session:
        orphans = await session.scalar(select(func.count()).select_from(MessageTokens).where(
            ~MessageTokens.message_id.in_(select(Message.id))))
    assert orphans == 0


async def test_an_oversized_field_stays_searchable_without_its_trigrams(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    long_subject = "".join(chr(0x4E00 + n) for n in range(MAX_GRAMS_PER_FIELD + 10))  # distinct trigrams
    await indexed.append(inbox, raw_message(long_subject, "A", "a", None, "long"))
    await indexed.append(inbox, raw_message("court", "A", "a", None, "short"))
    for key in (Header("SUBJECT", long_subject[500:520]), Header("SUBJECT", "cour"), Header("SUBJECT", "")):
        assert await indexed.search(inbox, key) == await unsealing.search(inbox, key)
    assert await indexed.search(inbox, Header("SUBJECT", long_subject[500:520])) == [1]
    async with database.session() as session:
        per_message = (await session.execute(select(MessageTokens.tokens))).scalars().all()
    assert max(len(unpack(tokens)) for tokens in per_message) < 100   # no row per trigram of the 2,058-character field


async def test_one_owners_tokens_differ_from_anothers(database: Database, blobs: BlobStore, keys: KeyManager,
                                                      make_mailbox: MakeMailbox) -> None:
    indexed, _ = sealed_pair(database, blobs, keys)
    first, second = await make_mailbox(), await make_mailbox()
    for box in (first, second):
        await LocalDelivery(indexed).provision(box)
        await indexed.append(FolderRef(box, INBOX), raw_message("Même sujet", "Dr Même", "meme", None, "same"))
    async with database.session() as session:
        rows = (await session.execute(select(MessageTokens.message_id, MessageTokens.tokens))).all()
    by_message = {message_id: set(unpack(tokens)) for message_id, tokens in rows}
    first_tokens, second_tokens = by_message.values()
    assert first_tokens.isdisjoint(second_tokens)   # identical headers, no common token across owners
    assert await indexed.search(FolderRef(second, INBOX), Header("SUBJECT", "même")) == [1]


async def _messages_without_tokens(database: Database) -> int:
    async with database.session() as session:
        return int(await session.scalar(select(func.count()).select_from(Message).where(
            ~Message.id.in_(select(MessageTokens.message_id)))) or 0)


async def _token_count(database: Database) -> int:
    async with database.session() as session:
        return int(await session.scalar(select(func.count()).select_from(MessageTokens)) or 0)



@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(FIELD_TAGS)), st.none() | st.text(max_size=40)),
       st.binary(min_size=32, max_size=32))
def test_message_tokens_are_the_reference_tokens(values: dict[str, str | None], key: bytes) -> None:
    """``message_tokens`` computes a trigram's token from a keyed state fed the field's prefix already: the
    same tokens as ``IndexKey.token``, the definition SEARCH's needles use (a drift would hide matches)."""
    index_key = IndexKey(key)
    expected = {index_key.token("", b"i")}
    for column, value in values.items():
        if value is not None:
            expected.add(index_key.token(column, b"p"))
            expected.update(index_key.token(column, b"g", gram) for gram in trigrams(value.casefold()))
    assert index_key.message_tokens(values) == expected
    for column, value in values.items():
        for needle in ([value[1:4], value] if value else []):
            needle_tokens = index_key.needle_tokens(column, needle)
            assert needle_tokens is None or set(needle_tokens) <= index_key.message_tokens(values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(sorted(FIELD_TAGS)), st.none() | st.text(max_size=20)),
                min_size=1, max_size=6),
       st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=3), st.integers(0, 24))
def test_memoised_tokens_are_the_reference_tokens_across_resets(
        messages: list[dict[str, str | None]], keys: list[bytes], capacity: int) -> None:
    """The trigram memo (emptied when full, shared by every owner) gives each message the tokens a fresh
    computation gives; an owner's entries leave with its key."""
    memo = blind_index._GramMemo(capacity)
    original = blind_index._MEMO
    blind_index._MEMO = memo
    try:
        for _ in range(2):                       # the second round finds (some of) its trigrams remembered
            for number, values in enumerate(messages):
                key = keys[number % len(keys)]
                fresh = IndexKey(key)
                expected = {fresh.token("", b"i")}
                for column, value in values.items():
                    if value is not None:
                        expected.add(fresh.token(column, b"p"))
                        expected.update(fresh.token(column, b"g", gram) for gram in trigrams(value.casefold()))
                assert IndexKey(key).message_tokens(values) == expected
                assert memo.entries <= capacity
        for key in keys:
            memo.drop(key)
        assert memo.entries == 0
    finally:
        blind_index._MEMO = original


async def _fold(database: Database, mailbox_id: int, limit: int) -> int:
    return await database.run_in_transaction(lambda connection: fold(connection, mailbox_id, limit=limit), write=True)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data(), mails=st.lists(mail, min_size=2, max_size=7))
async def test_posted_unposted_compacted_and_expunged_answer_alike(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox, data: st.DataObject,
        mails: list[tuple[str, str, str, str | None, str]]) -> None:
    """Whatever mix of posted segments (several per token), unposted rows, compacted lists and stale ids of
    expunged messages (whose ids SQLite gives out again) the index holds, SEARCH answers as unsealing does."""
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for subject, name, local, cc, message_id in mails:
        await indexed.append(inbox, raw_message(subject, name, local, cc, message_id))
        if data.draw(st.booleans(), label="fold"):
            await _fold(database, box, data.draw(st.integers(1, 3), label="fold limit"))
        if data.draw(st.booleans(), label="expunge the newest"):
            uids = await indexed.search(inbox, All([]))
            await indexed.store_flags(inbox, UidSet.of(uids[-1]), StoreMode.ADD, ["\\Deleted"])
            await indexed.expunge(inbox)
    if data.draw(st.booleans(), label="compact"):
        await database.run_in_transaction(lambda connection: compact(connection, box, max_segments=0), write=True)
    values = [value for mail in mails for value in mail if value]
    for _ in range(6):
        key = data.draw(search_keys(values))
        assert await indexed.search(inbox, key) == await unsealing.search(inbox, key), key


async def test_deliveries_fold_in_the_background_and_stay_found(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.mailstore import blind_index
    monkeypatch.setattr(blind_index, "FOLD_AT", 3)
    monkeypatch.setattr(blind_index, "COMPACT_EVERY", 2)
    monkeypatch.setattr(blind_index, "MAX_SEGMENTS", 1)
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for number in range(7):
        await indexed.append(inbox, raw_message(f"Vaccination {number}", "Dr Ève", "eve", None, f"v{number}"))
        await asyncio.gather(*indexed._fold_tasks)
    async with database.session() as session:
        posted = dict((await session.execute(select(MessageTokens.posted, func.count())
                                             .group_by(MessageTokens.posted))).all())
        segments = (await session.execute(select(TokenPostings.token, func.count()).group_by(TokenPostings.token))).all()
    assert posted == {True: 6, False: 1}          # two folds of three; the seventh waits
    assert segments and max(count for _, count in segments) == 1    # the second fold compacted to one segment
    for key in (Header("SUBJECT", "vaccination"), Header("SUBJECT", "nation 6"), Header("FROM", "ève")):
        assert await indexed.search(inbox, key) == await unsealing.search(inbox, key)
    assert await indexed.search(inbox, Header("SUBJECT", "vaccination 6")) == [7]


async def test_the_old_rows_convert_to_packed_rows_and_postings(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    """Revision 0022 turns the row-per-token table into the packed rows and posting lists, without keys:
    down to the old table and up again, every message keeps its tokens and SEARCH its answers."""
    from alembic import command

    from gateway.storage.db import alembic_config

    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for number in range(5):
        await indexed.append(inbox, raw_message(f"Résultats {number}", "Dr Ève", "eve", "Jean" if number % 2 else None,
                                                f"r{number}"))
    await _fold(database, box, 2)                 # posted and unposted messages alike
    before = await _tokens_by_message(database)

    def migrate(connection: Any, revision: str, down: bool) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)

    async with database.engine.begin() as connection:
        await connection.run_sync(migrate, "0021_imapfast_index_columns", True)
        assert (await connection.exec_driver_sql("SELECT count(*) FROM mail_search_tokens")).scalar() == sum(
            map(len, before.values()))
        await connection.run_sync(migrate, "heads", False)
    assert await _tokens_by_message(database) == before
    async with database.session() as session:
        assert not await session.scalar(select(func.count()).select_from(MessageTokens).where(
            MessageTokens.posted.is_(False)))   # everything converted is posted
    for key in (Header("SUBJECT", "résultats"), Header("SUBJECT", "ltats 3"), Header("CC", "jean"), Header("CC", "")):
        assert await indexed.search(inbox, key) == await unsealing.search(inbox, key)


async def _tokens_by_message(database: Database) -> dict[int, set[int]]:
    async with database.session() as session:
        rows = (await session.execute(select(MessageTokens.message_id, MessageTokens.tokens))).all()
    return {message_id: set(unpack(tokens)) for message_id, tokens in rows}


async def test_long_lists_bisected_and_common_tokens_skipped_answer_alike(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    """Posted lists long enough for each shortcut of the intersection: a token in every message (not read,
    the exact check decides), a few candidates looked up by bisection in a list sixteen times longer."""
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for number in range(60):
        subject = f"Vaccination rappel {number}" if number % 2 == 0 else f"Compte rendu {number}"
        await indexed.append(inbox, raw_message(subject, "Dr Ève", "eve", None, f"n{number}"))
    await _fold(database, box, 100)
    for needle in ("rappel 42", "rappel 4", "l 4", "tion r", "rendu", "ve", "Dr Ève", "1"):
        for key in (Header("SUBJECT", needle), Header("FROM", needle)):
            assert await indexed.search(inbox, key) == await unsealing.search(inbox, key), key
    assert await indexed.search(inbox, Header("SUBJECT", "rappel 42")) == [43]


async def _postings(database: Database, mailbox_id: int) -> dict[int, tuple[int, int, list[int]]]:
    """Row id -> (token, size, ids) of every segment of the mailbox."""
    async with database.session() as session:
        rows = (await session.execute(select(TokenPostings.id, TokenPostings.token, TokenPostings.size,
                                             TokenPostings.ids).where(TokenPostings.mailbox_id == mailbox_id))).all()
    return {row_id: (token, size, list(unpack(ids))) for row_id, token, size, ids in rows}


async def _message_ids(database: Database, mailbox_id: int) -> set[int]:
    async with database.session() as session:
        return set(await session.scalars(select(MessageTokens.message_id).where(MessageTokens.mailbox_id == mailbox_id)))


async def test_the_background_sweep_drops_the_ids_of_expunged_messages(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mailbox that churns (deliveries, expunges) keeps posting lists of the messages it holds: once the ids
    of messages gone reach ``SWEEP_SHARE`` of the posted ones, the background work after a fold drops them;
    SEARCH answers as unsealing every row before and after."""
    from gateway.mailstore import blind_index
    monkeypatch.setattr(blind_index, "FOLD_AT", 4)
    monkeypatch.setattr(blind_index, "SWEEP_MIN", 4)
    monkeypatch.setattr(blind_index, "COMPACT_BYTES", 64)       # several bounded sweep transactions
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    searches = [Header("SUBJECT", "vaccination"), Header("SUBJECT", "ation 1"), Header("FROM", "ève"),
                Not(Header("SUBJECT", "rappel"))]
    for number in range(12):
        subject = f"Vaccination {number}" if number % 3 else f"Rappel {number}"
        await indexed.append(inbox, raw_message(subject, "Dr Ève", "eve", None, f"v{number}"))
        await asyncio.gather(*indexed._fold_tasks)
    expunged = await _message_ids(database, box)
    await indexed.store_flags(inbox, UidSet.of((1, 8)), StoreMode.ADD, ["\\Deleted"])
    await indexed.expunge(inbox)
    expunged -= await _message_ids(database, box)
    assert len(expunged) == 8
    stale = {message_id for _, _, ids in (await _postings(database, box)).values() for message_id in ids}
    assert expunged <= stale                                     # folded, then expunged: still listed
    for key in searches:
        assert await indexed.search(inbox, key) == await unsealing.search(inbox, key), key
    for number in range(12, 16):                                 # the next fold finds a sweep due
        await indexed.append(inbox, raw_message(f"Vaccination {number}", "Dr Ève", "eve", None, f"v{number}"))
        await asyncio.gather(*indexed._fold_tasks)
    listed = {message_id for _, _, ids in (await _postings(database, box)).values() for message_id in ids}
    assert not listed & expunged
    assert listed == await _message_ids(database, box)           # every message posted, none gone
    key = await indexed.index.key_for(box) if indexed.index is not None else None
    assert key is not None
    counted = await database.run_in_transaction(
        lambda connection: blind_index.stale_ids(connection, box, key.token("", b"i")))
    assert counted == (8, 8)
    for key_ in searches:
        assert await indexed.search(inbox, key_) == await unsealing.search(inbox, key_), key_
    assert await indexed.search(inbox, Header("SUBJECT", "vaccination 1")) == [11, 12, 13, 14, 15, 16]


async def test_a_sweep_keeps_an_id_given_an_index_row_after_its_plan(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    """The sweep drops an id only when its message has no index row in the sweep's own transaction: one the
    plan did not know (backfilled since, or an id SQLite gave out again) stays in its segments."""
    from gateway.mailstore import blind_index
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for number in range(3):
        await indexed.append(inbox, raw_message(f"Vaccination {number}", "Dr Ève", "eve", None, f"v{number}"))
    await _fold(database, box, 10)
    ids = sorted(await _message_ids(database, box))
    plan = blind_index.SweepPlan(max(await _postings(database, box)), frozenset(ids[1:]))  # ids[0] unknown to it
    after, dropped = await database.run_in_transaction(
        lambda connection: blind_index.sweep(connection, box, plan, None, max_bytes=1 << 20), write=True)
    assert dropped == 0
    listed = {message_id for _, _, held in (await _postings(database, box)).values() for message_id in held}
    assert listed == set(ids)
    assert await indexed.search(inbox, Header("SUBJECT", "vaccination 0")) == [1]


async def test_each_compaction_transaction_rewrites_at_most_its_bytes_of_postings(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    """The write lock a compaction holds is bounded by what it rewrites, not by how crowded the mailbox is:
    each call reads and replaces segments of at most ``max_bytes`` octets of ids (8 a message), or two segments
    when even two do not fit, the usual compaction repeated until no token is crowded; SEARCH answers as
    unsealing between the steps."""
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    for number in range(24):                                     # one segment per message and token
        await indexed.append(inbox, raw_message(f"Vaccination {number}", "Dr Ève", "eve", None, f"v{number}"))
        await _fold(database, box, 1)
    budget = 80                                                  # ten ids
    before = await _postings(database, box)
    assert max(size for _, size, _ in before.values()) == 1 and len(before) > 24 * 20
    steps = 0
    while True:
        merged = await database.run_in_transaction(
            lambda connection: compact(connection, box, max_segments=1, max_bytes=budget), write=True)
        after = await _postings(database, box)
        removed = [size for row_id, (_, size, _) in before.items() if row_id not in after]
        assert sum(removed) * 8 <= budget or len(removed) == 2     # two segments always: each call moves on
        assert sum(len(ids) for _, _, ids in after.values()) == sum(len(ids) for _, _, ids in before.values())
        before = after
        steps += 1
        if not merged:
            break
        if steps % 25 == 0:
            key = Header("SUBJECT", f"ion {steps % 24}")
            assert await indexed.search(inbox, key) == await unsealing.search(inbox, key)
    assert steps > 10
    segments: dict[int, int] = {}
    for token, _, _ in before.values():
        segments[token] = segments.get(token, 0) + 1
    assert max(segments.values()) == 1
    for key in (Header("SUBJECT", "vaccination"), Header("SUBJECT", "tion 2"), Header("FROM", "ève")):
        assert await indexed.search(inbox, key) == await unsealing.search(inbox, key)


async def test_reindex_recomputes_the_header_columns_stored_with_replacement_characters(
        database: Database, blobs: BlobStore, keys: KeyManager, make_mailbox: MakeMailbox) -> None:
    """A message stored before 8-bit header octets were read as text kept U+FFFD in its sealed search columns
    (and its index tokens were of that text): SEARCH SUBJECT "Café" missed it. ``gateway mailbox reindex``
    parses its header again from the sealed message and re-indexes it; a second run changes nothing."""
    from gateway.mailstore.search_columns import reindex_mailbox
    indexed, unsealing, box, inbox = await sealed_inbox(database, blobs, keys, make_mailbox)
    raw = (b"From: Jos\xe9 Martin <jose@example.org>\r\nTo: patient@example.org\r\n"
           b"Subject: Caf\xe9 au lait, r\xc3\xa9sultats\r\nMessage-ID: <m1@example.org>\r\n\r\nBonjour\r\n")
    await indexed.append(inbox, raw)
    await indexed.append(inbox, raw_message("Compte rendu", "Dr Ève", "eve", None, "m2"))
    sealer = indexed.headers
    assert sealer is not None and indexed.index is not None
    owner = mailbox_owner(box)
    old = {"subject": "Caf\ufffd au lait, r\ufffd\ufffdsultats", "from_addr": "Jos\ufffd Martin <jose@example.org>"}
    async with database.session() as session:
        message = (await session.execute(select(Message).where(Message.uid == 1))).scalar_one()
        for column, value in old.items():
            setattr(message, column, await sealer.fields.seal(owner, column, value))
        await session.flush()
        await session.execute(MessageTokens.__table__.delete().where(MessageTokens.message_id == message.id))
        await session.commit()
    await backfill(database, indexed.index, sealer.fields, box)     # its tokens as they were: of the old text
    for store in (indexed, unsealing):
        assert await store.search(inbox, Header("SUBJECT", "café")) == []
        assert await store.search(inbox, Header("SUBJECT", "caf\ufffd")) == [1]
    report = await reindex_mailbox(database, blobs, sealer, indexed.index, box, batch=1)
    assert (report.recomputed, report.indexed) == (1, 1)
    for store in (indexed, unsealing):
        assert await store.search(inbox, Header("SUBJECT", "café")) == [1]
        assert await store.search(inbox, Header("SUBJECT", "résultats")) == [1]
        assert await store.search(inbox, Header("FROM", "josé")) == [1]
        assert await store.search(inbox, Header("SUBJECT", "\ufffd")) == []
    envelope = (await indexed.fetch_envelopes(inbox, UidSet.of(1)))[1]      # parsed again with the columns
    assert isinstance(envelope, bytes) and b"Caf\xe9 au lait, r\xc3\xa9sultats" in envelope
    again = await reindex_mailbox(database, blobs, sealer, indexed.index, box)
    assert (again.recomputed, again.indexed, again.envelopes) == (0, 0, 0)

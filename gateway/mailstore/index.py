"""A per-folder index held in memory and shared by every session of this process.

What SELECT and ``FETCH (UID FLAGS MODSEQ)`` need of a folder, as compact
arrays: UIDs (``array('I')``, RFC 3501 2.3.1.1 UIDs are 32-bit), MODSEQs
(``array('Q')``, RFC 7162 63-bit) and, per message, the id of its flag set
(``array('I')``) in a table of interned flag sets (a mailbox has a handful of
distinct combinations, so 100,000 messages cost 1.6 MB once, not per session).

The database stays the truth.  An index knows the folder's HIGHESTMODSEQ it
reflects; every change of a folder's messages takes a new MODSEQ in the folder
row under that row's lock (``sql.py``), so an index whose MODSEQ equals the
row's is current, and otherwise the changes since (messages whose MODSEQ is
higher, expunge tombstones whose MODSEQ is higher: both indexed) bring it up to
date.  On PostgreSQL (READ COMMITTED: a snapshot per statement) the rows read
after the folder row may be newer than it, so an index there holds at least the
state of its MODSEQ, perhaps a little more: nothing that needs exactly that state
(STATUS's counts, the update check from memory) is answered from it there.
Nothing depends on the change notifications for correctness: they only
tell the store which indexes to refresh eagerly; a lost one (another node, a
dropped LISTEN connection) is caught at the next look at the folder row.

Sessions never see the arrays change under them: the UID array is replaced,
never modified, when messages come or go, so a selected session can keep a
reference to the array it was given (no copy per session) and copy it only
when its own view has to diverge (``gateway.imap.selected``).
"""

from __future__ import annotations

import asyncio
import bisect
import operator
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.mailstore import flags as flagcodec
from gateway.mailstore.interface import SEEN, FlagListing, UidSet

SEEN_BIT = flagcodec.SYSTEM_BITS[SEEN]
MAX_INDEXES = 256   # folders kept in memory (least recently used dropped first)
FEW = 64            # up to this many expunged at once, removed one by one from a copy of the arrays
CHANGE_LOG = 4096   # changes remembered for ``changes_after`` (the oldest half dropped beyond it)


class FlagSets:
    """Interned flag sets: (system bits, keywords column) -> a small id, and back to the flags."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, str], int] = {}
        self.flags: list[frozenset[str]] = []
        self.seen: list[bool] = []

    def intern(self, bits: int, keywords: str) -> int:
        key = (bits, keywords)
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self.flags)
            self.flags.append(flagcodec.decode(bits, keywords))
            self.seen.append(bool(bits & SEEN_BIT))
        return found


Row = tuple[int, int, int, str]   # uid, modseq, system_flags, keywords column
NO_KEYWORDS = flagcodec.keywords_column(())


@dataclass(frozen=True)
class Columns:
    """A whole folder's rows as arrays, built by ``columns_of`` where the rows were read (a database thread),
    so the event loop only installs them: ``flag_keys`` are the distinct (system bits, keywords column) pairs,
    ``key_ids`` the position of each message's pair in it."""

    uids: array[int]
    modseqs: array[int]
    flag_keys: list[tuple[int, str]]
    key_ids: array[int]


def columns_of(rows: Sequence[Row]) -> Columns:
    """Rows in UID order -> ``Columns``; touches no shared state."""
    return _columns(rows, list(map(_FOURTH, rows)))


def columns_from(rows: Sequence[tuple[int, int, int]], keyworded: Sequence[tuple[int, str]]) -> Columns:
    """(uid, modseq, system_flags) rows in UID order and the (uid, keywords column) of the few messages that
    have keywords (read from two covering indexes) -> ``Columns``; touches no shared state."""
    keywords_column: Sequence[str] = (NO_KEYWORDS,)
    if keyworded:
        uids = array("I", map(_FIRST, rows))
        column = [NO_KEYWORDS] * len(uids)
        for uid, keywords in keyworded:
            at = bisect.bisect_left(uids, uid)
            if at < len(uids) and uids[at] == uid:    # (PostgreSQL: a message that came between the two reads)
                column[at] = keywords
        keywords_column = column
    return _columns(rows, keywords_column)


_FIRST, _SECOND, _THIRD, _FOURTH = (operator.itemgetter(at) for at in range(4))


def _columns(rows: Sequence[Sequence[Any]], keywords_column: Sequence[str]) -> Columns:
    """Column by column, in C loops (``map`` of item getters: no tuple per row). ``keywords_column`` of one
    item: the same for every message."""
    bits_column = array("Q", map(_THIRD, rows))
    keywords = set(keywords_column)
    if len(keywords) <= 1:              # the usual folder: no message has a keyword, flags differ by bits only
        only = next(iter(keywords), NO_KEYWORDS)
        distinct = sorted(set(bits_column))
        by_bits = {bits: at for at, bits in enumerate(distinct)}
        flag_keys = [(bits, only) for bits in distinct]
        key_ids = array("I", map(by_bits.__getitem__, bits_column))
    else:
        pairs = list(zip(bits_column, keywords_column, strict=True))
        flag_keys = sorted(set(pairs))
        by_pair = {pair: at for at, pair in enumerate(flag_keys)}
        key_ids = array("I", map(by_pair.__getitem__, pairs))
    return Columns(array("I", map(_FIRST, rows)), array("Q", map(_SECOND, rows)), flag_keys, key_ids)


class FolderIndex:
    """One folder's UIDs, MODSEQs and flags; see the module docstring."""

    def __init__(self, folder_id: int, uidvalidity: int) -> None:
        self.folder_id = folder_id
        self.uidvalidity = uidvalidity
        self.modseq = -1                       # nothing loaded yet
        self.uids = array("I")
        self.modseqs = array("Q")
        self.flag_ids = array("I")
        self.sets = FlagSets()
        self.lock = asyncio.Lock()
        # The UIDs changed (new, re-flagged, expunged) since ``log_floor``, by ascending MODSEQ: what
        # ``changes_after`` needs to answer "what changed since m" for any m >= ``log_floor`` without the database.
        self.log_modseqs = array("Q")
        self.log_uids = array("I")
        self.log_floor = -1
        # The store's epochs (``sql.py``) when a look at the folder row last found this index holding the row's
        # state: with nothing published since but changes already applied here, the index equals the database.
        self.verified: tuple[int, int] | None = None
        self.recent_mark = 0                   # RFC 3501 2.3.2: \Recent claimed up to this UID (committed)

    @property
    def loaded(self) -> bool:
        return self.modseq >= 0

    def load(self, rows: Sequence[Row], modseq: int) -> None:
        """Every message of the folder, in UID order, as of ``modseq``."""
        self.install(columns_of(rows), modseq)

    def install(self, columns: Columns, modseq: int) -> None:
        """Every message of the folder as ``columns_of`` built them, as of ``modseq`` (replacing what was held:
        a whole newer picture). Only the handful of distinct flag sets is interned here."""
        ids = [self.sets.intern(*key) for key in columns.flag_keys]
        if ids == list(range(len(ids))):    # a new index: interned in the same order, ids unchanged
            flag_ids = columns.key_ids
        else:
            flag_ids = array("I", map(ids.__getitem__, columns.key_ids))
        self.uids, self.modseqs, self.flag_ids = columns.uids, columns.modseqs, flag_ids
        self.modseq = modseq
        self.log_modseqs, self.log_uids, self.log_floor = array("Q"), array("I"), modseq

    def apply(self, changed: Sequence[Row], expunged: Iterable[int], modseq: int) -> None:
        """Changes since ``self.modseq``: rows whose MODSEQ is higher (new or re-flagged), expunged UIDs.

        Idempotent: the same changes applied twice (a refresh that saw a few newer ones) leave the same state."""
        gone = {uid for uid in expunged}
        self._log(changed, gone, modseq)
        fresh: list[Row] = []
        for row in changed:
            position = self.position(row[0])
            if position is None:
                fresh.append(row)
            else:
                self.modseqs[position] = row[1]
                self.flag_ids[position] = self.sets.intern(row[2], row[3])
        gone.difference_update(row[0] for row in fresh)
        present_gone = [uid for uid in gone if self.position(uid) is not None]
        if present_gone or fresh:
            self._rebuild(set(present_gone), fresh)
        self.modseq = max(self.modseq, modseq)

    def _log(self, changed: Sequence[Row], gone: Iterable[int], modseq: int) -> None:
        """Remember the UIDs of these changes (applied on top of ``self.modseq``, so the log stays complete
        above ``log_floor``). Tombstones carry no MODSEQ here: ``modseq``, the highest of the batch, stands for
        them (a session told of an expunge already ignores a repeat of it)."""
        entries = sorted([(row[1], row[0]) for row in changed] + [(modseq, uid) for uid in gone])
        floor = max(self.modseq, self.log_modseqs[-1] if self.log_modseqs else 0)
        for entry_modseq, uid in entries:
            self.log_modseqs.append(max(entry_modseq, floor))   # ascending, for the bisection
            self.log_uids.append(uid)
        if len(self.log_uids) > CHANGE_LOG:
            cut = len(self.log_uids) // 2
            # Complete above the last MODSEQ dropped (entries of that MODSEQ kept beyond the cut do no harm).
            self.log_floor = max(self.log_floor, self.log_modseqs[cut - 1])
            del self.log_modseqs[:cut], self.log_uids[:cut]

    def changes_after(self, since: int) -> tuple[list[tuple[int, int, frozenset[str]]], list[int]] | None:
        """(uid, MODSEQ, flags) of the messages changed or added after ``since`` and the UIDs expunged after it,
        as ``changes_since`` would read them from the database at ``self.modseq``; None when the log does not go
        back that far."""
        if since < self.log_floor or self.modseq < 0:
            return None
        start = bisect.bisect_right(self.log_modseqs, since)
        updated: list[tuple[int, int, frozenset[str]]] = []
        expunged: list[int] = []
        for uid in sorted(set(self.log_uids[start:])):
            position = self.position(uid)
            if position is None:
                expunged.append(uid)
            elif self.modseqs[position] > since:
                updated.append((uid, self.modseqs[position], self.sets.flags[self.flag_ids[position]]))
        return updated, expunged

    def _rebuild(self, gone: set[int], fresh: list[Row]) -> None:
        """New arrays (sessions may hold the old UID array): without ``gone``, with ``fresh`` in UID order."""
        uids, modseqs, flag_ids = array("I"), array("Q"), array("I")
        if gone and len(gone) <= FEW:
            uids, modseqs, flag_ids = array("I", self.uids), array("Q", self.modseqs), array("I", self.flag_ids)
            for uid in sorted(gone, reverse=True):        # a few removals: copies (memcpy) then deletions
                at = bisect.bisect_left(uids, uid)
                del uids[at], modseqs[at], flag_ids[at]
        elif gone:
            for uid, message_modseq, flag_id in zip(self.uids, self.modseqs, self.flag_ids, strict=True):
                if uid not in gone:
                    uids.append(uid)
                    modseqs.append(message_modseq)
                    flag_ids.append(flag_id)
        else:
            uids, modseqs, flag_ids = array("I", self.uids), array("Q", self.modseqs), array("I", self.flag_ids)
        for uid, message_modseq, bits, keywords in sorted(fresh):
            flag_id = self.sets.intern(bits, keywords)
            if not uids or uid > uids[-1]:         # the usual case: new UIDs are above all others
                uids.append(uid)
                modseqs.append(message_modseq)
                flag_ids.append(flag_id)
            else:
                at = bisect.bisect_left(uids, uid)
                uids.insert(at, uid)
                modseqs.insert(at, message_modseq)
                flag_ids.insert(at, flag_id)
        self.uids, self.modseqs, self.flag_ids = uids, modseqs, flag_ids

    def position(self, uid: int) -> int | None:
        at = bisect.bisect_left(self.uids, uid)
        return at if at < len(self.uids) and self.uids[at] == uid else None

    # --- answers ---------------------------------------------------------------------

    def unseen(self) -> tuple[int, int | None]:
        """(messages without \\Seen, sequence number of the first of them or None): RFC 3501 7.1 [UNSEEN n]."""
        count, first = 0, None
        for flag_id, seen in enumerate(self.sets.seen):
            if seen:
                continue
            hits = self.flag_ids.count(flag_id)
            if hits:
                count += hits
                at = self.flag_ids.index(flag_id) + 1
                first = at if first is None else min(first, at)
        return count, first

    def keywords(self) -> frozenset[str]:
        """Keywords set on at least one message."""
        used = set(self.flag_ids)
        return frozenset(flag for flag_id in used for flag in self.sets.flags[flag_id] if not flag.startswith("\\"))

    def listing(self, uids: UidSet, changed_since: int | None = None) -> FlagListing:
        """The messages of ``uids`` (ranges resolved by bisection), those changed after ``changed_since`` only."""
        picked_uids, picked_modseqs, picked_ids = array("I"), array("Q"), array("I")
        for low, high in merged_ranges(uids.ranges):
            start, stop = bisect.bisect_left(self.uids, low), bisect.bisect_right(self.uids, high)
            if changed_since is None:
                picked_uids.extend(self.uids[start:stop])
                picked_modseqs.extend(self.modseqs[start:stop])
                picked_ids.extend(self.flag_ids[start:stop])
                continue
            for position in range(start, stop):
                if self.modseqs[position] > changed_since:
                    picked_uids.append(self.uids[position])
                    picked_modseqs.append(self.modseqs[position])
                    picked_ids.append(self.flag_ids[position])
        return FlagListing(picked_uids, picked_modseqs, picked_ids, self.sets.flags)


def merged_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ascending, non-overlapping ranges (a UidSet may be written with overlaps, e.g. ``1:5,3:9``)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


class IndexCache:
    """The indexes of the folders used lately, by folder id (bounded: ``MAX_INDEXES``)."""

    def __init__(self, limit: int = MAX_INDEXES) -> None:
        self.limit = limit
        self._indexes: OrderedDict[int, FolderIndex] = OrderedDict()

    def get(self, folder_id: int, uidvalidity: int) -> FolderIndex:
        index = self._indexes.get(folder_id)
        if index is None or index.uidvalidity != uidvalidity:
            index = self._indexes[folder_id] = FolderIndex(folder_id, uidvalidity)
        self._indexes.move_to_end(folder_id)
        while len(self._indexes) > self.limit:
            self._indexes.popitem(last=False)
        return index

    def peek(self, folder_id: int, uidvalidity: int | None) -> FolderIndex | None:
        """The folder's index if there is one, without making one (``uidvalidity`` None: whichever it has)."""
        index = self._indexes.get(folder_id)
        return index if index is not None and uidvalidity in (None, index.uidvalidity) else None

    def drop(self, folder_id: int) -> None:
        self._indexes.pop(folder_id, None)

    def recently_used(self) -> list[int]:
        """Ids of the folders whose index is loaded, most recently used first."""
        return [folder_id for folder_id, index in reversed(self._indexes.items()) if index.loaded]

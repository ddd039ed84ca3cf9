"""The selected mailbox as one session sees it (RFC 3501 2.3.1.2, 5.2, 7.4.1).

``SelectedMailbox`` keeps the session's sequence-number -> UID map and the
MODSEQ up to which the session has been told about changes.  After each
command the session calls ``updates(...)``, which asks the store for its
changes since that MODSEQ and turns them into untagged responses, the way
pymap's ``SelectedMailbox.fork`` does:

- new UIDs become ``* n EXISTS`` (and ``* n RECENT`` when this session claimed
  them, RFC 3501 7.3.2);
- flag changes made by *other* sessions become ``* n FETCH (UID u FLAGS (...))``
  (with ``MODSEQ`` once CONDSTORE is enabled, RFC 7162 3.1.4);
- expunges become ``* n EXPUNGE`` -- but only where RFC 3501 7.4.1 allows it:
  never while answering FETCH, STORE or SEARCH (the UID forms may), and never
  when no command is in progress.  Until then the expunged UIDs stay in the
  map, so the numbers the client holds keep meaning the same messages.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.imap.protocol import response
from gateway.imap.protocol.errors import BadCommand
from gateway.imap.protocol.sequence import SequenceSet
from gateway.mailstore.index import merged_ranges
from gateway.mailstore.interface import (
    PERMANENT_FLAGS, RECENT, SYSTEM_FLAGS, Changes, FlagUpdate, FolderRef, FolderSnapshot, MailStore, flags_sequence,
)


@dataclass(frozen=True)
class Message:
    """One message of the view: its sequence number and UID."""

    number: int
    uid: int


@dataclass
class SelectedMailbox:
    """The session's view of one folder; see the module docstring."""

    ref: FolderRef
    name: str                      # as the client named it (shared-namespace path included)
    read_only: bool
    uidvalidity: int
    # Ascending UIDs; at first the store's shared index array (never modified), copied by ``_own_uids``
    # before this view first diverges from it: 100 sessions on one folder hold one array.
    uids: Sequence[int]
    modseq: int
    recent: set[int] = field(default_factory=set)
    condstore: bool = False
    pending_expunges: set[int] = field(default_factory=set)
    # UID -> MODSEQ of flag changes this session already reported (its own STOREs).
    reported: dict[int, int] = field(default_factory=dict)
    # Keywords this session has announced in * FLAGS (RFC 3501 7.2.6).
    keywords: set[str] = field(default_factory=set)
    _owns_uids: bool = False

    @classmethod
    def from_snapshot(cls, snapshot: FolderSnapshot, name: str, *, read_only: bool,
                      condstore: bool) -> SelectedMailbox:
        return cls(ref=snapshot.ref, name=name, read_only=read_only or snapshot.read_only,
                   uidvalidity=snapshot.uidvalidity, uids=snapshot.uids, modseq=snapshot.highestmodseq,
                   recent=set(snapshot.recent_uids), condstore=condstore,
                   keywords={flag for flag in snapshot.flags if not flag.startswith("\\")})

    # --- sequence numbers and UIDs ---------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def _own_uids(self) -> array[int]:
        """This view's own copy of its UIDs, made the first time it changes (copy on write)."""
        if not self._owns_uids or not isinstance(self.uids, array):
            self.uids = array("I", self.uids)
            self._owns_uids = True
        assert isinstance(self.uids, array)
        return self.uids

    def number_of(self, uid: int) -> int | None:
        """RFC 3501 2.3.1.2: the sequence number of ``uid`` in this view, None if absent."""
        index = bisect.bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return None

    def by_numbers(self, sequence: SequenceSet) -> list[Message]:
        """Messages named by sequence numbers; RFC 3501 9 seq-number: a number beyond EXISTS is BAD."""
        self._check_numbers(sequence)
        return [Message(n, self.uids[n - 1]) for n in sequence.iter_values(self.exists) if n <= self.exists]

    def _check_numbers(self, sequence: SequenceSet) -> None:
        for item in sequence.ranges:
            # "n:*" stays valid when messages vanished (or on an empty mailbox); a number alone may not.
            if item.start is not None and item.end is not None and max(item.start, item.end) > self.exists:
                raise BadCommand("Invalid message sequence number")

    def by_uids(self, sequence: SequenceSet) -> list[Message]:
        """Messages named by UIDs (RFC 3501 6.4.8): absent UIDs are ignored, "*" is the highest UID."""
        if not self.uids:
            return []
        intervals = sequence.resolve(self.uids[-1])
        found: list[Message] = []
        for low, high in intervals:
            start = bisect.bisect_left(self.uids, low)
            stop = bisect.bisect_right(self.uids, high)
            found.extend(Message(index + 1, self.uids[index]) for index in range(start, stop))
        return found

    def resolve(self, sequence: SequenceSet, *, uid: bool) -> list[Message]:
        return self.by_uids(sequence) if uid else self.by_numbers(sequence)

    def uid_ranges(self, sequence: SequenceSet, *, uid: bool) -> tuple[list[tuple[int, int]], int]:
        """The UID ranges a sequence set names in this view, and how many of its messages it names, without an
        object per message (FETCH 1:*); same rules as ``by_numbers`` / ``by_uids``."""
        if not uid:
            self._check_numbers(sequence)
        if not self.uids:
            return [], 0
        ranges: list[tuple[int, int]] = []
        if uid:
            for low, high in sequence.resolve(self.uids[-1]):
                start, stop = bisect.bisect_left(self.uids, low), bisect.bisect_right(self.uids, high)
                if start < stop:
                    ranges.append((self.uids[start], self.uids[stop - 1]))
        else:
            for low, high in sequence.resolve(self.exists):
                low, high = max(low, 1), min(high, self.exists)
                if low <= high:
                    ranges.append((self.uids[low - 1], self.uids[high - 1]))
        ranges = merged_ranges(ranges)
        count = sum(bisect.bisect_right(self.uids, high) - bisect.bisect_left(self.uids, low) for low, high in ranges)
        return ranges, count

    def visible(self, uids: Iterable[int]) -> list[Message]:
        """The messages of ``uids`` this view holds, in sequence order."""
        numbers, shown = self.visible_numbers(uids)
        return [Message(number, uid) for number, uid in zip(numbers, shown, strict=True)]

    def visible_numbers(self, uids: Iterable[int]) -> tuple[list[int], list[int]]:
        """The sequence numbers and UIDs of the ``uids`` this view holds, in sequence order, without an object
        per message (SEARCH answers 10,000 of them): the view's UIDs ascend, so do the numbers, and each
        bisection starts where the previous one ended."""
        view, size = self.uids, len(self.uids)
        numbers: list[int] = []
        shown: list[int] = []
        low = 0
        for uid in sorted(uids):
            low = bisect.bisect_left(view, uid, low)
            if low < size and view[low] == uid:
                numbers.append(low + 1)
                shown.append(uid)
        return numbers, shown

    def is_expunged(self, uid: int) -> bool:
        return uid in self.pending_expunges

    # --- flags as this session shows them ----------------------------------------------

    def flags_for(self, uid: int, stored: Iterable[str]) -> list[str]:
        """Stored flags plus the session's ``\\Recent`` (RFC 3501 2.3.2)."""
        shown = list(flags_sequence(stored))
        if uid in self.recent:
            shown.append(RECENT)
        return shown

    def flags_response(self) -> bytes:
        """RFC 3501 7.2.6 ``* FLAGS``: the system flags and every keyword announced so far."""
        return response.flags((*SYSTEM_FLAGS, *sorted(self.keywords)))

    def permanent_flags_response(self) -> bytes:
        """RFC 3501 7.1 ``* OK [PERMANENTFLAGS (...)]``: none on a read-only view; ``\\*``: keywords may be made."""
        permanent = () if self.read_only else (*PERMANENT_FLAGS[:-1], *sorted(self.keywords), PERMANENT_FLAGS[-1])
        return response.untagged_ok("Permanent flags", f"PERMANENTFLAGS {response.flag_list(permanent).decode()}")

    def announce(self, flags: Iterable[str]) -> list[bytes]:
        """RFC 3501 7.2.6: before a FETCH shows a keyword the client has not been told of, an updated
        ``* FLAGS`` (and ``PERMANENTFLAGS``) announces it, as Dovecot does; nothing when all are known."""
        new = {flag for flag in flags if not flag.startswith("\\")} - self.keywords
        if not new:
            return []
        self.keywords |= new
        return [self.flags_response(), self.permanent_flags_response()]

    def note_reported(self, uid: int, modseq: int) -> None:
        """This session already sent ``uid``'s flags as of ``modseq`` (a STORE reply).  Only changes above
        ``self.modseq`` are ever looked up (``updates`` asks for those), so older ones are not kept."""
        if modseq > self.modseq:
            self.reported[uid] = max(modseq, self.reported.get(uid, 0))

    # --- changes made in this session ------------------------------------------------

    def remove(self, uids: Iterable[int]) -> list[bytes]:
        """Drop ``uids`` now, answering ``* n EXPUNGE`` for each (EXPUNGE, MOVE, CLOSE)."""
        lines: list[bytes] = []
        for uid in sorted(set(uids)):
            number = self.number_of(uid)
            self.pending_expunges.discard(uid)
            if number is None:
                continue
            del self._own_uids()[number - 1]
            self.recent.discard(uid)
            self.reported.pop(uid, None)
            # RFC 3501 7.4.1: each EXPUNGE renumbers the messages after it at once.
            lines.append(response.expunge(number))
        return lines

    # --- changes made elsewhere ------------------------------------------------------

    async def updates(self, store: MailStore, *, allow_expunge: bool, known: Changes | None = None) -> list[bytes]:
        """Untagged responses for everything that changed since the last call (see module docstring); ``known``:
        those changes as the store answered them from memory (``MailStore.changes_known``), else it is asked."""
        changes = known if known is not None else await store.changes_since(self.ref, self.modseq)
        lines: list[bytes] = []
        expunged = set(changes.expunged)
        self.pending_expunges.update(uid for uid in expunged if self.number_of(uid) is not None)
        if allow_expunge and self.pending_expunges:
            lines += self.remove(list(self.pending_expunges))
        highest = self.uids[-1] if self.uids else 0
        fresh = sorted(update.uid for update in changes.updated
                       if update.uid > highest and update.uid not in expunged)
        lines += self._flag_changes(change for change in changes.updated if change.uid <= highest
                                    and self.number_of(change.uid) is not None)
        if fresh:
            lines += await self._announce(store, fresh)
        self._share(changes)
        if changes.highestmodseq > self.modseq:
            self.modseq = changes.highestmodseq
            # RFC 7162: later changes_since calls start above this MODSEQ; older marks are never consulted.
            self.reported = {uid: mark for uid, mark in self.reported.items() if mark > self.modseq}
        return lines

    def _share(self, changes: Changes) -> None:
        """Hold the store's shared UID array again once this view equals it (after catching up on new
        messages and expunges): one array for all the sessions on the folder, not a copy each."""
        shared = changes.uids
        if (self._owns_uids and shared is not None and not self.pending_expunges and isinstance(shared, array)
                and shared == self.uids):
            self.uids = shared
            self._owns_uids = False

    def _flag_changes(self, changes: Iterable[FlagUpdate]) -> list[bytes]:
        lines: list[bytes] = []
        for change in sorted(changes, key=lambda item: item.uid):
            if self.reported.get(change.uid, 0) >= change.modseq or change.uid in self.pending_expunges:
                continue
            number = self.number_of(change.uid)
            if number is None:
                continue
            self.note_reported(change.uid, change.modseq)
            lines.append(self.fetch_flags_line(number, change.uid, change.flags, change.modseq))
        return lines

    def fetch_flags_line(self, number: int, uid: int, stored: Iterable[str], modseq: int) -> bytes:
        """``* n FETCH (UID u FLAGS (...) [MODSEQ (m)])``: UID first (Thunderbird, RFC 3501 7.4.2), preceded
        by ``* FLAGS`` when it shows a new keyword (``announce``)."""
        stored = tuple(stored)
        announcement = b"".join(self.announce(stored))
        items: list[tuple[str, bytes]] = [("UID", str(uid).encode()),
                                          ("FLAGS", response.flag_list(self.flags_for(uid, stored)))]
        if self.condstore:
            items.append(("MODSEQ", b"(%d)" % modseq))   # RFC 7162 3.1.4.1
        return announcement + response.fetch(number, items)

    async def _announce(self, store: MailStore, fresh: Sequence[int]) -> list[bytes]:
        """RFC 3501 7.3.1 EXISTS and 7.3.2 RECENT for messages new to this session."""
        self._own_uids().extend(fresh)
        if not self.read_only:
            wanted = set(fresh)
            self.recent.update(uid for uid in await store.claim_recent(self.ref, among=wanted) if uid in wanted)
        return [response.exists(self.exists), response.recent(len(self.recent))]

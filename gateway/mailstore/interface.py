"""What the IMAP session and the webmail see of the mail store: values and one abstract class, no SQL.

Folders are addressed by a ``FolderRef``: the hosted mailbox id, the folder name
(UTF-8, hierarchy separator "/", INBOX case-insensitive per RFC 3501 5.1) and,
for a selected folder, the UIDVALIDITY the session saw, so a folder deleted and
re-created behind its back is refused instead of silently mixing UIDs.

Message sets are always UIDs: a session maps sequence numbers to UIDs through
its snapshot and resolves "*" itself (RFC 3501 6.4.8).
"""

from __future__ import annotations

import datetime as dt
import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from gateway.mailstore.append_rows import AfterInsert, BeforeInsert
    from gateway.mailstore.headers import CachedHeaders

SEPARATOR = "/"
INBOX = "INBOX"

# RFC 3501 2.3.2 system flags (\Recent is session state, never stored).
SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = "\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"
RECENT = "\\Recent"
SYSTEM_FLAGS = (SEEN, ANSWERED, FLAGGED, DELETED, DRAFT)
# RFC 3501 7.2.6 / 7.1 PERMANENTFLAGS: "\*" says clients may create keywords.
PERMANENT_FLAGS = (*SYSTEM_FLAGS, "\\*")

# RFC 6154 2: the special-use attributes a provisioned mailbox carries.
SPECIAL_USES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")

MessageSource = bytes | Path | BinaryIO


@dataclass(frozen=True)
class UidSet:
    """Inclusive UID ranges, e.g. ``UidSet.of((1, 5), 9)``; "*" is resolved by the caller."""

    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, *items: int | tuple[int, int]) -> UidSet:
        ranges = tuple((item, item) if isinstance(item, int) else (min(item), max(item)) for item in items)
        return cls(ranges)

    @classmethod
    def from_uids(cls, uids: Iterable[int]) -> UidSet:
        ranges: list[tuple[int, int]] = []
        for uid in sorted(set(uids)):
            if ranges and ranges[-1][1] == uid - 1:
                ranges[-1] = (ranges[-1][0], uid)
            else:
                ranges.append((uid, uid))
        return cls(tuple(ranges))

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and any(low <= uid <= high for low, high in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)


@dataclass(frozen=True)
class FolderRef:
    mailbox_id: int
    name: str
    uidvalidity: int | None = None  # set by a selected session: checked on every call


@dataclass(frozen=True)
class FolderInfo:
    """One LIST line: RFC 3501 7.2.2 attributes, RFC 6154 special use, RFC 5258 \\Subscribed."""

    name: str
    special_use: str | None
    subscribed: bool
    has_children: bool
    uidvalidity: int


@dataclass(frozen=True)
class FolderStatus:
    """RFC 3501 6.3.10 STATUS items, HIGHESTMODSEQ (RFC 7162 3.1.2) and SIZE (RFC 8438)."""

    name: str
    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    highestmodseq: int
    size: int


@dataclass(frozen=True)
class FolderSnapshot:
    """What SELECT/EXAMINE reports (RFC 3501 6.3.1), plus the UID list the session keeps."""

    ref: FolderRef
    special_use: str | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: Sequence[int]            # ascending; may be an array shared with other sessions: never modify it
    recent_uids: frozenset[int]
    unseen: int
    first_unseen: int | None  # a sequence number (RFC 3501 7.1 [UNSEEN n]), None when all are seen
    flags: tuple[str, ...]  # FLAGS: system flags and the keywords in use
    permanent_flags: tuple[str, ...]
    read_only: bool

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def recent(self) -> int:
        return len(self.recent_uids)


@dataclass(frozen=True)
class MessageMeta:
    """Everything FETCH needs without opening the body."""

    uid: int
    modseq: int
    flags: frozenset[str]
    internaldate: dt.datetime
    size: int
    envelope: dict[str, Any]
    message_id: str | None
    subject: str | None
    from_addr: str | None
    to_addr: str | None
    sent_date: dt.datetime | None
    # The ENVELOPE as rendered at delivery (RFC 3501 7.4.2, without UTF8=ACCEPT), when the store keeps it:
    # then ``envelope`` is empty.
    envelope_wire: bytes | None = None


@dataclass(frozen=True)
class FlagListing:
    """UID, MODSEQ and flags of some messages in UID order, as columns (no object per message):
    ``flag_sets[flag_ids[i]]`` are the flags of ``uids[i]``."""

    uids: Sequence[int]
    modseqs: Sequence[int]
    flag_ids: Sequence[int]
    flag_sets: Sequence[frozenset[str]]

    def __len__(self) -> int:
        return len(self.uids)


@dataclass(frozen=True)
class FlagUpdate:
    """A message whose flags changed: an untagged FETCH (FLAGS ...) (MODSEQ (...)) for other sessions."""

    uid: int
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True)
class AppendResult:
    """RFC 4315 3: APPENDUID uidvalidity uid."""

    uidvalidity: int
    uid: int
    modseq: int


@dataclass(frozen=True)
class AddedMessage:
    """What ``MailStore.add_message`` did: the message's UIDs, or the earlier delivery's for a known key."""

    result: AppendResult
    duplicate: bool  # the delivery key had already reached this mailbox: nothing was written


class StoreMode(enum.Enum):
    """RFC 3501 6.4.6: FLAGS, +FLAGS, -FLAGS."""

    REPLACE = "replace"
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class StoreResult:
    updated: tuple[FlagUpdate, ...]
    # RFC 7162 3.1.3: UIDs whose MODSEQ was above UNCHANGEDSINCE, left untouched ([MODIFIED ...]).
    conflicts: tuple[int, ...]
    highestmodseq: int
    # The other messages of the set, whose flags the command left as they were (RFC 3501 6.4.6: their FETCH too).
    unchanged: tuple[FlagUpdate, ...] = ()


@dataclass(frozen=True)
class CopyResult:
    """RFC 4315 3: COPYUID uidvalidity source-uids dest-uids, in matching order."""

    uidvalidity: int
    source_uids: tuple[int, ...]
    dest_uids: tuple[int, ...]


@dataclass(frozen=True)
class ExpungeResult:
    uids: tuple[int, ...]
    highestmodseq: int


@dataclass(frozen=True)
class MoveResult:
    """RFC 6851 4.3: COPYUID for the destination, then EXPUNGE of the source UIDs."""

    copy: CopyResult
    expunged: ExpungeResult


@dataclass(frozen=True)
class Changes:
    """Changes after a MODSEQ (RFC 7162 3.1.4.1 CHANGEDSINCE, 3.2.5.2 VANISHED (EARLIER))."""

    highestmodseq: int
    updated: tuple[FlagUpdate, ...]
    expunged: tuple[int, ...]  # new messages appear in ``updated`` too: their MODSEQ is above the mark
    # The folder's UIDs as of ``highestmodseq`` when the store keeps them shared (never modify): a session
    # whose view has caught up holds this one array instead of its own copy. None: not offered.
    uids: Sequence[int] | None = None


@dataclass(frozen=True)
class QuotaUsage:
    """RFC 9208 5: STORAGE in KiB and MESSAGE count, with their limits (None: unlimited)."""

    storage_kib: int
    storage_limit_kib: int | None
    messages: int
    message_limit: int | None


# --- SEARCH keys (RFC 3501 6.4.4), as a small tree the session builds from the wire grammar.

class SearchKey:
    """Base of search keys; leaves are the dataclasses below, combined with All/AnyOf/Not."""


@dataclass(frozen=True)
class All(SearchKey):
    """Every key must match (the implicit AND of a SEARCH program). ``All(())`` matches all."""

    keys: tuple[SearchKey, ...] = ()


@dataclass(frozen=True)
class AnyOf(SearchKey):
    keys: tuple[SearchKey, ...]  # RFC 3501 OR (binary on the wire, n-ary here)


@dataclass(frozen=True)
class Not(SearchKey):
    key: SearchKey


@dataclass(frozen=True)
class HasFlag(SearchKey):
    flag: str  # a system flag or keyword: SEEN, UNSEEN = Not(HasFlag(SEEN)), KEYWORD x...


@dataclass(frozen=True)
class Recent(SearchKey):
    """RECENT/NEW: needs the session's recent set, hence passed to ``search``."""


@dataclass(frozen=True)
class UidIn(SearchKey):
    uids: UidSet


class DateField(enum.Enum):
    INTERNAL = "internal"  # BEFORE, ON, SINCE
    SENT = "sent"  # SENTBEFORE, SENTON, SENTSINCE (the Date: header)


@dataclass(frozen=True)
class DateBefore(SearchKey):
    field: DateField
    date: dt.date


@dataclass(frozen=True)
class DateOn(SearchKey):
    field: DateField
    date: dt.date


@dataclass(frozen=True)
class DateSince(SearchKey):
    field: DateField
    date: dt.date


@dataclass(frozen=True)
class Larger(SearchKey):
    size: int


@dataclass(frozen=True)
class Smaller(SearchKey):
    size: int


@dataclass(frozen=True)
class Header(SearchKey):
    """HEADER name value; FROM/TO/CC/SUBJECT are Header("from", ...), answered from cached columns."""

    name: str
    value: str


@dataclass(frozen=True)
class BodyContains(SearchKey):
    value: str
    include_headers: bool = False  # TEXT (headers and body) versus BODY


@dataclass(frozen=True)
class ModSeqAtLeast(SearchKey):
    modseq: int  # RFC 7162 3.1.5 SEARCH MODSEQ


class MessageBody(ABC):
    """An open message: its size and byte ranges (BODY[]<partial>, RFC 3501 6.4.5)."""

    size: int

    @abstractmethod
    async def read(self, offset: int = 0, length: int | None = None) -> bytes: ...

    @abstractmethod
    def chunks(self, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> MessageBody:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


class MailStore(ABC):
    """Folders and messages of hosted mailboxes. Every method is one short transaction."""

    # -- folders
    @abstractmethod
    async def list_folders(self, mailbox_id: int) -> list[FolderInfo]: ...

    @abstractmethod
    async def list_subscriptions(self, mailbox_id: int) -> list[str]:
        """Subscribed names, including names whose folder no longer exists (RFC 3501 6.3.6)."""

    @abstractmethod
    async def create_folder(self, mailbox_id: int, name: str, *, special_use: str | None = None,
                            subscribe: bool = False) -> FolderInfo:
        """RFC 3501 6.3.3; missing parents are created too (no \\Noselect holes). RFC 6154 5 CREATE-SPECIAL-USE."""

    @abstractmethod
    async def delete_folder(self, mailbox_id: int, name: str) -> None: ...

    @abstractmethod
    async def rename_folder(self, mailbox_id: int, old: str, new: str) -> None:
        """RFC 3501 6.3.5: children follow; renaming INBOX moves its messages and leaves INBOX empty."""

    @abstractmethod
    async def subscribe(self, mailbox_id: int, name: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, mailbox_id: int, name: str) -> None: ...

    @abstractmethod
    async def status(self, folder: FolderRef) -> FolderStatus: ...

    async def folders_and_subscriptions(self, mailbox_id: int) -> tuple[list[FolderInfo], list[str]]:
        """``list_folders`` and ``list_subscriptions`` together (LIST: one read where the store can)."""
        return await self.list_folders(mailbox_id), await self.list_subscriptions(mailbox_id)

    @abstractmethod
    async def select(self, folder: FolderRef, *, read_only: bool = False) -> FolderSnapshot:
        """SELECT/EXAMINE. SELECT claims the \\Recent messages for this session only (RFC 3501 2.3.2)."""

    @abstractmethod
    async def claim_recent(self, folder: FolderRef, *, among: Collection[int] = ()) -> frozenset[int]:
        """Claim \\Recent on messages that arrived since: call when new messages are announced. ``among``: the
        new UIDs the caller will keep (a store that knows them all claimed already may claim nothing)."""

    # -- messages
    @abstractmethod
    async def fetch(self, folder: FolderRef, uids: UidSet, *, changed_since: int | None = None) -> list[MessageMeta]: ...

    async def fetch_meta(self, folder: FolderRef, uids: UidSet, *, changed_since: int | None = None,
                         envelope: bool = True, headers: bool = True) -> list[MessageMeta]:
        """``fetch`` told what is wanted: without ``envelope`` the ENVELOPE is ``{}``, without ``headers`` the
        cached header fields (message_id, subject, from_addr, to_addr) are None; flags, dates, size always."""
        return await self.fetch(folder, uids, changed_since=changed_since)

    async def fetch_envelopes(self, folder: FolderRef, uids: UidSet) -> dict[int, bytes | dict[str, Any]]:
        """The ENVELOPE of each of these messages that exists, by UID: as rendered at delivery (RFC 3501 7.4.2,
        without UTF8=ACCEPT) when the store keeps it so, else the cached structure (empty: not cached)."""
        metas = await self.fetch_meta(folder, uids, headers=False)
        return {meta.uid: meta.envelope if meta.envelope_wire is None else meta.envelope_wire for meta in metas}

    async def fetch_flags(self, folder: FolderRef, uids: UidSet, *,
                          changed_since: int | None = None) -> FlagListing:
        """UID, MODSEQ and flags only (FETCH (UID FLAGS MODSEQ)), as compact columns."""
        metas = await self.fetch(folder, uids, changed_since=changed_since)
        sets: dict[frozenset[str], int] = {}
        flag_ids = [sets.setdefault(meta.flags, len(sets)) for meta in metas]
        return FlagListing([meta.uid for meta in metas], [meta.modseq for meta in metas], flag_ids, list(sets))

    @abstractmethod
    async def open_message(self, folder: FolderRef, uid: int) -> MessageBody: ...

    async def message_bytes(self, folder: FolderRef, uid: int) -> bytes:
        """A message's whole stored octets (BODY[], RFC 3501 6.4.5); MessageNotFound as ``open_message``."""
        async with await self.open_message(folder, uid) as body:
            return await body.read()

    @abstractmethod
    async def append(self, folder: FolderRef, message: MessageSource, *, flags: Iterable[str] = (),
                     internaldate: dt.datetime | None = None) -> AppendResult: ...

    @abstractmethod
    async def add_message(self, folder: FolderRef, message: MessageSource, *, flags: Iterable[str] = (),
                          internaldate: dt.datetime | None = None, delivery_key: str | None = None,
                          headers: CachedHeaders | None = None, after: AfterInsert | None = None,
                          before: BeforeInsert | None = None, filing_due: bool = True) -> AddedMessage:
        """APPEND and local delivery (``gateway.mailstore.delivery.LocalDelivery``), idempotent per
        ``delivery_key``: a key that reached the mailbox before answers its message, ``duplicate``.
        ``headers``: a parse the caller made already (``parse_headers``); ``after`` / ``before``: the caller's
        rows and check in the delivery's database transaction (a store without one refuses them);
        ``filing_due``: False when the delivery's filing job ended at delivery (the filing worker is not woken)."""

    @property
    def shares_commits(self) -> bool:
        """Concurrent deliveries share one transaction, committed in arrival order (SQLite's group commit):
        the delivery worker then hands them over together."""
        return False

    @abstractmethod
    async def store_flags(self, folder: FolderRef, uids: UidSet, mode: StoreMode, flags: Iterable[str], *,
                          unchanged_since: int | None = None) -> StoreResult: ...

    @abstractmethod
    async def copy(self, folder: FolderRef, uids: UidSet, destination: FolderRef) -> CopyResult: ...

    @abstractmethod
    async def move(self, folder: FolderRef, uids: UidSet, destination: FolderRef) -> MoveResult: ...

    @abstractmethod
    async def expunge(self, folder: FolderRef, uids: UidSet | None = None) -> ExpungeResult:
        """Remove \\Deleted messages (RFC 3501 6.4.3), only those in ``uids`` for UID EXPUNGE (RFC 4315 2.1)."""

    @abstractmethod
    async def changes_since(self, folder: FolderRef, modseq: int) -> Changes: ...

    def changes_known(self, folder: FolderRef, modseq: int) -> Changes | None:
        """``changes_since`` answered from memory, without asking the database, when this process's change
        notifications account for every change made since the store last looked (``ChangeHub.sees_every_change``:
        one node); None when only ``changes_since`` can tell. The caller bounds how long it trusts this (a writer
        in another process publishes nothing here): NOOP and a periodic look still call ``changes_since``."""
        return None

    def flags_known(self, folder: FolderRef, uids: UidSet, *, changed_since: int | None = None) -> FlagListing | None:
        """``fetch_flags`` answered from memory, on the same terms as ``changes_known``; None: ask the store."""
        return None

    @abstractmethod
    async def search(self, folder: FolderRef, key: SearchKey, *,
                     recent_uids: frozenset[int] = frozenset()) -> list[int]:
        """Matching UIDs in ascending order; SQL for metadata keys, a body scan only where needed."""

    @abstractmethod
    async def quota(self, mailbox_id: int) -> QuotaUsage: ...

    # -- in-memory folder indexes (a store without them has nothing to warm)
    def indexed_folders(self) -> list[int]:
        """Ids of the folders whose index is held in memory, most recently used first."""
        return []

    async def largest_folders(self, limit: int) -> list[int]:
        """Ids of the ``limit`` folders holding the most messages, the largest first (whose index costs the most
        to load at a first SELECT)."""
        return []

    async def warm_indexes(self, folder_ids: Sequence[int], max_messages: int) -> tuple[int, int]:
        """Load the indexes of ``folder_ids`` (most wanted first) before anyone asks, ``max_messages`` in all at
        most; (folders, messages) loaded."""
        return 0, 0


def flags_sequence(flags: Iterable[str]) -> Sequence[str]:
    """Flags in the order IMAP clients expect: system flags first, then keywords sorted."""
    unique = set(flags)
    return [flag for flag in SYSTEM_FLAGS if flag in unique] + sorted(unique.difference(SYSTEM_FLAGS))

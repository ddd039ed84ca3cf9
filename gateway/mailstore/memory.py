"""The ``MailStore`` interface in memory, as pymap's ``pymap.backend.dict`` is: for protocol tests.

It keeps the same invariants as ``sql.py`` (UIDs strictly ascending and never
reused, one new MODSEQ per changing command shared by the messages it changed,
expunge tombstones for CONDSTORE, UIDVALIDITY above any the mailbox handed out,
``\\Recent`` claimed by one session) and publishes the same change events, so
the IMAP session cannot tell the two apart.  Nothing is durable and nothing is
encrypted: it never holds real mail.  Every method runs without awaiting
in the middle of a change, so on one event loop each is atomic, as a
transaction is.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.mailstore import flags as flagcodec
from gateway.mailstore import names
from gateway.mailstore.errors import (
    CannotDeleteInbox,
    FolderExists,
    FolderHasChildren,
    FolderNotFound,
    InvalidFolderName,
    MessageNotFound,
    QuotaExceeded,
    UidValidityChanged,
)
from gateway.mailstore.headers import MAX_HEADER_BYTES, CachedHeaders, header_section, parse_headers
from gateway.mailstore.interface import (
    INBOX,
    PERMANENT_FLAGS,
    SPECIAL_USES,
    SYSTEM_FLAGS,
    AddedMessage,
    AppendResult,
    Changes,
    CopyResult,
    ExpungeResult,
    FlagUpdate,
    FolderInfo,
    FolderRef,
    FolderSnapshot,
    FolderStatus,
    MailStore,
    MessageBody,
    MessageMeta,
    MessageSource,
    MoveResult,
    QuotaUsage,
    SearchKey,
    StoreMode,
    StoreResult,
    UidSet,
)
from gateway.mailstore.notify import ChangeEvent, ChangeHub, ChangeKind
from gateway.mailstore.search import Evaluator
from gateway.mailstore.append_rows import AfterInsert, BeforeInsert

SEEN_BIT = flagcodec.SYSTEM_BITS["\\Seen"]
DELETED_BIT = flagcodec.SYSTEM_BITS["\\Deleted"]


@dataclass
class _Message:
    """One message: the columns ``sql.Message`` has (the search evaluator reads them by name) and its octets."""

    uid: int
    modseq: int
    system_flags: int
    keywords: str
    internaldate: dt.datetime
    data: bytes
    message_id: str | None
    subject: str | None
    from_addr: str | None
    to_addr: str | None
    cc_addr: str | None
    sent_date: dt.datetime | None
    envelope: dict[str, Any]

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def flags(self) -> frozenset[str]:
        return flagcodec.decode(self.system_flags, self.keywords)

    def copy(self, uid: int, modseq: int) -> _Message:
        return _Message(uid, modseq, self.system_flags, self.keywords, self.internaldate, self.data, self.message_id,
                        self.subject, self.from_addr, self.to_addr, self.cc_addr, self.sent_date, self.envelope)


@dataclass
class _Folder:
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int = 1
    highestmodseq: int = 1
    recent_uid: int = 0
    keywords: set[str] = field(default_factory=set)
    messages: dict[int, _Message] = field(default_factory=dict)   # by UID, inserted in ascending UID order
    expunged: dict[int, int] = field(default_factory=dict)        # UID -> MODSEQ of its expunge

    def next_modseq(self) -> int:
        self.highestmodseq += 1
        return self.highestmodseq

    def in_set(self, uids: UidSet) -> list[_Message]:
        return [message for uid, message in sorted(self.messages.items()) if uid in uids]

    def remove(self, doomed: list[_Message]) -> ExpungeResult:
        if not doomed:
            return ExpungeResult((), self.highestmodseq)
        modseq = self.next_modseq()
        for message in doomed:
            del self.messages[message.uid]
            self.expunged[message.uid] = modseq
        return ExpungeResult(tuple(message.uid for message in doomed), modseq)


@dataclass
class _Mailbox:
    last_uidvalidity: int = 0
    folders: dict[str, _Folder] = field(default_factory=dict)
    subscriptions: set[str] = field(default_factory=set)
    deliveries: dict[str, AppendResult] = field(default_factory=dict)

    def new_uidvalidity(self) -> int:
        # RFC 3501 2.3.1.1: must grow if a name is reused.
        self.last_uidvalidity = max(int(time.time()), self.last_uidvalidity + 1)
        return self.last_uidvalidity

    def used(self) -> int:
        return sum(message.size for folder in self.folders.values() for message in folder.messages.values())


class _Body(MessageBody):
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    async def read(self, offset: int = 0, length: int | None = None) -> bytes:
        return self._data[offset:] if length is None else self._data[offset:offset + length]

    async def chunks(self, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        data = await self.read(offset, length)
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]

    async def close(self) -> None:
        return None


def _octets(source: MessageSource) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, Path):
        return source.read_bytes()
    return source.read()


class MemoryMailStore(MailStore):
    """Mailboxes in dictionaries; ``quota_bytes`` (0: unlimited) applies to every mailbox."""

    def __init__(self, hub: ChangeHub | None = None, *, quota_bytes: int = 0) -> None:
        self.hub = hub or ChangeHub()
        self.quota_bytes = quota_bytes
        self._mailboxes: dict[int, _Mailbox] = {}

    # ------------------------------------------------------------------ plumbing

    def _mailbox(self, mailbox_id: int) -> _Mailbox:
        return self._mailboxes.setdefault(mailbox_id, _Mailbox())

    def _folder(self, ref: FolderRef) -> _Folder:
        folder = self._mailbox(ref.mailbox_id).folders.get(names.normalise(ref.name))
        if folder is None:
            raise FolderNotFound(f"no folder {ref.name!r}")
        if ref.uidvalidity is not None and folder.uidvalidity != ref.uidvalidity:
            raise UidValidityChanged(f"folder {ref.name!r} was re-created")
        return folder

    def _publish(self, mailbox_id: int, folder: str | None, kind: ChangeKind, modseq: int = 0, *,
                 delivered: bool = False) -> None:
        self.hub.publish(ChangeEvent(mailbox_id, folder, kind, modseq, delivered))

    def _check_quota(self, mailbox_id: int, adding: int) -> None:
        used = self._mailbox(mailbox_id).used()
        if self.quota_bytes and used + adding > self.quota_bytes:
            raise QuotaExceeded(f"mailbox over quota ({used + adding} > {self.quota_bytes} octets)")

    def _new_folder(self, mailbox: _Mailbox, name: str, special_use: str | None, subscribe: bool) -> _Folder:
        folder = mailbox.folders[name] = _Folder(name, special_use, mailbox.new_uidvalidity())
        if subscribe:
            mailbox.subscriptions.add(name)
        return folder

    # ------------------------------------------------------------------ folders

    async def list_folders(self, mailbox_id: int) -> list[FolderInfo]:
        mailbox = self._mailbox(mailbox_id)
        all_names = sorted(mailbox.folders)
        return [FolderInfo(name, mailbox.folders[name].special_use, name in mailbox.subscriptions,
                           any(names.is_inside(other, name) for other in all_names),
                           mailbox.folders[name].uidvalidity) for name in all_names]

    async def list_subscriptions(self, mailbox_id: int) -> list[str]:
        return sorted(self._mailbox(mailbox_id).subscriptions)

    async def create_folder(self, mailbox_id: int, name: str, *, special_use: str | None = None,
                            subscribe: bool = False) -> FolderInfo:
        name = names.new_folder_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise InvalidFolderName(f"unknown special use {special_use}")  # RFC 6154 3: NO [USEATTR]
        mailbox = self._mailbox(mailbox_id)
        if name in mailbox.folders:
            raise FolderExists(f"folder {name!r} already exists")
        for parent in names.parents(name):
            if parent not in mailbox.folders:
                self._new_folder(mailbox, parent, None, subscribe)
        folder = self._new_folder(mailbox, name, special_use, subscribe)
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)
        return FolderInfo(name, special_use, subscribe, False, folder.uidvalidity)

    async def delete_folder(self, mailbox_id: int, name: str) -> None:
        name = names.normalise(name)
        if name == INBOX:
            raise CannotDeleteInbox("INBOX cannot be deleted")
        mailbox = self._mailbox(mailbox_id)
        self._folder(FolderRef(mailbox_id, name))
        if any(names.is_inside(other, name) for other in mailbox.folders):
            raise FolderHasChildren(f"folder {name!r} has subfolders: delete or move them first")
        del mailbox.folders[name]
        self._publish(mailbox_id, name, ChangeKind.FOLDERS)

    async def rename_folder(self, mailbox_id: int, old: str, new: str) -> None:
        """RFC 3501 6.3.5, as ``SqlMailStore.rename_folder``."""
        old, new = names.normalise(old), names.new_folder_name(new)
        if new == INBOX or names.is_inside(new, old) or old == new:
            raise InvalidFolderName(f"cannot rename {old!r} to {new!r}")
        mailbox = self._mailbox(mailbox_id)
        folders = mailbox.folders
        if old not in folders:
            raise FolderNotFound(f"no folder {old!r}")
        if new in folders:
            raise FolderExists(f"folder {new!r} already exists")
        moving = [] if old == INBOX else [name for name in folders if name == old or names.is_inside(name, old)]
        targets = {name: new + name[len(old):] for name in moving}
        clash = [target for target in targets.values() if target in folders]
        if clash:
            raise FolderExists(f"folder {clash[0]!r} already exists")
        for parent in names.parents(new):
            if parent not in folders:
                self._new_folder(mailbox, parent, None, False)
        if old == INBOX:
            self._rename_inbox(mailbox, new)
        else:
            for name in moving:
                folder = folders.pop(name)
                folder.name = targets[name]
                folders[folder.name] = folder
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)
        self._publish(mailbox_id, old, ChangeKind.EXPUNGE)

    def _rename_inbox(self, mailbox: _Mailbox, new: str) -> None:
        """The messages keep their UIDs in a new folder; INBOX keeps its UIDVALIDITY and records them expunged."""
        inbox = mailbox.folders[INBOX]
        target = self._new_folder(mailbox, new, None, False)
        target.uidnext, target.highestmodseq, target.recent_uid = inbox.uidnext, inbox.highestmodseq, inbox.recent_uid
        target.keywords, target.messages = set(inbox.keywords), inbox.messages
        inbox.messages = {}
        modseq = inbox.next_modseq()
        inbox.expunged.update(dict.fromkeys(target.messages, modseq))

    async def subscribe(self, mailbox_id: int, name: str) -> None:
        self._mailbox(mailbox_id).subscriptions.add(names.normalise(name))
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)

    async def unsubscribe(self, mailbox_id: int, name: str) -> None:
        self._mailbox(mailbox_id).subscriptions.discard(names.normalise(name))
        self._publish(mailbox_id, None, ChangeKind.FOLDERS)

    async def status(self, folder: FolderRef) -> FolderStatus:
        row = self._folder(folder)
        messages = row.messages.values()
        return FolderStatus(row.name, len(row.messages), sum(1 for uid in row.messages if uid > row.recent_uid),
                            row.uidnext, row.uidvalidity,
                            sum(1 for message in messages if not message.system_flags & SEEN_BIT),
                            row.highestmodseq, sum(message.size for message in messages))

    async def select(self, folder: FolderRef, *, read_only: bool = False) -> FolderSnapshot:
        row = self._folder(folder)
        listing = sorted(row.messages.items())
        if read_only:
            recent = frozenset(uid for uid, _ in listing if uid > row.recent_uid)
        else:
            recent = self._claim(row)
        unseen = [position for position, (_, message) in enumerate(listing, 1)
                  if not message.system_flags & SEEN_BIT]
        keywords = sorted(row.keywords)
        return FolderSnapshot(
            ref=FolderRef(folder.mailbox_id, row.name, row.uidvalidity), special_use=row.special_use,
            uidvalidity=row.uidvalidity, uidnext=row.uidnext, highestmodseq=row.highestmodseq,
            uids=tuple(uid for uid, _ in listing), recent_uids=recent, unseen=len(unseen),
            first_unseen=unseen[0] if unseen else None, flags=(*SYSTEM_FLAGS, *keywords),
            permanent_flags=() if read_only else (*PERMANENT_FLAGS[:-1], *keywords, PERMANENT_FLAGS[-1]),
            read_only=read_only,
        )

    @staticmethod
    def _claim(folder: _Folder) -> frozenset[int]:
        """RFC 3501 2.3.2: \\Recent belongs to the first session that sees a message, and to no other."""
        mark = folder.recent_uid
        folder.recent_uid = folder.uidnext - 1
        return frozenset(uid for uid in folder.messages if uid > mark)

    async def claim_recent(self, folder: FolderRef, *, among: Collection[int] = ()) -> frozenset[int]:
        return self._claim(self._folder(folder))

    # ------------------------------------------------------------------ messages

    async def fetch(self, folder: FolderRef, uids: UidSet, *, changed_since: int | None = None) -> list[MessageMeta]:
        return [MessageMeta(uid=message.uid, modseq=message.modseq, flags=message.flags,
                            internaldate=message.internaldate, size=message.size, envelope=message.envelope,
                            message_id=message.message_id, subject=message.subject, from_addr=message.from_addr,
                            to_addr=message.to_addr, sent_date=message.sent_date)
                for message in self._folder(folder).in_set(uids)
                if changed_since is None or message.modseq > changed_since]   # RFC 7162 3.1.4.1

    async def open_message(self, folder: FolderRef, uid: int) -> MessageBody:
        message = self._folder(folder).messages.get(uid)
        if message is None:
            raise MessageNotFound(f"no message with UID {uid}")
        return _Body(message.data)

    async def append(self, folder: FolderRef, message: MessageSource, *, flags: Iterable[str] = (),
                     internaldate: dt.datetime | None = None) -> AppendResult:
        return (await self.add_message(folder, message, flags=flags, internaldate=internaldate)).result

    async def add_message(self, folder: FolderRef, message: MessageSource, *, flags: Iterable[str] = (),
                          internaldate: dt.datetime | None = None, delivery_key: str | None = None,
                          headers: CachedHeaders | None = None, after: AfterInsert | None = None,
                          before: BeforeInsert | None = None, filing_due: bool = True) -> AddedMessage:
        """APPEND and local delivery (``LocalDelivery``), idempotent per delivery key as ``SqlMailStore``'s.

        ``headers`` (a parse the caller already made) is not needed here. ``after`` and ``before`` (the
        caller's rows and check in the delivery's database transaction) cannot be honoured: there is no
        transaction, so they are refused. ``filing_due`` as ``SqlMailStore``'s.
        """
        if after is not None or before is not None:
            raise TypeError("MemoryMailStore has no database transaction to run `after` or `before` in")
        mailbox = self._mailbox(folder.mailbox_id)
        if delivery_key is not None and delivery_key in mailbox.deliveries:
            return AddedMessage(mailbox.deliveries[delivery_key], duplicate=True)
        target = self._folder(folder)
        data = _octets(message)
        self._check_quota(folder.mailbox_id, len(data))
        headers = parse_headers(header_section(data[:MAX_HEADER_BYTES]))
        bits, keywords = flagcodec.encode(flags)
        uid = target.uidnext
        target.uidnext += 1
        modseq = target.next_modseq()
        target.keywords |= keywords
        target.messages[uid] = _Message(
            uid, modseq, bits, flagcodec.keywords_column(keywords), internaldate or dt.datetime.now(dt.UTC),
            data, headers.message_id, headers.subject, headers.from_addr, headers.to_addr, headers.cc_addr,
            headers.sent_date, headers.envelope)
        result = AppendResult(target.uidvalidity, uid, modseq)
        if delivery_key is not None:
            mailbox.deliveries[delivery_key] = result
        self._publish(folder.mailbox_id, target.name, ChangeKind.EXISTS, modseq,
                      delivered=delivery_key is not None and filing_due)
        return AddedMessage(result, duplicate=False)

    async def store_flags(self, folder: FolderRef, uids: UidSet, mode: StoreMode, flags: Iterable[str], *,
                          unchanged_since: int | None = None) -> StoreResult:
        row = self._folder(folder)
        bits, keywords = flagcodec.encode(flags)
        conflicts: list[int] = []
        unchanged: list[FlagUpdate] = []
        changed: list[tuple[_Message, int, str]] = []
        for message in row.in_set(uids):
            if unchanged_since is not None and message.modseq > unchanged_since:
                conflicts.append(message.uid)     # RFC 7162 3.1.3: [MODIFIED]
                continue
            new_bits, new_keywords = flagcodec.apply(mode, message.system_flags,
                                                     flagcodec.keywords_of(message.keywords), bits, keywords)
            column = flagcodec.keywords_column(new_keywords)
            if new_bits == message.system_flags and column == message.keywords:
                unchanged.append(FlagUpdate(message.uid, message.flags, message.modseq))
            else:
                changed.append((message, new_bits, column))
        if not changed:
            return StoreResult((), tuple(conflicts), row.highestmodseq, tuple(unchanged))
        modseq = row.next_modseq()
        for message, new_bits, column in changed:
            message.system_flags, message.keywords, message.modseq = new_bits, column, modseq
        row.keywords |= keywords
        self._publish(folder.mailbox_id, row.name, ChangeKind.FLAGS, modseq)
        return StoreResult(tuple(FlagUpdate(message.uid, message.flags, modseq) for message, _, _ in changed),
                           tuple(conflicts), modseq, tuple(unchanged))

    def _copy(self, ref: FolderRef, uids: UidSet, destination: FolderRef, *, move: bool) -> CopyResult:
        if destination.mailbox_id != ref.mailbox_id:
            raise FolderNotFound("copying between mailboxes is not supported")
        source, target = self._folder(ref), self._folder(destination)
        messages = source.in_set(uids)
        if not move:
            self._check_quota(ref.mailbox_id, sum(message.size for message in messages))
        if not messages:
            return CopyResult(target.uidvalidity, (), ())
        # RFC 6851 3.3: a MOVE into the source folder gives the copies new UIDs, then expunges the originals.
        modseq = target.next_modseq()
        first = target.uidnext
        for index, message in enumerate(messages):
            target.messages[first + index] = message.copy(first + index, modseq)
            target.keywords |= flagcodec.keywords_of(message.keywords)
        target.uidnext = first + len(messages)
        return CopyResult(target.uidvalidity, tuple(message.uid for message in messages),
                          tuple(range(first, first + len(messages))))

    async def copy(self, folder: FolderRef, uids: UidSet, destination: FolderRef) -> CopyResult:
        copied = self._copy(folder, uids, destination, move=False)
        if copied.dest_uids:
            self._publish(destination.mailbox_id, names.normalise(destination.name), ChangeKind.EXISTS)
        return copied

    async def move(self, folder: FolderRef, uids: UidSet, destination: FolderRef) -> MoveResult:
        source = self._folder(folder)
        originals = source.in_set(uids)
        copied = self._copy(folder, uids, destination, move=True)
        expunged = source.remove(originals)
        if copied.dest_uids:
            self._publish(destination.mailbox_id, names.normalise(destination.name), ChangeKind.EXISTS)
            self._publish(folder.mailbox_id, source.name, ChangeKind.EXPUNGE, expunged.highestmodseq)
        return MoveResult(copied, expunged)

    async def expunge(self, folder: FolderRef, uids: UidSet | None = None) -> ExpungeResult:
        row = self._folder(folder)
        doomed = [message for uid, message in sorted(row.messages.items())
                  if message.system_flags & DELETED_BIT and (uids is None or uid in uids)]
        result = row.remove(doomed)
        if result.uids:
            self._publish(folder.mailbox_id, row.name, ChangeKind.EXPUNGE, result.highestmodseq)
        return result

    async def changes_since(self, folder: FolderRef, modseq: int) -> Changes:
        row = self._folder(folder)
        updated = tuple(FlagUpdate(uid, message.flags, message.modseq)
                        for uid, message in sorted(row.messages.items()) if message.modseq > modseq)
        expunged = tuple(sorted(uid for uid, when in row.expunged.items() if when > modseq))
        return Changes(row.highestmodseq, updated, expunged)

    async def search(self, folder: FolderRef, key: SearchKey, *,
                     recent_uids: frozenset[int] = frozenset()) -> list[int]:
        row = self._folder(folder)
        evaluator = Evaluator(recent_uids, self._read_head, self._body_contains)  # type: ignore[arg-type]
        return [uid for uid, message in sorted(row.messages.items())
                if await evaluator.matches(key, message)]  # type: ignore[arg-type]

    @staticmethod
    async def _read_head(message: _Message) -> bytes:
        return message.data[:MAX_HEADER_BYTES]

    @staticmethod
    async def _body_contains(message: _Message, needle: str, include_headers: bool) -> bool:
        start = 0 if include_headers else len(header_section(message.data[:MAX_HEADER_BYTES]))
        return needle.casefold() in message.data[start:].decode("utf-8", errors="replace").casefold()

    async def quota(self, mailbox_id: int) -> QuotaUsage:
        mailbox = self._mailbox(mailbox_id)
        used = mailbox.used()
        count = sum(len(folder.messages) for folder in mailbox.folders.values())
        # RFC 9208 5.1: STORAGE in units of 1024 octets, rounded up.
        return QuotaUsage(-(-used // 1024), self.quota_bytes // 1024 if self.quota_bytes else None, count, None)

"""What every command family shares: the handler result, mailbox-name resolution and access control.

Namespaces (RFC 2342): the personal namespace has the empty prefix and "/"
as separator; mailboxes delegated to the user (the directory's ``readable``
set, read right only) appear in the shared namespace as
``Shared/<address>/<folder>`` and are read-only.  Every name a client sends
goes through ``resolve``: a name can only ever reach the user's own mailbox
or one delegated to them, and a mailbox that is not delegated is answered
exactly like a folder that does not exist (no way to probe addresses).

A name that reaches for another mailbox is answered like any missing folder,
but the audit log keeps it (``reaching_reason``, used at the session's
command boundary): the shared namespace without a delegation, a ``.`` or
``..`` segment, another address as a segment, and the other-users namespaces
of other servers (``~user``, ``#shared``, ``user/...``, ``Other Users``). A
folder of one's own that is simply not there is an ordinary client error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.imap.protocol.errors import NONEXISTENT, NOPERM, CANNOT, ImapNo
from gateway.imap.protocol.sequence import SequenceSet
from gateway.mailstore.interface import SEPARATOR, FolderRef
from gateway.mailstore.names import fold_inbox

if TYPE_CHECKING:
    from gateway.imap.session import Session

SHARED_PREFIX = "Shared"
SHARED_ROOT = SHARED_PREFIX + SEPARATOR
# Other servers' other-users and shared namespaces (RFC 2342 5: Cyrus "user", Exchange "Other Users" /
# "Public Folders"); "~" and "#" prefixes are Dovecot's and UW's.
FOREIGN_ROOTS = frozenset({"user", "users", "other users", "public folders", "shared folders"})


@dataclass(frozen=True)
class Completion:
    """What a handler returns: the tagged OK text and an optional response code (RFC 3501 7.1)."""

    text: str
    code: str | None = None
    # Change events the command's own writes published (a STORE that changed flags: 1): already shown to the
    # client, so they alone need no look for changes afterwards (``Session._may_have_changed``).
    own_events: int = 0


@dataclass(frozen=True)
class Target:
    """A mailbox name resolved to a folder of a mailbox the user may reach."""

    ref: FolderRef
    name: str          # as the client names it (with the shared prefix for a delegated mailbox)
    shared: bool

    @property
    def writable(self) -> bool:
        return not self.shared


def no_such_mailbox(policy: str | None = None) -> ImapNo:
    return ImapNo("No such mailbox", NONEXISTENT, policy=policy)


def reaching_reason(name: str, own_address: str) -> str | None:
    """Why ``name``, refused as missing, reached for another mailbox (the audit's reason), or None.
    Shared-namespace names are judged by ``resolve`` (``policy="shared"`` unless delegated): a folder
    missing from a mailbox delegated to the user is an ordinary error."""
    segments = name.split(SEPARATOR)
    if is_shared_path(name):
        return None
    if any(segment in (".", "..") for segment in segments):
        return "traversal"
    if segments[0][:1] in ("~", "#") or segments[0].lower() in FOREIGN_ROOTS:
        return "namespace"
    if any("@" in segment and segment.lower() != own_address for segment in segments):
        return "address"
    return None


def normalise_folder(name: str) -> str:
    """RFC 3501 5.1: INBOX is case-insensitive, and so is the INBOX of a hierarchy path (the mail store's rule)."""
    return fold_inbox(name)


def is_shared_path(name: str) -> bool:
    return name == SHARED_PREFIX or name.startswith(SHARED_ROOT)


def shared_name(address: str, folder: str) -> str:
    return f"{SHARED_ROOT}{address}{SEPARATOR}{folder}"


def delegated_addresses(session: Session) -> list[str]:
    """Addresses whose mailboxes the user may read besides their own, sorted."""
    account = session.require_account()
    return sorted(address for address in account.readable if address != account.address)


async def delegated_mailbox_id(session: Session, address: str) -> int | None:
    """The mailbox id behind a delegated address, or None when it is not delegated to this user."""
    if address not in delegated_addresses(session):
        return None
    cache = session.delegated_ids
    if address not in cache:
        delegate = await session.context.directory.account(address)
        if delegate is None:
            return None
        cache[address] = delegate.mailbox_id
    return cache[address]


async def resolve(session: Session, name: str) -> Target:
    """Map a client's mailbox name to a folder it may reach; NO [NONEXISTENT] otherwise."""
    account = session.require_account()
    if not is_shared_path(name):
        folder = normalise_folder(name)
        return Target(FolderRef(account.mailbox_id, folder), folder, shared=False)
    parts = name.split(SEPARATOR, 2)
    if len(parts) < 3 or not parts[2]:
        raise no_such_mailbox(policy="shared")
    address, folder = parts[1].lower(), normalise_folder(parts[2])
    mailbox_id = await delegated_mailbox_id(session, address)
    if mailbox_id is None:
        session.log.warning("refused access to shared path %r (not delegated)", name)
        raise no_such_mailbox(policy="shared")
    return Target(FolderRef(mailbox_id, folder), shared_name(address, folder), shared=True)


async def resolve_writable(session: Session, name: str) -> Target:
    """``resolve`` for commands that change the mailbox: delegated mailboxes are read-only."""
    target = await resolve(session, name)
    if not target.writable:
        raise ImapNo("Delegated mailboxes are read-only", NOPERM)
    return target


def refuse_shared_name(name: str) -> None:
    """The shared prefix is ours: a personal folder may not take it (RFC 2342 6)."""
    if is_shared_path(name):
        raise ImapNo("Names under Shared/ are reserved", CANNOT, policy="shared")


def uid_sequence(uids: Sequence[int]) -> SequenceSet:
    """UIDs as a sequence set, ranges merged only where the order is kept (RFC 4315 3 COPYUID)."""
    ranges: list[tuple[int, int]] = []
    for uid in uids:
        if ranges and ranges[-1][1] == uid - 1:
            ranges[-1] = (ranges[-1][0], uid)
        else:
            ranges.append((uid, uid))
    return SequenceSet.of(*(low if low == high else (low, high) for low, high in ranges))

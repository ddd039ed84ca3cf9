"""Authenticated-state mailbox commands: SELECT/EXAMINE, CREATE, DELETE, RENAME, SUBSCRIBE,
UNSUBSCRIBE, LIST (LIST-EXTENDED, LIST-STATUS, SPECIAL-USE, CHILDREN), LSUB, STATUS, NAMESPACE,
GETQUOTA, GETQUOTAROOT, SETQUOTA.

Every name goes through ``base.resolve`` (own mailbox or delegated, read-only).
Special-use attributes are sent on every LIST form (mox#66: Apple Mail invents
"Sent Messages" when it finds none) and every folder is selectable: the store
creates missing parents, so no ``\\Noselect`` holes (cyrus#2990, Outlook); only
the shared-namespace roots are ``\\Noselect``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.imap.commands.base import (
    SHARED_PREFIX, Completion, Target, delegated_addresses, delegated_mailbox_id, is_shared_path,
    normalise_folder, refuse_shared_name, resolve, resolve_writable, shared_name,
)
from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response
from gateway.imap.protocol.errors import NONEXISTENT, NOPERM, BadCommand, ImapNo
from gateway.imap.selected import SelectedMailbox
from gateway.mailstore.interface import DELETED, INBOX, SEPARATOR, SPECIAL_USES, FolderStatus, HasFlag

if TYPE_CHECKING:
    from gateway.imap.session import Handler, Session

USEATTR = "USEATTR"   # RFC 6154 6


# --- SELECT / EXAMINE -----------------------------------------------------------------

async def select(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.1/6.3.2; CONDSTORE per RFC 7162 3.1.8 (SELECT (CONDSTORE) enables it)."""
    assert isinstance(command, c.Select)
    session.deselect()    # RFC 3501 6.3.1: even a failed SELECT leaves no mailbox selected
    if command.qresync is not None:
        raise BadCommand("QRESYNC is not supported")
    if command.condstore:
        session.enabled.add("CONDSTORE")
    target = await resolve(session, command.mailbox)
    read_only = command.read_only or target.shared
    snapshot = await session.store.select(target.ref, read_only=read_only)
    mailbox = SelectedMailbox.from_snapshot(snapshot, target.name, read_only=read_only,
                                            condstore=session.condstore)
    session.write_all(_select_responses(mailbox, snapshot.first_unseen, snapshot.uidnext))
    session.select(mailbox)
    return Completion(f"{command.name} completed", "READ-ONLY" if mailbox.read_only else "READ-WRITE")


def _select_responses(mailbox: SelectedMailbox, first_unseen: int | None, uidnext: int) -> list[bytes]:
    lines = [
        mailbox.flags_response(),                                                # RFC 3501 7.2.6
        response.exists(mailbox.exists),                                         # RFC 3501 7.3.1
        response.recent(len(mailbox.recent)),                                    # RFC 3501 7.3.2
    ]
    if first_unseen is not None:
        lines.append(response.untagged_ok("First unseen", f"UNSEEN {first_unseen}"))
    lines += [
        mailbox.permanent_flags_response(),
        response.untagged_ok("UIDs valid", f"UIDVALIDITY {mailbox.uidvalidity}"),
        response.untagged_ok("Predicted next UID", f"UIDNEXT {uidnext}"),
        # RFC 7162 3.1.2.1: sent on every SELECT by a server that keeps mod-sequences.
        response.untagged_ok("Highest", f"HIGHESTMODSEQ {mailbox.modseq}"),
    ]
    return lines


# --- CREATE / DELETE / RENAME / (UN)SUBSCRIBE -------------------------------------------

async def create(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.3 (one trailing separator only announces children); RFC 6154 3 USE (...). The mail store
    refuses, NO [CANNOT] with the reason, a name a file store could read as a path (``mailstore.names``)."""
    assert isinstance(command, c.Create)
    name = normalise_folder(command.mailbox.removesuffix(SEPARATOR))
    refuse_shared_name(name)
    if len(command.special_use) > 1 or any(use not in SPECIAL_USES for use in command.special_use):
        raise ImapNo("One known special use per mailbox", USEATTR)
    account = session.require_account()
    special_use = command.special_use[0] if command.special_use else None
    # Subscribed at once, so clients that list subscriptions see it (stalwart#1342).
    await session.store.create_folder(account.mailbox_id, name, special_use=special_use, subscribe=True)
    return Completion("CREATE completed")


async def delete(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.4.  The name stays subscribed: RFC 3501 6.3.6 forbids removing a subscription
    unilaterally, and LIST (SUBSCRIBED) then shows it \\NonExistent (RFC 5258 3.4 example)."""
    assert isinstance(command, c.Delete)
    target = await resolve_writable(session, command.mailbox)
    await session.store.delete_folder(target.ref.mailbox_id, target.ref.name)
    return Completion("DELETE completed")


async def rename(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.5: children follow; subscriptions follow too. The destination's name follows CREATE's rules."""
    assert isinstance(command, c.Rename)
    source = await resolve_writable(session, command.source)
    destination = normalise_folder(command.destination.removesuffix(SEPARATOR))
    refuse_shared_name(destination)
    mailbox_id = source.ref.mailbox_id
    subscribed = set(await session.store.list_subscriptions(mailbox_id))
    await session.store.rename_folder(mailbox_id, source.ref.name, destination)
    await _move_subscriptions(session, mailbox_id, subscribed, source.ref.name, destination)
    _follow_rename(session, mailbox_id, source.ref.name, destination)
    return Completion("RENAME completed")


def _follow_rename(session: Session, mailbox_id: int, old: str, new: str) -> None:
    """The session's own selected folder keeps being selected under its new name (its UIDs do not
    change, RFC 3501 6.3.5); renaming INBOX leaves INBOX, now empty, selected."""
    selected = session.selected
    if selected is None or selected.ref.mailbox_id != mailbox_id or old == INBOX:
        return
    name = selected.ref.name
    if name == old or name.startswith(old + SEPARATOR):
        renamed = new + name[len(old):]
        selected.ref = dataclasses.replace(selected.ref, name=renamed)
        selected.name = renamed


async def _move_subscriptions(session: Session, mailbox_id: int, subscribed: set[str], old: str, new: str) -> None:
    for name in sorted(subscribed):
        if name == old or name.startswith(old + SEPARATOR):
            await session.store.subscribe(mailbox_id, new + name[len(old):])
            if old != "INBOX":
                await session.store.unsubscribe(mailbox_id, name)


async def subscribe(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.6: a delegated mailbox is subscribed under its shared-namespace name."""
    assert isinstance(command, c.Subscribe)
    target = await resolve(session, command.mailbox)
    if not target.shared:
        await _require_existing(session, target)
    await session.store.subscribe(session.require_account().mailbox_id, target.name)
    return Completion("SUBSCRIBE completed")


async def _require_existing(session: Session, target: Target) -> None:
    names = {info.name for info in await session.store.list_folders(target.ref.mailbox_id)}
    if target.ref.name not in names:
        raise ImapNo("No such mailbox", NONEXISTENT)


async def unsubscribe(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.7: works for names whose folder no longer exists."""
    assert isinstance(command, c.Unsubscribe)
    name = normalise_folder(command.mailbox)
    await session.store.unsubscribe(session.require_account().mailbox_id, name)
    return Completion("UNSUBSCRIBE completed")


# --- LIST / LSUB ------------------------------------------------------------------------

@dataclass
class Listed:
    """One name LIST may return, with what its attributes need."""

    name: str
    special_use: str | None = None
    selectable: bool = True
    has_children: bool = False
    subscribed: bool = False
    exists: bool = True
    subscribed_children: bool = False
    extra: list[str] = field(default_factory=list)


def list_pattern(reference: str, pattern: str) -> str:
    """RFC 3501 6.3.8: the reference and the pattern name one pattern together."""
    return normalise_folder(reference + pattern)


def matches(pattern: str, name: str) -> bool:
    """RFC 3501 6.3.8: "*" matches anything, "%" anything but the separator.

    A set-of-states automaton, linear in the name for each pattern position:
    no backtracking, so a pattern like "*a*a*a*...b" cannot pin the event loop.
    INBOX and its children also match in any case of "INBOX" (RFC 3501 5.1).
    """
    if pattern == "*":
        return True                           # LIST "" "*", what clients send most: no automaton needed
    if pattern == "%":
        return SEPARATOR not in name
    fold = name == INBOX or name.startswith(INBOX + SEPARATOR)
    if "*" not in pattern and "%" not in pattern:
        return name == pattern or (fold and len(name) == len(pattern) and all(
            wanted == char or wanted.lower() == char.lower() for wanted, char in zip(pattern, name, strict=True)))
    states = _skip_wildcards({0}, pattern)
    for char in name:
        states = _skip_wildcards(_step(states, pattern, char, fold), pattern)
        if not states:
            return False
    return len(pattern) in states


def _step(states: set[int], pattern: str, char: str, fold: bool) -> set[int]:
    following: set[int] = set()
    for index in states:
        if index == len(pattern):
            continue
        wanted = pattern[index]
        if wanted == "*" or (wanted == "%" and char != SEPARATOR):
            following.add(index)              # the wildcard takes this character and may take more
        elif wanted == char or (fold and wanted.lower() == char.lower()):
            following.add(index + 1)
    return following


def _skip_wildcards(states: set[int], pattern: str) -> set[int]:
    """A wildcard may also match nothing."""
    reached = set(states)
    pending = list(states)
    while pending:
        index = pending.pop()
        if index < len(pattern) and pattern[index] in "*%" and index + 1 not in reached:
            reached.add(index + 1)
            pending.append(index + 1)
    return reached


async def visible_mailboxes(session: Session) -> list[Listed]:
    """Own folders, then the shared namespace (roots are \\Noselect), subscriptions marked."""
    account = session.require_account()
    folders, subscribed = await session.store.folders_and_subscriptions(account.mailbox_id)
    subscriptions = set(subscribed)
    listed = [Listed(info.name, info.special_use, has_children=info.has_children,
                     subscribed=info.name in subscriptions)
              for info in folders]
    listed += await _shared_mailboxes(session, subscriptions)
    known = {item.name for item in listed}
    listed += [Listed(name, subscribed=True, exists=False, selectable=False)
               for name in sorted(subscriptions - known)]
    known |= subscriptions
    # RFC 5258 4 / RFC 3501 6.3.9: the parents of subscribed names exist for CHILDINFO and LSUB "%" even
    # when no folder has that name (they are \NonExistent / \Noselect then).
    listed += [Listed(name, exists=False, selectable=False)
               for name in sorted(_missing_parents(subscriptions, known))]
    _mark_subscribed_children(listed)
    return sorted(listed, key=lambda item: (item.name != "INBOX", item.name))


async def _shared_mailboxes(session: Session, subscriptions: set[str]) -> list[Listed]:
    addresses = delegated_addresses(session)
    if not addresses:
        return []
    listed = [Listed(SHARED_PREFIX, selectable=False, has_children=True)]
    for address in addresses:
        mailbox_id = await delegated_mailbox_id(session, address)
        if mailbox_id is None:
            continue
        root = f"{SHARED_PREFIX}{SEPARATOR}{address}"
        listed.append(Listed(root, selectable=False, has_children=True))
        for info in await session.store.list_folders(mailbox_id):
            name = shared_name(address, info.name)
            listed.append(Listed(name, info.special_use, has_children=info.has_children,
                                 subscribed=name in subscriptions))
    return listed


def _missing_parents(names: set[str], known: set[str]) -> set[str]:
    parents = {SEPARATOR.join(name.split(SEPARATOR)[:depth]) for name in names
               for depth in range(1, name.count(SEPARATOR) + 1)}
    return {parent for parent in parents - known if parent and not is_shared_path(parent)}


def _mark_subscribed_children(listed: list[Listed]) -> None:
    """RFC 5258 4: CHILDINFO ("SUBSCRIBED") for RECURSIVEMATCH."""
    subscribed = [item.name for item in listed if item.subscribed]
    for item in listed:
        item.subscribed_children = any(name.startswith(item.name + SEPARATOR) for name in subscribed)


def list_attributes(item: Listed, *, show_subscribed: bool) -> list[str]:
    """RFC 3501 7.2.2, RFC 3348 CHILDREN, RFC 6154 2 special use, RFC 5258 3 \\Subscribed/\\NonExistent."""
    attributes: list[str] = []
    if not item.exists:
        attributes.append("\\NonExistent")     # RFC 5258 3.4: implies \Noselect; no CHILDREN attribute
    else:
        if not item.selectable:
            attributes.append("\\Noselect")
        attributes.append("\\HasChildren" if item.has_children else "\\HasNoChildren")
    if show_subscribed and item.subscribed:
        attributes.append("\\Subscribed")
    if item.special_use:
        attributes.append(item.special_use)
    return attributes


async def list_mailboxes(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.8 and RFC 5258 (LIST-EXTENDED), RFC 5819 (LIST-STATUS), RFC 6154 5 (SPECIAL-USE)."""
    assert isinstance(command, c.List)
    if command.patterns == ("",) and not command.extended:
        # RFC 3501 6.3.8: the empty pattern asks for the separator and the root.
        session.write(response.list_response(["\\Noselect"], SEPARATOR, ""))
        return Completion("LIST completed")
    patterns = [list_pattern(command.reference, pattern) for pattern in command.patterns]
    for item in _selected_items(await visible_mailboxes(session), command, patterns):
        await _write_list_item(session, command, item)
    return Completion("LIST completed")


def _selected_items(items: list[Listed], command: c.List, patterns: list[str]) -> list[Listed]:
    only_subscribed = "SUBSCRIBED" in command.selection
    recursive = "RECURSIVEMATCH" in command.selection
    chosen: list[Listed] = []
    for item in items:
        if not any(matches(pattern, item.name) for pattern in patterns):
            continue
        if "SPECIAL-USE" in command.selection and not item.special_use:
            continue
        if only_subscribed and not item.subscribed:
            if not (recursive and item.subscribed_children):
                continue
            item.extra.append("SUBSCRIBED")
        elif not item.exists and not only_subscribed:
            continue        # RFC 5258 3.4: a subscribed name that does not exist is listed only by (SUBSCRIBED)
        chosen.append(item)
    return chosen


async def _write_list_item(session: Session, command: c.List, item: Listed) -> None:
    show_subscribed = command.returns.subscribed or "SUBSCRIBED" in command.selection
    extended = [response.childinfo(*item.extra)] if item.extra else []
    session.write(response.list_response(list_attributes(item, show_subscribed=show_subscribed), SEPARATOR,
                                         item.name, utf8=session.utf8, extended_items=extended))
    if command.returns.status is not None and item.exists and item.selectable:
        # RFC 5819 2: the STATUS response follows its LIST response.
        try:
            target = await resolve(session, item.name)
            values = await _status_values(session, target, command.returns.status)
        except ImapNo:
            return
        session.write(response.status(item.name, values, utf8=session.utf8))


async def lsub(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.9: subscribed names matching the pattern."""
    assert isinstance(command, c.Lsub)
    pattern = list_pattern(command.reference, command.pattern)
    items = await visible_mailboxes(session)
    subscribed = [item.name for item in items if item.subscribed]
    for item in items:
        if not matches(pattern, item.name):
            continue
        if item.subscribed:
            attributes = [] if item.exists else ["\\Noselect"]
        elif any(name.startswith(item.name + SEPARATOR) and not matches(pattern, name) for name in subscribed):
            # RFC 3501 6.3.9: "foo/bar" subscribed, "foo" not: LSUB "" "%" answers foo with \Noselect.
            attributes = ["\\Noselect"]
        else:
            continue
        session.write(response.list_response(attributes, SEPARATOR, item.name, utf8=session.utf8, kind="LSUB"))
    return Completion("LSUB completed")


# --- STATUS -----------------------------------------------------------------------------------

async def status(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.10; HIGHESTMODSEQ (RFC 7162 3.1.6), SIZE (RFC 8438), DELETED (RFC 9051 6.3.11)."""
    assert isinstance(command, c.Status)
    if "HIGHESTMODSEQ" in command.items:
        session.enable_condstore()                    # RFC 7162 3.1: STATUS HIGHESTMODSEQ enables CONDSTORE
    target = await resolve(session, command.mailbox)
    values = await _status_values(session, target, command.items)
    session.write(response.status(target.name, values, utf8=session.utf8))
    return Completion("STATUS completed")


async def _status_values(session: Session, target: Target, items: Iterable[str]) -> dict[str, int]:
    folder = await session.store.status(target.ref)
    values: dict[str, int] = {}
    for item in items:
        values[item] = await _status_item(session, target, folder, item)
    return values


async def _status_item(session: Session, target: Target, folder: FolderStatus, item: str) -> int:
    simple = {"MESSAGES": folder.messages, "RECENT": folder.recent, "UIDNEXT": folder.uidnext,
              "UIDVALIDITY": folder.uidvalidity, "UNSEEN": folder.unseen,
              "HIGHESTMODSEQ": folder.highestmodseq, "SIZE": folder.size}
    if item in simple:
        return simple[item]
    if item == "DELETED":
        return len(await session.store.search(target.ref, HasFlag(DELETED)))
    raise BadCommand(f"Unknown STATUS item {item}")


# --- NAMESPACE and QUOTA ------------------------------------------------------------------------

async def namespace(session: Session, command: c.Command) -> Completion:
    """RFC 2342 5: personal "" with "/", no other users', shared "Shared/" when something is delegated."""
    shared = [(SHARED_PREFIX + SEPARATOR, SEPARATOR)] if delegated_addresses(session) else []
    session.write(response.namespace([("", SEPARATOR)], [], shared, utf8=session.utf8))
    return Completion("NAMESPACE completed")


async def _quota_root_mailbox(session: Session, root: str) -> int:
    """Quota roots: "" is the user's own mailbox, "Shared/<address>" a delegated one (RFC 9208 3.2)."""
    account = session.require_account()
    if root == "":
        return account.mailbox_id
    prefix = SHARED_PREFIX + SEPARATOR
    if root.startswith(prefix):
        mailbox_id = await delegated_mailbox_id(session, root[len(prefix):].lower())
        if mailbox_id is not None:
            return mailbox_id
    raise ImapNo("No such quota root", NONEXISTENT)


async def _write_quota(session: Session, root: str) -> None:
    usage = await session.store.quota(await _quota_root_mailbox(session, root))
    resources: list[tuple[str, int, int]] = []
    if usage.storage_limit_kib is not None:
        resources.append(("STORAGE", usage.storage_kib, usage.storage_limit_kib))   # RFC 9208 5.1
    if usage.message_limit is not None:
        resources.append(("MESSAGE", usage.messages, usage.message_limit))          # RFC 9208 5.2
    session.write(response.quota(root, resources))


async def getquota(session: Session, command: c.Command) -> Completion:
    """RFC 9208 4.2."""
    assert isinstance(command, c.GetQuota)
    await _write_quota(session, command.root)
    return Completion("GETQUOTA completed")


async def getquotaroot(session: Session, command: c.Command) -> Completion:
    """RFC 9208 4.3: ``* QUOTAROOT mailbox root`` then ``* QUOTA root (...)``."""
    assert isinstance(command, c.GetQuotaRoot)
    target = await resolve(session, command.mailbox)
    root = SEPARATOR.join(target.name.split(SEPARATOR)[:2]) if target.shared else ""
    session.write(response.quotaroot(target.name, [root], utf8=session.utf8))
    await _write_quota(session, root)
    return Completion("GETQUOTAROOT completed")


async def setquota(session: Session, command: c.Command) -> Completion:
    """RFC 9208 4.1: limits are set by the administrator, not over IMAP (QUOTA=SET not announced)."""
    raise ImapNo("Quota limits are set by the administrator", NOPERM)


HANDLERS: dict[type[c.Command], Handler] = {
    c.Select: select,
    c.Examine: select,
    c.Create: create,
    c.Delete: delete,
    c.Rename: rename,
    c.Subscribe: subscribe,
    c.Unsubscribe: unsubscribe,
    c.List: list_mailboxes,
    c.Lsub: lsub,
    c.Status: status,
    c.Namespace: namespace,
    c.GetQuota: getquota,
    c.GetQuotaRoot: getquotaroot,
    c.SetQuota: setquota,
}

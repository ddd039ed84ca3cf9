"""Commands that add, change or remove messages: APPEND, CHECK, CLOSE, UNSELECT, EXPUNGE,
UID EXPUNGE, STORE, COPY, MOVE (RFC 3501 6.3.11, 6.4; UIDPLUS RFC 4315; MOVE RFC 6851;
UNCHANGEDSINCE RFC 7162 3.1.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.imap.commands.base import Completion, resolve_writable, uid_sequence
from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response
from gateway.imap.protocol.errors import MODIFIED, ImapNo
from gateway.imap.selected import Message, SelectedMailbox
from gateway.mailstore.interface import FlagUpdate, StoreMode, UidSet

if TYPE_CHECKING:
    from gateway.imap.session import Handler, Session

_STORE_MODES = {c.StoreMode.REPLACE: StoreMode.REPLACE, c.StoreMode.ADD: StoreMode.ADD,
                c.StoreMode.REMOVE: StoreMode.REMOVE}


def _writable(session: Session) -> SelectedMailbox:
    selected = session.require_selected()
    if selected.read_only:
        raise ImapNo("Mailbox is read-only (EXAMINE or delegated)")
    return selected


def _uids(messages: list[Message]) -> UidSet:
    return UidSet.from_uids(message.uid for message in messages)


# --- APPEND -----------------------------------------------------------------------------

async def append(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.3.11; RFC 4315 3 [APPENDUID]; a missing folder is NO [TRYCREATE] (store error)."""
    assert isinstance(command, c.Append)
    target = await resolve_writable(session, command.mailbox)
    result = await session.store.append(target.ref, command.message, flags=command.flags,
                                        internaldate=command.internal_date)
    return Completion("APPEND completed",
                      response.response_code_uids("APPENDUID", result.uidvalidity, result.uid))


# --- CHECK / CLOSE / UNSELECT -------------------------------------------------------------

async def check(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.4.1: every change is already durable; the untagged updates follow."""
    return Completion("CHECK completed")


async def close(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.4.2: expunge silently (read-write only), then leave the selected state."""
    selected = session.require_selected()
    if not selected.read_only:
        await session.store.expunge(selected.ref)
    session.deselect()
    return Completion("CLOSE completed")


async def unselect(session: Session, command: c.Command) -> Completion:
    """RFC 3691 2: leave the selected state without expunging."""
    session.deselect()
    return Completion("UNSELECT completed")


# --- EXPUNGE --------------------------------------------------------------------------------

async def expunge(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.4.3; RFC 4315 2.1 UID EXPUNGE only touches the given UIDs."""
    assert isinstance(command, c.Expunge)
    selected = _writable(session)
    uids = _uids(selected.by_uids(command.uid_set)) if command.uid_set is not None else None
    if uids is not None and not uids:
        return Completion("EXPUNGE completed")
    result = await session.store.expunge(selected.ref, uids)
    session.write_all(selected.remove(result.uids))
    return Completion("EXPUNGE completed", own_events=1 if result.uids else 0)


# --- STORE ------------------------------------------------------------------------------------

async def store(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.4.6; RFC 7162 3.1.3 UNCHANGEDSINCE answers [MODIFIED set] for conflicts."""
    assert isinstance(command, c.Store)
    selected = _writable(session)
    if command.unchanged_since is not None:
        session.enable_condstore()                    # RFC 7162 3.1: UNCHANGEDSINCE enables CONDSTORE
    messages = [m for m in selected.resolve(command.sequence_set, uid=command.uid)
                if not selected.is_expunged(m.uid)]
    if not messages:
        return Completion("STORE completed")
    result = await session.store.store_flags(selected.ref, _uids(messages), _STORE_MODES[command.mode],
                                             command.flags, unchanged_since=command.unchanged_since)
    for update in result.updated:
        selected.note_reported(update.uid, update.modseq)
    if command.mode is not c.StoreMode.REMOVE:
        # RFC 3501 7.2.6: a keyword new to the mailbox is announced (* FLAGS) even when .SILENT.
        session.write_all(selected.announce(command.flags))
    if not command.silent:
        _report_flags(session, selected, messages, result.updated + result.unchanged)
    return Completion("STORE completed", _modified_code(selected, result.conflicts, uid=command.uid),
                      own_events=1 if result.updated else 0)


def _report_flags(session: Session, selected: SelectedMailbox, messages: list[Message],
                  flags: tuple[FlagUpdate, ...]) -> None:
    """RFC 3501 6.4.6: the flags of each message as the STORE left them (the store says; no second read),
    UID first; a message expunged meanwhile, or left alone by UNCHANGEDSINCE, gets none."""
    by_uid = {update.uid: update for update in flags}
    for message in messages:
        update = by_uid.get(message.uid)
        if update is None:
            continue
        selected.note_reported(update.uid, update.modseq)
        session.write(selected.fetch_flags_line(message.number, update.uid, update.flags, update.modseq))


def _modified_code(selected: SelectedMailbox, conflicts: tuple[int, ...], *, uid: bool) -> str | None:
    if not conflicts:
        return None
    if uid:
        shown = sorted(conflicts)
    else:
        shown = sorted(message.number for message in selected.visible(conflicts))
    return f"{MODIFIED} {uid_sequence(shown).format()}"


# --- COPY / MOVE ---------------------------------------------------------------------------------

async def copy(session: Session, command: c.Command) -> Completion:
    """RFC 3501 6.4.7; RFC 4315 3 [COPYUID]; a missing destination is NO [TRYCREATE]."""
    assert isinstance(command, c.Copy)
    selected = session.require_selected()
    destination = await resolve_writable(session, command.mailbox)
    messages = selected.resolve(command.sequence_set, uid=command.uid)
    if not messages:
        return Completion("COPY completed (nothing to copy)")
    result = await session.store.copy(selected.ref, _uids(messages), destination.ref)
    return Completion("COPY completed", _copyuid(result.uidvalidity, result.source_uids, result.dest_uids))


def _copyuid(uidvalidity: int, source: tuple[int, ...], dest: tuple[int, ...]) -> str | None:
    if not source:
        return None
    pairs = sorted(zip(source, dest, strict=True))
    return response.response_code_uids("COPYUID", uidvalidity, uid_sequence([s for s, _ in pairs]),
                                       uid_sequence([d for _, d in pairs]))


async def move(session: Session, command: c.Command) -> Completion:
    """RFC 6851 3.3: ``* OK [COPYUID ...]``, then an EXPUNGE for each moved message, then OK."""
    assert isinstance(command, c.Move)
    selected = _writable(session)
    destination = await resolve_writable(session, command.mailbox)
    messages = selected.resolve(command.sequence_set, uid=command.uid)
    if not messages:
        return Completion("MOVE completed (nothing to move)")
    result = await session.store.move(selected.ref, _uids(messages), destination.ref)
    code = _copyuid(result.copy.uidvalidity, result.copy.source_uids, result.copy.dest_uids)
    if code is not None:
        session.write(response.untagged_ok("Moved", code))
    session.write_all(selected.remove(result.expunged.uids))
    return Completion("MOVE completed")


HANDLERS: dict[type[c.Command], Handler] = {
    c.Append: append,
    c.Check: check,
    c.Close: close,
    c.Unselect: unselect,
    c.Expunge: expunge,
    c.Store: store,
    c.Copy: copy,
    c.Move: move,
}

"""SEARCH and UID SEARCH (RFC 3501 6.4.4, 6.4.8), ESEARCH results (RFC 4731), MODSEQ (RFC 7162 3.1.5).

The wire grammar's tree (``protocol.search``) is translated to the mail
store's keys; sequence numbers become UIDs through the session's view, so a
message expunged elsewhere but not yet reported keeps its number.  The full
grammar is supported, OR and NOT nested included (proton-bridge#185: the new
Outlook for Mac needs ``SEARCH OR``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.imap.commands.base import Completion, uid_sequence
from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response
from gateway.imap.protocol import search as wire
from gateway.imap.protocol.errors import BadCommand
from gateway.imap.protocol.sequence import SequenceSet
from gateway.imap.selected import SelectedMailbox
from gateway.mailstore import interface as store_keys
from gateway.mailstore.interface import RECENT, DateField, UidSet

if TYPE_CHECKING:
    from gateway.imap.session import Handler, Session

_FIELDS = {"internal": DateField.INTERNAL, "sent": DateField.SENT}
_DATE_KEYS = {"before": store_keys.DateBefore, "on": store_keys.DateOn, "since": store_keys.DateSince}


def translate(key: wire.SearchKey, selected: SelectedMailbox) -> store_keys.SearchKey:
    """One wire search key as a mail store key."""
    if isinstance(key, wire.SearchAll):
        return store_keys.All(())
    if isinstance(key, wire.SearchFlag):
        return _flag(key)
    if isinstance(key, wire.SearchDate):
        return _DATE_KEYS[key.relation](_FIELDS[key.field], key.date)
    if isinstance(key, wire.SearchHeader):
        return store_keys.Header(key.field, key.value)
    if isinstance(key, wire.SearchText):
        return store_keys.BodyContains(key.value, include_headers=key.where == "text")
    if isinstance(key, wire.SearchSize):
        return store_keys.Larger(key.size) if key.relation == "larger" else store_keys.Smaller(key.size)
    if isinstance(key, wire.SearchSequence):
        return store_keys.UidIn(UidSet.from_uids(_sequence_uids(key, selected)))
    if isinstance(key, wire.SearchModSeq):
        return store_keys.ModSeqAtLeast(key.modseq)
    return _combination(key, selected)


def _combination(key: wire.SearchKey, selected: SelectedMailbox) -> store_keys.SearchKey:
    if isinstance(key, wire.SearchNot):
        return store_keys.Not(translate(key.key, selected))
    if isinstance(key, wire.SearchOr):
        return store_keys.AnyOf((translate(key.left, selected), translate(key.right, selected)))
    if isinstance(key, wire.SearchAnd):
        return store_keys.All(tuple(translate(part, selected) for part in key.keys))
    raise BadCommand("Unsupported search key")


def _flag(key: wire.SearchFlag) -> store_keys.SearchKey:
    """RECENT/OLD use the session's \\Recent set; the others are stored flags (RFC 3501 6.4.4)."""
    inner: store_keys.SearchKey = store_keys.Recent() if key.flag == RECENT else store_keys.HasFlag(key.flag)
    return inner if key.present else store_keys.Not(inner)


def _sequence_uids(key: wire.SearchSequence, selected: SelectedMailbox) -> list[int]:
    if key.sequence.saved:
        raise BadCommand("The saved search result ($) is not supported")
    if key.uid:
        return [message.uid for message in selected.by_uids(key.sequence)]
    # Numbers beyond EXISTS simply match nothing in a search (no BAD, unlike FETCH).
    numbers = key.sequence.iter_values(selected.exists)
    return [selected.uids[number - 1] for number in numbers if number <= selected.exists]


def _uses_modseq(key: wire.SearchKey) -> bool:
    if isinstance(key, wire.SearchModSeq):
        return True
    if isinstance(key, wire.SearchNot):
        return _uses_modseq(key.key)
    if isinstance(key, wire.SearchOr):
        return _uses_modseq(key.left) or _uses_modseq(key.right)
    if isinstance(key, wire.SearchAnd):
        return any(_uses_modseq(part) for part in key.keys)
    return False


async def search(session: Session, command: c.Command) -> Completion:
    assert isinstance(command, c.Search)
    selected = session.require_selected()
    if command.criteria is None:
        raise BadCommand("Missing search criteria")
    with_modseq = _uses_modseq(command.criteria)
    if with_modseq:
        session.enable_condstore()                # RFC 7162 3.1: SEARCH MODSEQ enables CONDSTORE
    key = translate(command.criteria, selected)
    uids = await session.store.search(selected.ref, key, recent_uids=frozenset(selected.recent))
    numbers, shown = selected.visible_numbers(uids)
    results = shown if command.uid else numbers
    highest = await _highest_modseq(session, selected, shown) if with_modseq else None
    if command.return_options is None:
        session.write(response.search(results, highest_modseq=highest))
    else:
        session.write(_esearch(command, results, highest))
    return Completion("SEARCH completed")


async def _highest_modseq(session: Session, selected: SelectedMailbox, uids: list[int]) -> int | None:
    """RFC 7162 3.1.5: the highest MODSEQ of the matching messages (none when nothing matched)."""
    if not uids:
        return None
    listing = await session.store.fetch_flags(selected.ref, UidSet.from_uids(uids))   # not every sealed column
    return max(listing.modseqs, default=None)


def _esearch(command: c.Search, results: list[int], highest: int | None) -> bytes:
    """RFC 4731 3.1: MIN, MAX, ALL and COUNT; MIN/MAX/ALL are omitted when nothing matched."""
    options = command.return_options or ("ALL",)
    values: dict[str, int | SequenceSet] = {}
    if "MIN" in options and results:
        values["MIN"] = min(results)
    if "MAX" in options and results:
        values["MAX"] = max(results)
    if "ALL" in options and results:
        values["ALL"] = uid_sequence(sorted(results))
    if "COUNT" in options:
        values["COUNT"] = len(results)
    if highest is not None:
        values["MODSEQ"] = highest                   # RFC 7162 3.1.5 with RFC 4731
    return response.esearch(command.tag, values, uid=command.uid)


HANDLERS: dict[type[c.Command], Handler] = {c.Search: search}

"""Sessions share the folder index of the mail store (UIDs and flags): each still sees the folder as it
was last told (RFC 3501 7.4.1, 7.3.1), however far the shared index has moved on."""

from __future__ import annotations

import asyncio
import re
from array import array
from collections.abc import Collection

import pytest

from gateway.imap.commands.fetch import RenderedEnvelopes
from gateway.imap.protocol.structure import format_envelope, parse_message
from gateway.imap.selected import SelectedMailbox
from gateway.mailstore.interface import Changes, FlagUpdate, FolderRef
from tests.imap.imap_server import Conversation, RunningImap, imap, make_message  # noqa: F401 (fixture)


def test_fetch_flags_answers_only_messages_this_session_was_told_of(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    for n in range(3):
        imap.deliver(account.address, make_message(f"m{n}"))
    reader, writer = Conversation(imap, account), Conversation(imap, account)
    reader.command("SELECT INBOX")
    writer.command("SELECT INBOX")
    writer.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
    writer.command("EXPUNGE")
    imap.deliver(account.address, make_message("late"))
    # Sequence FETCH: message 1 is gone elsewhere but keeps its number (no EXPUNGE during FETCH), the new
    # message has no number yet: neither is answered, the others are, flags from the shared index.
    lines = reader.command("FETCH 1:* (UID FLAGS)")
    fetched = [line for line in lines if line.startswith("* ") and " FETCH (" in line]
    assert fetched == ["* 2 FETCH (UID 2 FLAGS (\\Recent))", "* 3 FETCH (UID 3 FLAGS (\\Recent))"]
    assert "* 4 EXISTS" in lines and not any(line.endswith(" EXPUNGE") for line in lines)
    assert lines[-1].endswith("OK [EXPUNGEISSUED] Some messages were already expunged")
    # UID FETCH may report the expunge; the view then has 3 messages: 2, 3 and the new 4.
    lines = reader.command("UID FETCH 1:* (UID FLAGS)")
    assert [line for line in lines if line.startswith("* ") and " FETCH (" in line] == [
        "* 2 FETCH (UID 2 FLAGS (\\Recent))", "* 3 FETCH (UID 3 FLAGS (\\Recent))",
        "* 4 FETCH (UID 4 FLAGS (\\Recent))"]
    assert "* 1 EXPUNGE" in lines
    assert reader.command("FETCH 3 (UID)")[0] == "* 3 FETCH (UID 4)"
    # The writer's own view was never touched by the reader's: it expunged 1 and has not been told of UID 4.
    assert writer.command("FETCH 1:2 (UID)")[:2] == ["* 1 FETCH (UID 2)", "* 2 FETCH (UID 3)"]
    reader.close()
    writer.close()


def test_keyword_and_condstore_through_the_flag_listing(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    for n in range(2):
        imap.deliver(account.address, make_message(f"m{n}"))
    reader, writer = Conversation(imap, account), Conversation(imap, account)
    reader.command("SELECT INBOX")
    writer.command("SELECT INBOX")
    writer.command("STORE 2 +FLAGS.SILENT (Urgent \\Seen)")
    lines = reader.command("FETCH 2 (FLAGS MODSEQ)")
    # RFC 7162 3.1: MODSEQ enables CONDSTORE (HIGHESTMODSEQ first); RFC 3501 7.2.6: * FLAGS before the keyword.
    assert lines[0].startswith("* OK [HIGHESTMODSEQ ")
    flags_at = next(i for i, line in enumerate(lines) if line.startswith("* FLAGS "))
    fetch_at = next(i for i, line in enumerate(lines) if line.startswith("* 2 FETCH "))
    assert flags_at < fetch_at and "Urgent" in lines[flags_at]
    assert "FLAGS (\\Seen Urgent \\Recent)" in lines[fetch_at] and "MODSEQ (" in lines[fetch_at]
    # A number beyond EXISTS is still BAD (RFC 3501 9), on this path too.
    assert reader.command("FETCH 3 (FLAGS)", expect="BAD")[-1].split()[1] == "BAD"
    reader.close()
    writer.close()


def test_envelopes_rendered_once_stay_those_of_their_own_folder(imap: RunningImap) -> None:  # noqa: F811
    """ENVELOPEs are remembered by (mailbox, UIDVALIDITY, UID): UID 1 of another folder, or of the same
    name deleted and re-created, is another message with its own ENVELOPE."""
    account = imap.new_account()
    imap.deliver(account.address, make_message("Compte rendu INBOX"))
    session = Conversation(imap, account)
    session.command("CREATE Dossiers")
    imap.deliver(account.address, make_message("Compte rendu Dossiers"), folder="Dossiers")
    session.command("SELECT INBOX")
    cold = session.command("FETCH 1 (ENVELOPE)")[0]
    assert '"Compte rendu INBOX"' in cold
    assert session.command("FETCH 1 (ENVELOPE)")[0] == cold          # the second answer is the same octets
    session.command("SELECT Dossiers")
    assert '"Compte rendu Dossiers"' in session.command("FETCH 1 (ENVELOPE)")[0]
    session.command("SELECT INBOX")
    session.command("DELETE Dossiers")
    session.command("CREATE Dossiers")
    imap.deliver(account.address, make_message("Nouveau dossier"), folder="Dossiers")
    session.command("SELECT Dossiers")
    assert '"Nouveau dossier"' in session.command("FETCH 1 (ENVELOPE)")[0]
    session.close()


@pytest.mark.parametrize("imap", ["sealed", "memory"], indirect=True)
def test_envelope_listing_answers_as_the_general_fetch(imap: RunningImap) -> None:  # noqa: F811
    """FETCH (FLAGS ENVELOPE), answered from the flag listing and the stored ENVELOPEs, gives the octets the
    general FETCH path gives (RFC 3501 7.4.2), flags included, with and without UTF8=ACCEPT (RFC 6855 3: a raw UTF-8 subject is a literal without it, a quoted string with it)."""
    account = imap.new_account()
    imap.deliver(account.address, make_message("Compte rendu"))
    imap.deliver(account.address, make_message("Échographie rénale"))
    imap.deliver(account.address, make_message("x", sender="soins: a@x.org, b@y.org;"))
    writer = Conversation(imap, account)
    writer.command("SELECT INBOX")
    writer.command("STORE 2 +FLAGS.SILENT (Urgent)")
    for enable in ("", "ENABLE UTF8=ACCEPT"):
        session = Conversation(imap, account)
        if enable:
            session.command(enable)
        session.command("SELECT INBOX")
        listing = session.command("FETCH 1:3 (FLAGS ENVELOPE)")
        general = session.command("FETCH 1:3 (FLAGS ENVELOPE RFC822.SIZE)")
        fetched = "\n".join(listing[:-1])
        assert fetched == re.sub(r" RFC822\.SIZE \d+\)", ")", "\n".join(general[:-1]))
        assert "FLAGS (Urgent" in fetched and '(NIL NIL "soins" NIL)' in fetched
        assert ('"Échographie rénale"' in fetched) == bool(enable)
        session.close()
    writer.close()


@pytest.mark.parametrize("imap", ["sealed", "sql", "memory"], indirect=True)
def test_envelope_range_is_the_per_message_rendering_while_another_session_expunges(
        imap: RunningImap) -> None:  # noqa: F811
    """The lines of a FETCH of a range of ENVELOPEs, built for the whole range at once, are octet for octet
    the per-message rendering from each message's header (RFC 3501 7.4.2); messages another session expunged
    and this one was not told of keep their numbers and are left out, the others answered (RFC 3501 7.4.1,
    RFC 2180 4.1.2); the same octets once remembered, and from the general FETCH path."""
    account = imap.new_account()
    raws = [make_message("Compte rendu"), make_message("Échographie rénale"),
            make_message("x", sender="soins: a@x.org, b@y.org;"), make_message('Sujet "cité" \\ fin'),
            make_message("y" * 200), make_message("dernier", sender='"Martin, Dr" <"j doe"@x.org>')]
    for raw in raws:
        imap.deliver(account.address, raw)
    reader, writer = Conversation(imap, account), Conversation(imap, account)
    reader.command("SELECT INBOX")
    writer.command("SELECT INBOX")
    writer.command("STORE 2,5 +FLAGS.SILENT (\\Deleted)")
    writer.command("EXPUNGE")
    imap.deliver(account.address, make_message("arrivé après"))
    kept = (1, 3, 4, 6)
    expected = b"".join(b"* %d FETCH (UID %d ENVELOPE %s FLAGS (\\Recent))\r\n" % (
        number, number, format_envelope(parse_message(raws[number - 1]), utf8=False)) for number in kept)
    expected_text = expected.decode("utf-8").replace("\r\n", "")   # the lines as read (literals on lines of their own)

    def fetched(command: str) -> str:
        lines = reader.command(command)
        assert lines[-1].endswith("OK [EXPUNGEISSUED] Some messages were already expunged")
        return "".join(line for line in lines[:-1] if not re.fullmatch(r"\* \d+ (EXISTS|RECENT)", line))

    assert "{" in expected_text                 # the raw UTF-8 subject is a literal (RFC 6855 3: no UTF8=ACCEPT)
    assert fetched("FETCH 1:6 (UID ENVELOPE FLAGS)") == expected_text        # read from the store
    assert fetched("FETCH 1:6 (UID ENVELOPE FLAGS)") == expected_text        # as remembered
    general = fetched("FETCH 1:6 (UID ENVELOPE FLAGS RFC822.SIZE)")
    assert re.sub(r" RFC822\.SIZE \d+\)", ")", general) == expected_text
    reader.close()
    writer.close()


def test_rendered_envelopes_are_kept_in_blocks_of_uids_and_dropped_least_recent_first() -> None:
    kept = RenderedEnvelopes(max_octets=3 * 1000)
    view, other = (1, 7, False), (1, 7, True)
    block = RenderedEnvelopes.BLOCK_UIDS
    across = {uid: b"e%d" % uid for uid in range(block - 2, block + 2)}        # two blocks
    kept.put_many(view, across)
    found = kept.found(view, [block - 1, block])
    assert found[block - 1] == b"e%d" % (block - 1) and found[block] == b"e%d" % block
    assert kept.found(other, [block]) == {}                                   # UTF8=ACCEPT: another view
    assert (1, 7, block, False) in kept and (1, 7, block, True) not in kept and (1, 8, block, False) not in kept
    assert kept.get((1, 7, block + 1, False)) == b"e%d" % (block + 1)
    kept.put((1, 7, block + 1, False), b"new")                                # replaced, octets recounted
    assert kept.get((1, 7, block + 1, False)) == b"new"
    assert kept.octets == sum(map(len, across.values())) - len(b"e%d" % (block + 1)) + 3
    kept.put_many(view, {3 * block: b"x" * 1000, 4 * block: b"y" * 1000})      # the first two blocks: least recent
    kept.put_many(view, {5 * block: b"z" * 1000})
    assert kept.octets <= 3 * 1000 and kept.found(view, [block - 2, block]) == {}
    assert kept.found(view, [5 * block]) == {5 * block: b"z" * 1000}


class _Store:
    """The two calls ``SelectedMailbox.updates`` makes, answering fixed changes."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes

    async def changes_since(self, folder: FolderRef, modseq: int) -> Changes:
        return self.changes

    async def claim_recent(self, folder: FolderRef, *, among: Collection[int] = ()) -> frozenset[int]:
        return frozenset()


def test_a_view_that_caught_up_holds_the_shared_array_again() -> None:
    old = array("I", [1, 2, 3])                          # the index's array when the session selected
    view = SelectedMailbox(ref=FolderRef(1, "INBOX", 7), name="INBOX", read_only=False, uidvalidity=7,
                           uids=old, modseq=5)
    current = array("I", [1, 3, 4])                      # the index now: 2 expunged, 4 arrived
    store = _Store(Changes(8, (FlagUpdate(4, frozenset(), 8),), (2,), uids=current))
    lines = asyncio.run(view.updates(store, allow_expunge=False))     # type: ignore[arg-type]
    assert lines == [b"* 4 EXISTS\r\n", b"* 0 RECENT\r\n"]
    assert list(view.uids) == [1, 2, 3, 4] and view.uids is not current   # 2 still pending: its own copy
    assert list(old) == [1, 2, 3]                        # the shared array was never written to
    store.changes = Changes(8, (), (), uids=current)     # nothing new since MODSEQ 8
    lines = asyncio.run(view.updates(store, allow_expunge=True))      # type: ignore[arg-type]
    assert lines == [b"* 2 EXPUNGE\r\n"]
    assert view.uids is current                          # caught up: shares the store's array again

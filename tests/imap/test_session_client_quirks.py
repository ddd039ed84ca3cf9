"""One test per client quirk found in peers' issue trackers (research/peers.md, section B)."""

from __future__ import annotations

import re

from tests.imap.imap_server import STORES, Conversation, RunningImap, imap, make_message  # noqa: F401 (fixture)

pytestmark = STORES     # against SqlMailStore and MemoryMailStore


def test_thunderbird_uid_first_in_fetch(imap: RunningImap) -> None:  # noqa: F811
    """proton-bridge#204: Thunderbird shows the wrong message unless UID comes first."""
    account = imap.new_account()
    imap.deliver(account.address, make_message("un"))
    session, other = Conversation(imap, account), Conversation(imap, account)
    session.command("SELECT INBOX")
    other.command("SELECT INBOX")
    assert session.command("UID FETCH 1 (FLAGS RFC822.SIZE UID)")[0].startswith("* 1 FETCH (UID 1 FLAGS")
    assert session.command("STORE 1 +FLAGS (\\Answered)")[0].startswith("* 1 FETCH (UID 1 FLAGS")
    other.command("STORE 1 +FLAGS (\\Flagged)")
    unsolicited = [line for line in session.command("NOOP") if "FETCH" in line]
    assert unsolicited and all(line.startswith("* 1 FETCH (UID 1 ") for line in unsolicited)
    session.close()
    other.close()


def test_thunderbird_opens_many_connections(imap: RunningImap) -> None:  # noqa: F811
    """stalwart#190: about five connections per account must simply work."""
    account = imap.new_account()
    sessions = [Conversation(imap, account) for _ in range(8)]
    for session in sessions:
        session.command("SELECT INBOX")
    for session in sessions:
        session.command("LOGOUT")
        session.close()


def test_outlook_search_or(imap: RunningImap) -> None:  # noqa: F811
    """proton-bridge#185: the new Outlook for Mac sends nested SEARCH OR."""
    account = imap.new_account()
    imap.deliver(account.address, make_message("Ordonnance", sender="a@x.localhost"))
    imap.deliver(account.address, make_message("Radio", sender="b@y.localhost"))
    imap.deliver(account.address, make_message("Autre", sender="c@z.localhost"))
    session = Conversation(imap, account)
    session.command("SELECT INBOX")
    lines = session.command('UID SEARCH OR OR FROM "a@x" SUBJECT radio (TO nobody) NOT DELETED')
    assert lines[0] == "* SEARCH 1 2"
    session.close()


def test_apple_mail_special_use(imap: RunningImap) -> None:  # noqa: F811
    """mox#66: without special-use on a plain LIST, Apple Mail makes "Sent Messages" beside Sent."""
    session = Conversation(imap, imap.new_account())
    listed = session.command('LIST "" "*"')
    attributes = {match.group(2): match.group(1) for line in listed
                  if (match := re.fullmatch(r'\* LIST \((.*)\) "/" (\S+)', line))}
    assert "\\Sent" in attributes["Sent"] and "\\Trash" in attributes["Trash"]
    assert "\\Drafts" in attributes["Drafts"] and "\\Junk" in attributes["Junk"]
    assert "\\Archive" in attributes["Archive"]
    session.close()


def test_outlook_never_finds_a_noselect_parent(imap: RunningImap) -> None:  # noqa: F811
    """cyrus#2990: Outlook loses mail filed into \\Noselect parents; ours are real folders."""
    session = Conversation(imap, imap.new_account())
    session.command("CREATE Patients/2024/Janvier")
    listed = session.command('LIST "" "Patients*"')
    assert len(listed) == 4 and not any("\\Noselect" in line for line in listed)
    session.command('APPEND Patients {5+}\r\nHello')
    session.close()


def test_mbsync_logout_closes_the_connection(imap: RunningImap) -> None:  # noqa: F811
    """mox#30: the connection is closed cleanly right after LOGOUT's tagged OK."""
    session = Conversation(imap)
    lines = session.command("LOGOUT")
    assert lines[0].startswith("* BYE")
    assert session.runner.sock.recv(1) == b""
    session.close()

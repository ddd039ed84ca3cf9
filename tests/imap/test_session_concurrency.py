"""Two sessions on the same mailbox see each other's changes, at the points RFC 3501 allows."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from tests.imap.imap_server import STORES, Conversation, RunningImap, imap, make_message  # noqa: F401 (fixture)

pytestmark = STORES     # against SqlMailStore and MemoryMailStore


def test_expunge_by_another_session_waits_for_a_command_that_allows_it(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    for n in range(3):
        imap.deliver(account.address, make_message(f"m{n}"))
    reader, writer = Conversation(imap, account), Conversation(imap, account)
    reader.command("SELECT INBOX")
    writer.command("SELECT INBOX")
    writer.command("STORE 2 +FLAGS.SILENT (\\Deleted)")
    writer.command("EXPUNGE")
    # RFC 3501 7.4.1: no EXPUNGE while answering FETCH; message 2 keeps its number meanwhile.
    lines = reader.command("FETCH 1:3 (UID)")
    assert not any(line.endswith(" EXPUNGE") for line in lines)
    assert lines[0] == "* 1 FETCH (UID 1)" and lines[1] == "* 3 FETCH (UID 3)"
    assert lines[2].endswith("OK [EXPUNGEISSUED] Some messages were already expunged")   # RFC 5530 3
    lines = reader.command("SEARCH ALL")
    assert not any(line.endswith(" EXPUNGE") for line in lines)
    # NOOP may: the expunge is reported once, and numbers shift.
    lines = reader.command("NOOP")
    assert lines[:1] == ["* 2 EXPUNGE"]
    assert reader.command("FETCH 2 (UID)")[0] == "* 2 FETCH (UID 3)"
    reader.close()
    writer.close()


def test_uid_fetch_may_report_expunges(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    for n in range(2):
        imap.deliver(account.address, make_message(f"m{n}"))
    reader, writer = Conversation(imap, account), Conversation(imap, account)
    reader.command("SELECT INBOX")
    writer.command("SELECT INBOX")
    writer.command("UID STORE 1 +FLAGS.SILENT (\\Deleted)")
    writer.command("UID EXPUNGE 1")
    lines = reader.command("UID FETCH 1:* (FLAGS)")
    # The answer uses the numbers the client knows, then reports the expunge (allowed: a UID command).
    assert lines[0] == "* 2 FETCH (UID 2 FLAGS (\\Recent))"
    assert lines[1] == "* 1 EXPUNGE"


def test_flag_changes_and_new_mail_are_seen_by_the_other_session(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    imap.deliver(account.address, make_message("first"))
    first, second = Conversation(imap, account), Conversation(imap, account)
    first.command("SELECT INBOX")
    second.command("SELECT INBOX")
    second.command("STORE 1 +FLAGS (\\Flagged)")
    imap.deliver(account.address, make_message("second"))
    lines = first.command("NOOP")
    # UID first in every unsolicited FETCH (proton-bridge#204).
    assert any(re.fullmatch(r"\* 1 FETCH \(UID 1 FLAGS \(\\Flagged( \\Recent)?\)\)", line) for line in lines), lines
    assert "* 2 EXISTS" in lines
    # The session that made the change is not told again.
    assert not any("FETCH" in line for line in second.command("NOOP"))
    first.close()
    second.close()


def test_idle_wakes_on_delivery_and_on_flag_change(imap: RunningImap,  # noqa: F811
                                                   record_property: Callable[[str, object], None]) -> None:
    account = imap.new_account()
    imap.deliver(account.address, make_message("already there"))
    idler, other = Conversation(imap, account), Conversation(imap, account)
    idler.command("SELECT INBOX")
    other.command("SELECT INBOX")
    idler.send("i1 IDLE")
    assert idler.line() == "+ idling"
    started = time.monotonic()
    threading.Thread(target=imap.deliver, args=(account.address, make_message("new report"))).start()
    assert idler.line() == "* 2 EXISTS"
    delivery_latency = time.monotonic() - started
    assert re.fullmatch(r"\* \d RECENT", idler.line())
    started = time.monotonic()
    other.command("STORE 1 +FLAGS (\\Seen)")
    line = idler.line()
    flag_latency = time.monotonic() - started
    assert re.fullmatch(r"\* 1 FETCH \(UID 1 FLAGS \(\\Seen( \\Recent)?\)\)", line), line
    idler.send("DONE")
    assert idler.line() == "i1 OK IDLE terminated"
    # Reported, not asserted (no timing assertions): the generous deadline is the socket timeout.
    record_property("idle_delivery_latency_s", round(delivery_latency, 4))
    record_property("idle_flag_latency_s", round(flag_latency, 4))
    print(f"IDLE wake-up latency: delivery {delivery_latency * 1000:.1f} ms, flag change {flag_latency * 1000:.1f} ms")
    idler.close()
    other.close()


def test_folder_deleted_under_a_selected_session(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    first, second = Conversation(imap, account), Conversation(imap, account)
    first.command("CREATE Temporaire")
    imap.deliver(account.address, make_message("x"), folder="Temporaire")
    first.command("SELECT Temporaire")
    second.command("DELETE Temporaire")
    second.command("CREATE Temporaire")
    first.send("t9 FETCH 1 (FLAGS)")
    assert first.line() == "* BYE Selected mailbox was deleted or renamed"
    first.close()
    second.close()


def test_folder_deleted_elsewhere_ends_the_selecting_session_with_bye(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    first, second = Conversation(imap, account), Conversation(imap, account)
    first.command("CREATE Provisoire")
    first.command("SELECT Provisoire")
    second.command("DELETE Provisoire")
    first.send("t9 NOOP")
    assert first.line() == "* BYE Selected mailbox was deleted or renamed"
    assert first.runner.sock.recv(1) == b""
    second.command("NOOP")
    first.close()
    second.close()


def test_renaming_the_selected_folder_keeps_it_selected(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    session = Conversation(imap, account)
    session.command("CREATE Avant")
    imap.deliver(account.address, make_message("dedans"), folder="Avant")
    session.command("SELECT Avant")
    session.command("RENAME Avant Apres")
    assert session.command("UID FETCH 1 (UID)")[0] == "* 1 FETCH (UID 1)"
    assert session.command("STATUS Apres (MESSAGES)")[0] == "* STATUS Apres (MESSAGES 1)"
    session.close()


def test_changes_no_hub_announced_are_still_reported(imap: RunningImap) -> None:  # noqa: F811
    """A writer whose changes this process's hub never hears of (another process on the same database, say
    ``gateway mailbox import``): NOOP always asks the store (RFC 3501 6.1.2), and any command does once
    ``UPDATES_RECHECK_SECONDS`` have passed since the last look."""
    import pytest

    from gateway.imap.session import UPDATES_RECHECK_SECONDS
    from gateway.mailstore.interface import INBOX, FolderRef
    from gateway.mailstore.notify import ChangeHub
    from gateway.mailstore.sql import SqlMailStore

    if not isinstance(imap.store, SqlMailStore):
        pytest.skip("another process's writes need a shared database")
    account = imap.new_account()
    imap.deliver(account.address, make_message("first"))
    session = Conversation(imap, account)
    session.command("SELECT INBOX")
    elsewhere = SqlMailStore(imap.store.database, imap.store.blobs, ChangeHub())   # publishes to nobody here
    folder = FolderRef(imap.mailbox_ids[account.address], INBOX)
    imap.run(elsewhere.append(folder, make_message("second")))
    assert "* 2 EXISTS" in session.command("NOOP")
    imap.run(elsewhere.append(folder, make_message("third")))
    time.sleep(UPDATES_RECHECK_SECONDS + 0.1)
    assert "* 3 EXISTS" in session.command("STATUS INBOX (MESSAGES)")
    session.close()


def test_own_store_then_another_sessions_change_is_reported(imap: RunningImap) -> None:  # noqa: F811
    """A session's own STORE needs no look for changes afterwards, but a change another session makes
    meanwhile is still reported at the next command (RFC 3501 7.4.1: FETCH flags of other sessions)."""
    account = imap.new_account()
    for n in range(2):
        imap.deliver(account.address, make_message(f"m{n}"))
    mine, other = Conversation(imap, account), Conversation(imap, account)
    mine.command("SELECT INBOX")
    other.command("SELECT INBOX")
    assert mine.command("STORE 1 +FLAGS (\\Flagged)")[0].startswith("* 1 FETCH (UID 1 FLAGS (\\Flagged")
    other.command("STORE 2 +FLAGS.SILENT (\\Answered)")
    lines = mine.command("STORE 1 -FLAGS.SILENT (\\Flagged)")
    assert any(line.startswith("* 2 FETCH (UID 2 FLAGS (\\Answered") for line in lines), lines
    assert not any(line.startswith("* 1 FETCH") for line in mine.command("NOOP"))   # its own: not repeated
    mine.close()
    other.close()

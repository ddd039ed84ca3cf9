"""Full then incremental two-way synchronisation with mbsync (isync) and offlineimap.

The IMAP issue's "Done when": both clients do a full two-way sync of a mailbox of a few
hundred messages, then an incremental one after changes on both sides.  Each test:

1. delivers 300 messages (200 in INBOX, 100 in Archive), some already \\Seen or \\Flagged;
2. first sync: the local Maildir holds every message, with the server's flags;
3. changes on both sides: on the server (imaplib) 20 new deliveries, \\Seen and \\Flagged set
   on some, a few expunged; locally, \\Seen and \\Flagged set by renaming maildir files, a few
   deleted (flag T for mbsync, file removed for offlineimap) and new messages filed;
4. second sync: server and Maildir hold the same subjects with the same flags, which are the
   expected ones, nothing duplicated;
5. a third sync changes nothing on either side (same files, same UIDs).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.directory.demo import DemoAccount
from tests.imap.imap_server import RunningImap, imap, make_message  # noqa: F401 (fixture)
from tests.imap.test_clients_cli import _mbsync_config, _offlineimap_config, _require, _run

FOLDERS = {"INBOX": 200, "Archive": 100}
MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}
LETTERS = {flag: letter for letter, flag in MAILDIR_FLAGS.items()}
State = dict[str, frozenset[str]]


def _subject(folder: str, index: int) -> str:
    return f"{folder} message {index:03d}"


# --- reading both sides ------------------------------------------------------------------------

def _server_state(imap: RunningImap, account: DemoAccount, folder: str) -> tuple[State, dict[str, int]]:  # noqa: F811
    """Subject -> flags (without \\Recent) and subject -> UID of every message in ``folder``;
    fails on a duplicated subject."""
    client = imap.login(account)
    try:
        _, count = client.select(folder, readonly=True)
        subjects: list[str] = []
        state: State = {}
        uids: dict[str, int] = {}
        if int(count[0] or 0) > 0:
            _, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            for item in data:
                if not isinstance(item, tuple):
                    continue
                flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
                uid = re.search(rb"UID (\d+)", item[0])
                assert flags is not None and uid is not None, item[0]
                subject = item[1].decode().strip().removeprefix("Subject: ")
                subjects.append(subject)
                state[subject] = frozenset(flags.group(1).decode().split()) - {"\\Recent"}
                uids[subject] = int(uid.group(1))
    finally:
        client.logout()
    duplicated = [subject for subject, n in Counter(subjects).items() if n > 1]
    assert not duplicated, f"server {folder}: duplicated {duplicated}"
    return state, uids


def _maildir_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("cur/*"), *folder.glob("new/*")])


def _maildir_state(folder: Path) -> tuple[State, dict[str, Path]]:
    """Subject -> flags (from the ``:2,`` info) and subject -> file; fails on a duplicate."""
    state: State = {}
    paths: dict[str, Path] = {}
    subjects: list[str] = []
    for path in _maildir_files(folder):
        found = re.search(rb"^Subject: (.*?)\r?$", path.read_bytes(), re.MULTILINE)
        assert found is not None, path
        subject = found.group(1).decode()
        subjects.append(subject)
        state[subject] = _maildir_flags(path)
        paths[subject] = path
    duplicated = [subject for subject, n in Counter(subjects).items() if n > 1]
    assert not duplicated, f"maildir {folder.name}: duplicated {duplicated}"
    return state, paths


def _maildir_flags(path: Path) -> frozenset[str]:
    info = path.name.split(":2,", 1)[1] if ":2," in path.name else ""
    return frozenset(MAILDIR_FLAGS[letter] for letter in info if letter in MAILDIR_FLAGS)


def _set_maildir_flags(path: Path, flags: frozenset[str]) -> None:
    """Rename a maildir file into cur/ with the ``:2,`` info for ``flags`` (letters sorted)."""
    info = "".join(sorted(LETTERS[flag] for flag in flags))
    path.rename(path.parent.parent / "cur" / f"{path.name.split(':2,')[0]}:2,{info}")


def _store(imap: RunningImap, account: DemoAccount, folder: str, uids: list[int], flags: str,  # noqa: F811
           *, expunge: bool = False) -> None:
    client = imap.login(account)
    try:
        client.select(folder)
        typ, _ = client.uid("STORE", ",".join(map(str, uids)), "+FLAGS.SILENT", f"({flags})")
        assert typ == "OK"
        if expunge:
            assert client.expunge()[0] == "OK"
    finally:
        client.logout()


# --- the scenario -------------------------------------------------------------------------------

def _two_way_scenario(imap: RunningImap, account: DemoAccount, mail: Path, sync: Callable[[], object],  # noqa: F811
                      delete_locally: Callable[[Path], None]) -> None:
    expected: dict[str, State] = {folder: {} for folder in FOLDERS}
    uids: dict[str, dict[str, int]] = {folder: {} for folder in FOLDERS}
    for folder, count in FOLDERS.items():
        for index in range(count):
            subject = _subject(folder, index)
            uids[folder][subject] = imap.deliver(account.address, make_message(subject), folder=folder)
            expected[folder][subject] = frozenset()
    # Some flags already set on the server before the first sync.
    for folder, count in FOLDERS.items():
        seen = [_subject(folder, i) for i in range(0, count, 7)]
        flagged = [_subject(folder, i) for i in range(0, count, 11)]
        _store(imap, account, folder, [uids[folder][s] for s in seen], "\\Seen")
        _store(imap, account, folder, [uids[folder][s] for s in flagged], "\\Flagged")
        for subject in seen:
            expected[folder][subject] |= {"\\Seen"}
        for subject in flagged:
            expected[folder][subject] |= {"\\Flagged"}

    # 1. Full sync: every message arrives locally with the server's flags.
    sync()
    for folder, count in FOLDERS.items():
        local, _ = _maildir_state(mail / folder)
        server, _ = _server_state(imap, account, folder)
        assert server == expected[folder]
        assert len(_maildir_files(mail / folder)) == count
        assert {_subject(folder, i) for i in (0, 1, count // 2, count - 1)} <= local.keys()
        assert local == expected[folder], folder

    # 2. Changes on both sides, on disjoint messages.
    for folder, count in FOLDERS.items():
        # Server: 10 new deliveries per folder, \Seen and \Flagged on some, a few expunged.
        for index in range(count, count + 10):
            subject = _subject(folder, index)
            imap.deliver(account.address, make_message(subject), folder=folder)
            expected[folder][subject] = frozenset()
        seen = [_subject(folder, i) for i in range(20, 30)]
        flagged = [_subject(folder, i) for i in range(25, 35)]
        doomed = [_subject(folder, i) for i in range(40, 44)]
        _store(imap, account, folder, [uids[folder][s] for s in seen], "\\Seen")
        _store(imap, account, folder, [uids[folder][s] for s in flagged], "\\Flagged")
        _store(imap, account, folder, [uids[folder][s] for s in doomed], "\\Deleted", expunge=True)
        for subject in seen:
            expected[folder][subject] |= {"\\Seen"}
        for subject in flagged:
            expected[folder][subject] |= {"\\Flagged"}
        for subject in doomed:
            del expected[folder][subject]
        # Locally: \Seen and \Flagged on others (one of them already \Seen: 56 = 7 * 8), a few
        # deleted, new messages filed in new/.
        _, paths = _maildir_state(mail / folder)
        for index in range(50, 60):
            subject = _subject(folder, index)
            expected[folder][subject] |= {"\\Seen"} | ({"\\Flagged"} if index >= 55 else set())
            _set_maildir_flags(paths[subject], expected[folder][subject])
        for index in range(60, 64):
            delete_locally(paths[_subject(folder, index)])
            del expected[folder][_subject(folder, index)]
        for index in range(5):
            subject = f"{folder} local {index}"
            (mail / folder / "new" / f"{int(time.time())}.L{index}.{folder}.local").write_bytes(make_message(subject))
            expected[folder][subject] = frozenset()

    # 3. Incremental sync: both sides converge on the expected state.
    sync()
    snapshot: dict[str, tuple[State, dict[str, int], list[str]]] = {}
    for folder, count in FOLDERS.items():
        local, _ = _maildir_state(mail / folder)
        server, server_uids = _server_state(imap, account, folder)
        assert len(expected[folder]) == count + 10 - 4 - 4 + 5
        assert server == expected[folder], folder
        assert local == expected[folder], folder
        snapshot[folder] = (server, server_uids, [p.name for p in _maildir_files(mail / folder)])

    # 4. A third sync changes nothing on either side.
    sync()
    for folder in FOLDERS:
        server, server_uids = _server_state(imap, account, folder)
        assert (server, server_uids, [p.name for p in _maildir_files(mail / folder)]) == snapshot[folder]


# --- mbsync --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mbsync_full_then_incremental_two_way_sync(imap: RunningImap, tmp_path: Path) -> None:  # noqa: F811
    mbsync = _require("mbsync")
    account = imap.new_account()
    mail = tmp_path / "mail"
    mail.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(_mbsync_config(imap, account, mail))

    def delete_locally(path: Path) -> None:    # mbsync propagates the T flag, then expunges both sides
        _set_maildir_flags(path, _maildir_flags(path) | {"\\Deleted"})

    _two_way_scenario(imap, account, mail, lambda: _run([mbsync, "-c", str(config), "-a"]), delete_locally)


# --- offlineimap ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_offlineimap_full_then_incremental_two_way_sync(imap: RunningImap, tmp_path: Path) -> None:  # noqa: F811
    offlineimap = _require("offlineimap")
    account = imap.new_account()
    mail = tmp_path / "mail"
    config = tmp_path / "offlineimaprc"
    config.write_text(_offlineimap_config(imap, account, mail, tmp_path / "meta"))
    _two_way_scenario(imap, account, mail, lambda: _run([offlineimap, "-c", str(config), "-o", "-u", "basic"],
                                                        timeout=180), Path.unlink)

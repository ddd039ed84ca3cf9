"""Every file the gateway writes is 0600 and every folder 0700, whatever the umask it is started with:
the database and its -wal/-shm, blobs, spool, run/, keys, pki, exports. Checked on a real ``gateway serve``
started with umask 022 that has delivered a message, and on the places that create files themselves."""

from __future__ import annotations

import os
import smtplib
import sqlite3
import ssl
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.storage.db import Database
from gateway.storage.private import MODES_CHECKED, secure_data_dir, secure_tree
from tests.harness import GatewayProcess


@contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def loose_modes(root: Path) -> list[str]:
    """Everything under ``root`` that another local user could read or enter."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory) / name
            mode = path.lstat().st_mode
            expected = 0o700 if stat.S_ISDIR(mode) else 0o600
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) != expected:
                found.append(f"{path.relative_to(root)} {oct(stat.S_IMODE(mode))}")
    if stat.S_IMODE(root.stat().st_mode) != 0o700:
        found.append(f". {oct(stat.S_IMODE(root.stat().st_mode))}")
    return found


def test_serve_under_umask_022_writes_nothing_others_can_read(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "data")
    with umask(0o022):
        gateway.init_demo()
        # What an older version (or an operator's cp -r) left behind is brought back at start.
        (gateway.data_dir / "blobs").chmod(0o755)
        (gateway.data_dir / "demo.json").chmod(0o644)
        (gateway.data_dir / "gateway.db").chmod(0o644)
        (gateway.data_dir / "pki" / "ca").chmod(0o755)
        gateway.start()
        try:
            doctor, colleague = gateway.account("PER"), gateway.account("PER", 1)
            context = ssl.create_default_context(cafile=gateway.ca_file)
            with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["smtp_submissions_port"], context=context,
                                  timeout=30) as client:
                client.login(doctor["address"], doctor["password"])
                client.sendmail(doctor["address"], [colleague["address"]],
                                f"From: {doctor['address']}\r\nTo: {colleague['address']}\r\nSubject: modes\r\n\r\n"
                                "Compte rendu.\r\n")
            _wait_for_delivery(gateway.data_dir)
            export = gateway.cli("audit", "export", str(gateway.data_dir / "audit-export.jsonl"))
            assert export.returncode == 0, export.stderr
            written = {path.name for path in gateway.data_dir.rglob("*")}
            assert {"gateway.db", "gateway.db-wal", "gateway.db-shm", "ready.json", "audit-export.jsonl"} <= written
            assert loose_modes(gateway.data_dir) == []
        finally:
            gateway.stop()
    assert loose_modes(gateway.data_dir) == []


def _wait_for_delivery(data_dir: Path, attempts: int = 300) -> None:
    """Until a message is in a mailbox (its body a blob file, or sealed in the database when small) and the
    spool queue is empty."""
    for _ in range(attempts):
        with sqlite3.connect(f"file:{data_dir / 'gateway.db'}?mode=ro", uri=True) as connection:
            messages = connection.execute("SELECT count(*) FROM mail_messages").fetchone()[0]
        if messages and not any((data_dir / "spool" / "queue").iterdir()):
            return
        time.sleep(0.1)
    raise AssertionError("the message was not delivered")


async def test_the_database_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    with umask(0):
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'db' / 'gateway.db'}")
        try:
            await database.migrate()
        finally:
            await database.dispose()
    assert loose_modes(tmp_path / "db") == []


def test_secure_tree_fixes_modes_and_leaves_links_alone(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True, mode=0o755)
    (tmp_path / "a" / "file").write_text("x")
    (tmp_path / "a" / "file").chmod(0o664)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_text("not ours")
    outside.chmod(0o644)
    (tmp_path / "a" / "link").symlink_to(outside)
    assert secure_tree(tmp_path / "a") >= 3
    assert loose_modes(tmp_path / "a") == []
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644


def _loose_data_dir(root: Path) -> Path:
    """A data directory as an older version or an operator's ``cp -r`` under umask 022 would leave it."""
    blob = root / "blobs" / "ab" / "cd" / "blob"
    blob.parent.mkdir(parents=True)
    (root / "pki" / "ca").mkdir(parents=True)
    for path, mode in ((blob, 0o644), (root / "pki" / "ca" / "ca.key", 0o644), (root / "gateway.db", 0o644)):
        path.write_text("x")
        path.chmod(mode)
    for directory in (root, root / "blobs", root / "blobs" / "ab", root / "blobs" / "ab" / "cd", root / "pki" / "ca"):
        directory.chmod(0o755)
    return blob


def test_the_first_start_walks_the_data_directory_whole_and_later_starts_skip_the_blobs(tmp_path: Path) -> None:
    root = tmp_path / "data"
    blob = _loose_data_dir(root)
    assert secure_data_dir(root) == 9                 # no marker yet: every blob checked (and pki/)
    assert loose_modes(root) == []
    assert stat.S_IMODE((root / MODES_CHECKED).stat().st_mode) == 0o600

    for directory in (root, root / "blobs", root / "blobs" / "ab", root / "blobs" / "ab" / "cd", root / "pki" / "ca"):
        directory.chmod(0o755)
    for path in (blob, root / "pki" / "ca" / "ca.key", root / "gateway.db"):
        path.chmod(0o644)
    secure_data_dir(root)                             # a later start: the blob trees below two levels are not walked
    assert loose_modes(root) == ["blobs/ab/cd 0o755", "blobs/ab/cd/blob 0o644"]
    # ...but nothing below the data directory can be reached by another user: it is 0700 again.
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    secure_data_dir(root, whole=True)                 # gateway db upgrade
    assert loose_modes(root) == []


def test_removing_the_marker_asks_for_a_whole_walk(tmp_path: Path) -> None:
    root = tmp_path / "data"
    blob = _loose_data_dir(root)
    secure_data_dir(root)
    blob.chmod(0o644)
    (root / MODES_CHECKED).unlink()
    assert secure_data_dir(root) == 1
    assert loose_modes(root) == []

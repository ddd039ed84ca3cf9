"""The acceptance path keeps routes and S/MIME policy answers between transactions, and must never serve a
stale one: any change to the directory, by the CLI in another process or by plain SQL, is seen by the next
transaction on a connection that has already used the old answer (gateway.directory.generation)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from tests.harness import GatewayProcess
from tests.smtp.conftest import Transcript
from tests.smtp.doors import login, open_door

SUBJECT_BODY = "Subject: cache probe\r\n\r\nbody\r\n."


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("acceptance-cache") / "data")
    process.start()
    yield process
    process.stop()


def _send(t: Transcript, sender: str, recipient: str, expected_rcpt: str) -> None:
    t.c(f"MAIL FROM:<{sender}>");    t.s(r"250 2\.1\.0 .*")        
    t.c(f"RCPT TO:<{recipient}>");   t.s(expected_rcpt)             
    if expected_rcpt.startswith("250"):
        t.c("DATA");                 t.s(r"354 .*")
        t.c(f"From: <{sender}>\r\n{SUBJECT_BODY}");  t.s(r"250 2\.0\.0 .*") 
    else:
        t.c("RSET");                 t.s(r"250 .*")


def test_mailbox_disabled_by_the_cli_is_refused_on_the_next_transaction(served: GatewayProcess) -> None:
    sender, recipient = served.account("PER", 0), served.account("PER", 1)["address"]
    t = open_door(served, "smtp_submission_port")
    login(t, sender)
    _send(t, sender["address"], recipient, r"250 2\.1\.5 .*")        # the route is now cached
    served.cli("mailbox", "disable", recipient, check=True)           # another process changes the directory
    try:
        _send(t, sender["address"], recipient, rf"550 5\.2\.1 .*{recipient.split('@')[0]}.*disabled")
    finally:
        served.cli("mailbox", "enable", recipient, check=True)
    _send(t, sender["address"], recipient, r"250 2\.1\.5 .*")        # and enabled again, at once


def test_mailbox_changed_by_plain_sql_is_seen_by_the_next_transaction(served: GatewayProcess) -> None:
    """Triggers, not the gateway's own code paths, bump the generation: an operator's SQL counts too."""
    sender, recipient = served.account("PER", 0), served.account("PER", 1)["address"]
    t = open_door(served, "smtp_submission_port")
    login(t, sender)
    _send(t, sender["address"], recipient, r"250 2\.1\.5 .*")
    with sqlite3.connect(served.data_dir / "gateway.db", timeout=30) as conn:
        conn.execute("UPDATE mailboxes SET address = 'renamed.' || address WHERE address = ?", (recipient,))
    try:
        _send(t, sender["address"], recipient, r"550 5\.1\.1 No mailbox .* here")
    finally:
        with sqlite3.connect(served.data_dir / "gateway.db", timeout=30) as conn:
            conn.execute("UPDATE mailboxes SET address = ? WHERE address = ?", (recipient, "renamed." + recipient))
    _send(t, sender["address"], recipient, r"250 2\.1\.5 .*")


def test_unknown_mailbox_created_later_is_accepted(served: GatewayProcess) -> None:
    """A cached refusal is dropped too: the mailbox created after it is reachable on the same connection."""
    sender = served.account("PER", 0)
    t = open_door(served, "smtp_submission_port")
    login(t, sender)
    recipient = served.account("PER", 1)["address"]
    ghost = "later." + recipient
    _send(t, sender["address"], ghost, r"550 5\.1\.1 No mailbox .* here")
    with sqlite3.connect(served.data_dir / "gateway.db", timeout=30) as conn:
        conn.execute("UPDATE mailboxes SET address = ? WHERE address = ?", (ghost, recipient))
    try:
        _send(t, sender["address"], ghost, r"250 2\.1\.5 .*")
    finally:
        with sqlite3.connect(served.data_dir / "gateway.db", timeout=30) as conn:
            conn.execute("UPDATE mailboxes SET address = ? WHERE address = ?", (recipient, ghost))

"""DoorAudit's folding on a real audit log: one entry per refusal and minute, and no folded count lost.

The same refusal (door, address, login, command, reason, reply) repeated
within the window is one entry; its count is written by the next entry for it
after the window, by a summary once the window is over (at the next refusal of
any kind), or by ``flush`` when the gateway stops. Other refusals are not
folded into it. The chain verifies.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.audit import AuditEvent, AuditLog
from gateway.audit.chain import AuditKey
from gateway.config import Settings
from gateway.directory.service import Account
from gateway.imap.protocol.reader import RawCommand
from gateway.imap.server import UserConnectionLimiter
from gateway.imap.session import Session, SessionContext
from gateway.mailstore.interface import FolderRef, FolderSnapshot
from gateway.mailstore.memory import MemoryMailStore
from gateway.security import door_audit
from gateway.security.door_audit import DoorAudit
from gateway.storage.db import Database
from gateway.webmail.boundary import door_boundary
from gateway.webmail.keys import WebmailKey
from gateway.webmail.sessions import SessionStore
from gateway.webmail.web import CONTEXT, WebmailContext, error_pages, template_environment

KEY = AuditKey(bytes(range(32)))
REPLY = "NO [NONEXISTENT] No such mailbox"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(database: Database) -> AuditLog:
    return AuditLog(database, KEY)


async def refusals(log: AuditLog) -> list[dict[str, Any]]:
    entries = await log.search(events=[AuditEvent.DOOR_REFUSED], limit=1000)
    return [dict(entry.details) for entry in reversed(entries)]


async def refuse(audit: DoorAudit, *, ip: str = "192.0.2.1", login: str | None = "a@demo.test",
                 reason: str = "traversal", detail: str = 'SELECT "../b/INBOX"') -> None:
    await audit.refused("imap", ip, login, REPLY, detail, reason=reason, command="SELECT")


async def test_a_flood_is_one_entry_and_the_next_one_after_the_window_carries_the_count(log: AuditLog) -> None:
    clock = Clock()
    audit = DoorAudit(log, clock=clock)
    for _ in range(10):
        await refuse(audit)
        clock.now += 1
    assert [d.get("repeated") for d in await refusals(log)] == [None]
    clock.now += 60
    await refuse(audit)
    assert [d.get("repeated") for d in await refusals(log)] == [None, 9]
    assert (await log.verify()).ok


async def test_other_refusals_are_not_folded_into_it(log: AuditLog) -> None:
    audit = DoorAudit(log, clock=Clock())
    await refuse(audit)
    await refuse(audit, ip="192.0.2.2")                 # another address
    await refuse(audit, login="c@demo.test")            # another login behind the same address
    await refuse(audit, reason="address")               # another rule
    await refuse(audit, detail='SELECT "../c/INBOX"')   # the same rule, another name: folded
    details = await refusals(log)
    assert [d["reason"] for d in details] == ["traversal", "traversal", "traversal", "address"]
    assert all(d["command"] == "SELECT" and d["reply"] == REPLY for d in details)


async def test_a_count_left_folded_is_written_once_its_window_is_over_or_at_flush(log: AuditLog) -> None:
    clock = Clock()
    audit = DoorAudit(log, clock=clock)
    for _ in range(5):
        await refuse(audit)
    clock.now += 61
    await refuse(audit, ip="192.0.2.9")                 # any later refusal writes the expired count
    details = await refusals(log)
    assert [(d.get("repeated"), d.get("folded")) for d in details] == [(None, None), (4, "summary"), (None, None)]
    for _ in range(3):
        await refuse(audit, ip="192.0.2.9")
    await audit.flush()                                 # the gateway stops
    await audit.flush()                                 # nothing twice
    details = await refusals(log)
    assert [(d.get("repeated"), d.get("folded")) for d in details][3:] == [(3, "summary")]
    assert (await log.verify()).ok



async def test_a_refusal_forgotten_to_make_room_writes_its_count(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(door_audit, "MAX_TRACKED", 2)
    audit = DoorAudit(log, clock=Clock())
    for _ in range(3):
        await refuse(audit, ip="192.0.2.1")
    await refuse(audit, ip="192.0.2.2")
    await refuse(audit, ip="192.0.2.3")                 # room for two: the first is forgotten, its count written
    details = await refusals(log)
    assert [(d.get("repeated"), d.get("folded")) for d in details] == [(None, None), (None, None), (2, "summary"),
                                                                        (None, None)]

# --------------------------------------------------------------------------- faults at the IMAP and webmail doors
# A fault cannot be caused from outside on purpose (that would be a bug to fix), so a component is made to fail
# here, in process, behind each door's real boundary.


class BrokenStore(MemoryMailStore):
    async def select(self, folder: FolderRef, *, read_only: bool = False) -> FolderSnapshot:
        raise RuntimeError("a bug in the store")


class Wire:
    """The transport side of an IMAP session: what was written."""

    peer_ip = "192.0.2.50"
    is_tls = True
    ssl_object = None

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        return None

    async def read_line(self) -> bytes:
        raise AssertionError("not read in this test")

    async def start_tls(self) -> None:
        raise AssertionError("no STARTTLS in this test")

    def discard_buffered_input(self) -> int:
        return 0


async def test_an_imap_command_failing_inside_is_serverbug_and_audited(log: AuditLog) -> None:
    store = BrokenStore()
    context = SessionContext(mailstore=store, hub=store.hub, directory=cast(Any, None),
                             limiter=UserConnectionLimiter(), door_audit=DoorAudit(log))
    wire = Wire()
    session = Session(wire, context, "C1")
    session.log_in(Account(7, "a@demo.test", "PER", None, frozenset(), frozenset()))
    await session.execute(RawCommand(b"a1 SELECT INBOX", "a1", 0))
    assert wire.written[-1] == b"a1 NO [SERVERBUG] Internal server error\r\n"
    [entry] = await log.search(events=[AuditEvent.COMMAND_FAILED])
    assert (entry.actor.id, entry.source.door, entry.source.ip) == ("a@demo.test", "imap", "192.0.2.50")
    assert entry.details == {"command": "SELECT", "error": "RuntimeError"}
    assert (entry.outcome.status, entry.outcome.reason) == ("error", "internal error in SELECT")  # not a refusal


async def test_a_webmail_page_failing_inside_is_a_500_and_audited(log: AuditLog, database: Database,
                                                                   settings: Settings, tmp_path: Path) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in a page")

    app = web.Application(middlewares=[error_pages, door_boundary])
    app[CONTEXT] = WebmailContext(services=SimpleNamespace(door_audit=DoorAudit(log)), settings=settings,
                                  sessions=SessionStore(database, settings.webmail),
                                  key=WebmailKey.load_or_create(tmp_path / "webmail.key"), limiter=None,
                                  templates=template_environment())
    app.router.add_get("/cassé", broken)
    async with TestClient(TestServer(app)) as client:
        answer = await client.get("/cassé")
        assert answer.status == 500
    [entry] = await log.search(events=[AuditEvent.COMMAND_FAILED])
    assert (entry.actor.kind, entry.source.door) == ("unauthenticated", "webmail")
    assert entry.details == {"command": "GET /cassé", "error": "RuntimeError"}
    assert entry.outcome.status == "error"

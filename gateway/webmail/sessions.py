"""Server-side webmail sessions: a random token in the cookie, its SHA-256 in ``webmail_sessions``.

A session goes through stages: ``second-factor`` (password accepted, TOTP or
recovery code expected), ``enrol`` (password accepted, TOTP to be set up) and
``signed-in``. Each step to a further stage issues a new token (the id is
rotated at sign-in: OWASP session fixation), and the old one stops working.
Idle and absolute timeouts come from ``[webmail]``; an expired row is deleted
when it is next presented.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Delete, and_, delete, or_, select, update

from gateway.config import WebmailSettings
from gateway.storage.db import Database
from gateway.storage.models import utcnow
from gateway.webmail.tables import WebmailSession

TOUCH_EVERY = dt.timedelta(seconds=30)  # last_seen_at is written at most this often


class Stage(enum.StrEnum):
    SECOND_FACTOR = "second-factor"
    ENROL = "enrol"
    SIGNED_IN = "signed-in"


@dataclass(frozen=True)
class ActiveSession:
    token_hash: str
    mailbox_id: int
    stage: Stage
    method: str
    created_at: dt.datetime
    last_seen_at: dt.datetime


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, db: Database, settings: WebmailSettings) -> None:
        self.db = db
        self.idle = dt.timedelta(minutes=settings.session_idle_minutes)
        self.absolute = dt.timedelta(hours=settings.session_absolute_hours)
        self.pending = dt.timedelta(minutes=settings.sign_in_pending_minutes)

    async def open(self, mailbox_id: int, stage: Stage, method: str, source_ip: str | None) -> str:
        """A new session; returns the token for the cookie (only its digest is stored)."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.db.session() as s:
            await s.execute(self._expired_rows(mailbox_id, now))   # the ones never presented again
            s.add(WebmailSession(token_hash=token_digest(token), mailbox_id=mailbox_id, stage=stage.value,
                                 method=method, source_ip=source_ip, created_at=now, last_seen_at=now))
        return token

    async def lookup(self, token: str) -> ActiveSession | None:
        """The live session for ``token``, or None (unknown, signed out, idle or too old: then deleted)."""
        digest = token_digest(token)
        now = utcnow()
        async with self.db.session() as s:
            row = await s.get(WebmailSession, digest)
            if row is None:
                return None
            if self._expired(row, now):
                await s.delete(row)
                return None
            if now - row.last_seen_at >= TOUCH_EVERY:
                row.last_seen_at = now
            return ActiveSession(row.token_hash, row.mailbox_id, Stage(row.stage), row.method, row.created_at,
                                 row.last_seen_at)

    def _expired_rows(self, mailbox_id: int, now: dt.datetime) -> Delete:
        signed_in = WebmailSession.stage == Stage.SIGNED_IN.value
        return delete(WebmailSession).where(WebmailSession.mailbox_id == mailbox_id, or_(
            and_(signed_in, or_(WebmailSession.last_seen_at < now - self.idle, WebmailSession.created_at < now - self.absolute)),
            and_(~signed_in, WebmailSession.created_at < now - self.pending)))

    def _expired(self, row: WebmailSession, now: dt.datetime) -> bool:
        if row.stage != Stage.SIGNED_IN.value:
            return now - row.created_at > self.pending
        return now - row.last_seen_at > self.idle or now - row.created_at > self.absolute

    async def advance(self, session: ActiveSession, stage: Stage, method: str, source_ip: str | None) -> str:
        """Replace ``session`` by a new one at ``stage`` (new token, new creation time); the old token dies."""
        await self.close(session)
        return await self.open(session.mailbox_id, stage, method, source_ip)

    async def close(self, session: ActiveSession) -> None:
        async with self.db.session() as s:
            await s.execute(delete(WebmailSession).where(WebmailSession.token_hash == session.token_hash))

    async def close_all(self, mailbox_id: int) -> int:
        """Sign out everywhere: every session of the mailbox ends. Returns how many there were."""
        async with self.db.session() as s:
            result = await s.execute(delete(WebmailSession).where(WebmailSession.mailbox_id == mailbox_id))
            return int(getattr(result, "rowcount", 0) or 0)

    async def count(self, mailbox_id: int) -> int:
        async with self.db.session() as s:
            rows = await s.scalars(select(WebmailSession.token_hash).where(WebmailSession.mailbox_id == mailbox_id))
            return len(rows.all())

    async def age(self, session: ActiveSession, by: dt.timedelta) -> None:
        """Move a session's clock back (tests of the timeouts use this rather than sleeping)."""
        async with self.db.session() as s:
            await s.execute(update(WebmailSession).where(WebmailSession.token_hash == session.token_hash).values(
                created_at=session.created_at - by, last_seen_at=session.last_seen_at - by))

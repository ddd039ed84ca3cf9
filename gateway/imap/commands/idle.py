"""IDLE (RFC 2177): wait for changes and report them as they happen, until the client says DONE.

The session subscribes to the change hub for its selected folder *before*
looking for changes, so nothing committed in between is missed.  A hub event
is only a hint: the session then asks the store for everything since its last
MODSEQ (``SelectedMailbox.updates``), with expunges allowed (no FETCH, STORE
or SEARCH is in progress, RFC 3501 7.4.1).  It also looks every
``idle_poll_seconds`` without a hint (changes from another node whose
notification was lost), and ends the connection after ``idle_timeout_seconds``
(RFC 2177 3: a client re-issues IDLE at least every 29 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from gateway.imap.commands.base import Completion
from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response
from gateway.imap.protocol.parser import parse_idle_done
from gateway.mailstore.notify import Subscription

if TYPE_CHECKING:
    from gateway.imap.session import Handler, Session


async def idle(session: Session, command: c.Command) -> Completion:
    subscription = _subscribe(session)
    done = asyncio.ensure_future(session.connection.read_line())
    try:
        session.write(response.continuation("idling"))
        await _report(session)
        await session.connection.drain()
        timed_out = await _wait_for_done(session, subscription, done)
    finally:
        done.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await done
        if subscription is not None:
            subscription.close()
    if timed_out:
        session.write(response.bye("IDLE for too long"))
        session.close()
        return Completion("IDLE terminated")
    return Completion("IDLE terminated")


def _subscribe(session: Session) -> Subscription | None:
    selected = session.selected
    if selected is None:
        return None
    return session.context.hub.subscribe(selected.ref.mailbox_id, selected.ref.name)


async def _wait_for_done(session: Session, subscription: Subscription | None, done: asyncio.Future[bytes]) -> bool:
    """Report changes until DONE arrives (False) or the IDLE lasted too long (True)."""
    settings = session.context.settings
    deadline = time.monotonic() + settings.idle_timeout_seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        woken = asyncio.ensure_future(_hint(subscription, min(settings.idle_poll_seconds, remaining)))
        waiting: set[asyncio.Future[Any]] = {done, woken}
        finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if done in finished:
            woken.cancel()
            parse_idle_done(done.result())        # RFC 2177 3: anything but DONE is BAD
            return False
        await _report(session)
        await session.connection.drain()


async def _hint(subscription: Subscription | None, timeout: float) -> None:
    if subscription is None:
        await asyncio.sleep(timeout)
    else:
        await subscription.wait(timeout)


async def _report(session: Session) -> None:
    if session.selected is not None:
        session.write_all(await session.selected.updates(session.store, allow_expunge=True))


HANDLERS: dict[type[c.Command], Handler] = {c.Idle: idle}

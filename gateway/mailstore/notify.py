"""Change notifications, so an IDLE session (RFC 2177) wakes as soon as its folder changes.

The ``ChangeHub`` is in-process: the mail store publishes after each commit and
every subscriber of that mailbox (or of that one folder) gets the event and a
woken ``asyncio.Event``. Events are hints, never the data: a woken session asks
the store for ``changes_since`` its last MODSEQ, so a lost or merged event costs
nothing but latency.

Several gateway nodes sharing one PostgreSQL database bridge their hubs with
``PgNotifyBridge``: local events are sent with ``pg_notify`` and events from
other nodes are published locally (LISTEN/NOTIFY; on SQLite there is one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

CHANNEL = "gateway_mailstore"


class ChangeKind(str, enum.Enum):
    EXISTS = "exists"  # new messages (delivery, APPEND, COPY, MOVE)
    FLAGS = "flags"
    EXPUNGE = "expunge"
    FOLDERS = "folders"  # created, deleted, renamed, subscriptions


@dataclass(frozen=True)
class ChangeEvent:
    mailbox_id: int
    folder: str | None  # None for mailbox-wide changes
    kind: ChangeKind
    modseq: int = 0
    delivered: bool = False   # EXISTS of a delivery whose filing job is still due (not of an APPEND, nor of one
                              # whose job ended at delivery: gateway.dmp_bridge.intake)

    def to_json(self) -> dict[str, Any]:
        return {"m": self.mailbox_id, "f": self.folder, "k": self.kind.value, "s": self.modseq,
                **({"d": 1} if self.delivered else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChangeEvent:
        return cls(int(data["m"]), data["f"], ChangeKind(data["k"]), int(data["s"]), bool(data.get("d")))


@dataclass(eq=False)
class Subscription:
    """One session's interest in a mailbox, or in one folder of it."""

    hub: ChangeHub
    mailbox_id: int
    folder: str | None
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list[ChangeEvent] = field(default_factory=list)

    def wants(self, event: ChangeEvent) -> bool:
        if event.mailbox_id != self.mailbox_id:
            return False
        return self.folder is None or event.folder is None or event.folder == self.folder

    def deliver(self, event: ChangeEvent) -> None:
        self.pending.append(event)
        self.woken.set()

    async def wait(self, timeout: float | None = None) -> list[ChangeEvent]:
        """The events since the last call, waiting up to ``timeout`` seconds for one."""
        if not self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.woken.wait(), timeout)
        events, self.pending = self.pending, []
        self.woken.clear()
        return events

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ChangeHub:
    """Fans change events out to subscribed sessions of this process."""

    def __init__(self) -> None:
        self._by_mailbox: dict[int, set[Subscription]] = {}
        self._forwarders: list[Callable[[ChangeEvent], None]] = []
        self._observers: list[Callable[[ChangeEvent], None]] = []
        self._versions: dict[int, int] = {}   # mailbox id -> events published for it so far
        self.bridged = False                  # other nodes' events come through a PgNotifyBridge

    def version(self, mailbox_id: int) -> int:
        """How many changes of ``mailbox_id`` this hub has seen: unchanged means nothing was published since."""
        return self._versions.get(mailbox_id, 0)

    @property
    def sees_every_change(self) -> bool:
        """True when every writer of the store publishes here (one node): with a bridge to other nodes,
        their events may come late or be lost, so an unchanged ``version`` proves nothing."""
        return not self.bridged

    def subscribe(self, mailbox_id: int, folder: str | None = None) -> Subscription:
        subscription = Subscription(self, mailbox_id, folder)
        self._by_mailbox.setdefault(mailbox_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._by_mailbox.get(subscription.mailbox_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._by_mailbox[subscription.mailbox_id]

    def add_forwarder(self, forward: Callable[[ChangeEvent], None]) -> None:
        """Also hand every local event to ``forward`` (the PostgreSQL bridge)."""
        self._forwarders.append(forward)

    def observe(self, observer: Callable[[ChangeEvent], None]) -> None:
        """Also hand every event published here (local or bridged) to ``observer``, synchronously, before any
        subscriber is woken (the mail store's record of what it must not answer from memory)."""
        self._observers.append(observer)

    def publish(self, event: ChangeEvent) -> None:
        """Called by the store after a commit."""
        self.publish_local(event)
        for forward in self._forwarders:
            forward(event)

    def publish_local(self, event: ChangeEvent) -> None:
        self._versions[event.mailbox_id] = self._versions.get(event.mailbox_id, 0) + 1
        for observer in self._observers:
            observer(event)
        for subscription in list(self._by_mailbox.get(event.mailbox_id, ())):
            if subscription.wants(event):
                subscription.deliver(event)

    def subscriber_count(self) -> int:
        return sum(len(subscribers) for subscribers in self._by_mailbox.values())


class PgNotifyBridge:
    """Carries hub events between gateway nodes through PostgreSQL LISTEN/NOTIFY.

    Uses its own asyncpg connection (LISTEN needs a dedicated one). Each node
    tags its notifications with a random id and ignores its own echoes.
    """

    def __init__(self, hub: ChangeHub, dsn: str) -> None:
        self.hub = hub
        self.dsn = dsn.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.node = uuid.uuid4().hex
        self._connection: Any = None
        self._outbox: asyncio.Queue[ChangeEvent] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._stopping = False
        self.connections = 0          # LISTEN connections opened so far (1 + reconnections)

    async def start(self) -> None:
        await self._connect()
        self.hub.bridged = True
        self.hub.add_forwarder(self._outbox.put_nowait)
        self._sender = asyncio.create_task(self._send_loop(), name="mailstore-notify-send")

    async def _connect(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(self.dsn)
        await connection.add_listener(CHANNEL, self._received)
        connection.add_termination_listener(self._lost)
        self._connection = connection
        self.connections += 1

    def _lost(self, _connection: object) -> None:
        """The LISTEN connection ended (PostgreSQL restarted, the network dropped): open another. Meanwhile
        sessions find other nodes' changes by looking (IDLE every ``idle_poll_seconds``)."""
        if self._stopping or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        log.warning("mail store notifications: connection to PostgreSQL lost; reconnecting")
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="mailstore-notify-reconnect")

    async def _reconnect(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                await self._connect()
            except Exception as error:  # noqa: BLE001  (any failure: wait and try again)
                log.warning("mail store notifications: reconnection failed (%s); next try in %.0f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                log.info("mail store notifications: reconnected")
                return

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._sender, self._reconnecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._connection is not None:
            await self._connection.close()

    async def _send_loop(self) -> None:
        while True:
            event = await self._outbox.get()
            payload = json.dumps({"n": self.node, **event.to_json()})
            try:
                await self._connection.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
            except Exception:  # a lost hint only delays other nodes until their next poll
                log.warning("could not forward a mail store change to other nodes", exc_info=True)

    def _received(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            if data.get("n") == self.node:
                return
            self.hub.publish_local(ChangeEvent.from_json(data))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed mail store notification: %r", payload[:200])

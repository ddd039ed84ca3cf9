"""SMTP acceptor processes (``smtp.acceptor_processes``): SMTP accepted by N child processes on one database.

One asyncio process holds one core at most (the GIL): acceptance and delivery together used ~0.9 core while
the second core sat idle. With ``smtp.acceptor_processes = N`` (N >= 1), ``gateway serve``

- binds the SMTP listening sockets itself (``bind_smtp_sockets``: the ports are known, a port in use is
  reported as before, ``ready.json`` is unchanged), then starts N fresh interpreters
  (``<python> -m gateway ... serve --acceptor-channel FD --acceptor-socket DOOR=FD ...``: never a bare fork of
  a process that runs threads), handing them the sockets and one end of a socketpair each (``pass_fds``).
  Every child accepts on the same sockets, so the least busy one takes the next connection (no
  SO_REUSEPORT, whose hash pins a client to one process whatever its load). A child serves SMTP only, on
  the inherited sockets (as a ``--only smtp`` node: no workers, no IMAP or HTTPS, no migration), under its
  own node name ``<node>-acceptor-<n>`` (its half-received messages in its own ``incoming/`` directory);
- keeps delivering, serving IMAP and HTTPS and running the workers itself; it accepts no SMTP connection.

The channel (a Unix socketpair per child, JSON lines):

- child -> parent ``queued``: each queue id the child committed (what ``LocalDelivery.schedule`` does in one
  process; a sibling of ``gateway.queue.wake.QueueAnnouncer``): the parent schedules it at once. A lost
  announcement (a child or the parent killed) costs only a delay: the rows are the truth, and the parent's
  retry loop and recovery pass find them;
- child -> parent ``remote``: a message for other operators was queued: the outbound worker looks now;
- parent -> child ``room``: the local delivery backlog is full / has room again
  (``LocalDeliveryWorker.room_listeners``): a child's DATA waits as in one process (451 4.3.2 after
  ``smtp.local_backlog_wait_seconds``);
- child -> parent ``acquire`` / ``release`` / ``rate``: the in-memory SMTP limits stay gateway-wide
  (``smtp.max_connections_per_ip``, ``max_sessions_per_user``, ``messages_per_minute_per_user`` / ``_per_ip``):
  the parent holds the counts (``GatewayLimits``), a child asks, and the slots a child held are given back
  when its channel ends (it died). The sign-in limiter is the database's already (gateway.security.auth_limiter).

Supervision: a child that dies is started again (backoff from 0.5 s doubling to 30 s, reset after a minute
of service); a child ends when its channel reaches end of file or its parent changes (the parent died); on
SIGTERM the parent stops the children first (each stops listening, lets its transactions in flight finish
within ``listen.shutdown_grace_seconds``, announces what it committed), then its own workers, then the
database. SIGHUP is passed on to every child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config import Settings, SmtpSettings
from gateway.errors import UserError
from gateway.mail import codes
from gateway.mail.codes import MailRefusal
from gateway.ops.proxied import SHARED_LISTEN_BACKLOG
from gateway.pipeline.limits import ConcurrencyLimiter, MessageRates, RateRefusal, Slot
from gateway.queue.local_delivery import LocalDeliveryWorker

log = logging.getLogger("gateway.acceptors")

DOORS = ("submission", "submissions", "relay")
LISTEN_BACKLOG = SHARED_LISTEN_BACKLOG   # as asyncio's create_server
START_TIMEOUT_SECONDS = 60.0        # a child not ready by then: ``gateway serve`` fails to start
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
STEADY_SECONDS = 60.0               # a child that served this long starts again without waiting
PARENT_CHECK_SECONDS = 1.0
LimitKind = Literal["ip", "user"]
# What a child must not inherit: systemd's notification socket and watchdog are the main process's.
PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def acceptor_name(node_name: str, index: int) -> str:
    """The ``cluster.node_name`` of acceptor ``index`` (from 1): its own ``incoming/`` spool directory."""
    return f"{node_name}-acceptor-{index}" if node_name else f"acceptor-{index}"


def bind_smtp_sockets(settings: Settings) -> dict[str, list[socket.socket]]:
    """The three SMTP doors' listening sockets, bound and listening as ``loop.create_server`` would bind them
    (every address ``listen.host`` resolves to, SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    listen = settings.listen
    ports = {"submission": listen.smtp_submission_port, "submissions": listen.smtp_submissions_port,
             "relay": listen.smtp_relay_port}
    bound: dict[str, list[socket.socket]] = {}
    try:
        for door, port in ports.items():
            bound[door] = _bind(listen.host, port)
    except BaseException:
        for sockets in bound.values():
            for sock in sockets:
                sock.close()
        raise
    return bound


def _bind(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:
                raise OSError(error.errno, f"error while attempting to bind on address {address!r}: "
                                           f"{(error.strerror or '').lower()}") from None
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# ------------------------------------------------------------------ the main process's side


class GatewayLimits:
    """The SMTP limits of every acceptor process, held by the main process."""

    def __init__(self, smtp: SmtpSettings) -> None:
        self.limiters: dict[LimitKind, ConcurrencyLimiter] = {
            "ip": ConcurrencyLimiter(smtp.max_connections_per_ip),
            "user": ConcurrencyLimiter(smtp.max_sessions_per_user)}
        self.rates = MessageRates(smtp.messages_per_minute_per_user, smtp.messages_per_minute_per_ip)


@dataclass
class AcceptorChild:
    """One acceptor process as the main process sees it."""

    index: int
    name: str
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    ready: asyncio.Future[None]
    slots: dict[tuple[LimitKind, str], list[Slot]] = field(default_factory=lambda: defaultdict(list))

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(_line(message))

    def give_back_slots(self) -> int:
        """Its channel ended: every slot it held is released (it cannot release them any more)."""
        count = 0
        for held in self.slots.values():
            for slot in held:
                slot.release()
                count += 1
        self.slots.clear()
        return count


class AcceptorSupervisor:
    """Starts, serves, restarts and stops the acceptor processes (see the module docstring)."""

    def __init__(self, settings: Settings, count: int, command: Sequence[str], local: LocalDeliveryWorker,
                 wake_remote: Callable[[], None], *, on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.count = count
        self.command = list(command)          # ``<python> -m gateway [--config F] [--data-dir D] serve``
        self.local = local
        self.wake_remote = wake_remote
        self.on_change = on_change            # the children changed (one was started again): ready.json
        self.limits = GatewayLimits(settings.smtp)
        self.sockets: dict[str, list[socket.socket]] = {}
        self.children: dict[int, AcceptorChild] = {}
        self.restarts = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._first_ready: dict[int, asyncio.Future[None]] = {}

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return {door: tuple(sockets[0].getsockname()[:2]) for door, sockets in self.sockets.items()}

    def describe(self) -> list[dict[str, Any]]:
        """For ready.json and ``gateway status``: each acceptor's name and pid."""
        return [{"name": child.name, "pid": child.pid} for _index, child in sorted(self.children.items())]

    async def start(self) -> None:
        """Bind the SMTP ports, start every child and wait until each accepts connections."""
        self.sockets = bind_smtp_sockets(self.settings)
        self.local.room_listeners.append(self._tell_room)
        loop = asyncio.get_running_loop()
        for index in range(1, self.count + 1):
            self._first_ready[index] = loop.create_future()
            self._tasks.append(asyncio.create_task(self._keep(index), name=f"smtp-acceptor-{index}"))
        try:
            await asyncio.wait_for(asyncio.gather(*self._first_ready.values()), START_TIMEOUT_SECONDS)
        except BaseException:
            await self.aclose()
            raise
        log.info("SMTP acceptor processes ready: %s",
                 ", ".join(f"{child.name} (pid {child.pid})" for child in self.children.values()))

    def reload(self) -> None:
        """SIGHUP, passed on to every child that is ready (one still starting has no handler for it yet: the
        signal would end it, and it reads the configuration as it is now anyway)."""
        for child in self.children.values():
            if not child.ready.done():
                continue
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGHUP)

    def stop_restarting(self) -> None:
        """The gateway is stopping (SIGTERM, before its other listeners close): a child that exits now, told to
        stop at the same time as its parent, is not started again."""
        self._stopping = True

    async def aclose(self, grace_seconds: float = 0.0) -> None:
        """Stop every child (SIGTERM: each drains its transactions within ``grace_seconds``; SIGKILL after
        that and a margin), then close the listening sockets."""
        self._stopping = True
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace_seconds + 15.0)
            for child in self.children.values():
                if child.process.returncode is None:
                    log.warning("SMTP acceptor %s (pid %d) did not stop: killed", child.name, child.pid)
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
            if pending:
                await asyncio.wait(pending, timeout=10.0)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        for future in self._first_ready.values():
            if not future.done():
                future.cancel()
        if self._tell_room in self.local.room_listeners:
            self.local.room_listeners.remove(self._tell_room)
        for sockets in self.sockets.values():
            for sock in sockets:
                sock.close()
        self.sockets = {}

    # ---------------------------------------------------------------- one child, for as long as we serve

    async def _keep(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        backoff = FIRST_BACKOFF_SECONDS
        while not self._stopping:
            started = loop.time()
            try:
                child = await self._spawn(index)
            except OSError as error:
                log.error("SMTP acceptor %d could not be started: %s", index, error)
                if not self._first_ready[index].done():
                    self._first_ready[index].set_exception(UserError(f"SMTP acceptor process: {error}"))
                    return
            else:
                self.children[index] = child
                if self._stopping:                # started while the gateway began to stop
                    with contextlib.suppress(ProcessLookupError):
                        child.process.send_signal(signal.SIGTERM)
                await self._serve(child)
                code = await child.process.wait()
                released = child.give_back_slots()
                if self._stopping:
                    log.info("SMTP acceptor %s (pid %d) stopped (exit %s)", child.name, child.pid, code)
                    return
                first = self._first_ready[index]
                if not first.done():
                    first.set_exception(UserError(f"SMTP acceptor process {child.name} exited with {code} while "
                                                  "starting (its log above says why)"))
                    return
                if loop.time() - started >= STEADY_SECONDS:
                    backoff = FIRST_BACKOFF_SECONDS
                log.error("SMTP acceptor %s (pid %d) exited with %s (%d limit slot(s) given back); starting it "
                          "again in %.1f s", child.name, child.pid, code, released, backoff)
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _spawn(self, index: int) -> AcceptorChild:
        name = acceptor_name(self.settings.cluster.node_name, index)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            arguments = [*self.command, "--acceptor-channel", str(child_end.fileno())]
            fds = [child_end.fileno()]
            for door, sockets in self.sockets.items():
                for sock in sockets:
                    arguments += ["--acceptor-socket", f"{door}={sock.fileno()}"]
                    fds.append(sock.fileno())
            env = {key: value for key, value in os.environ.items() if key not in PRIVATE_ENVIRONMENT}
            env["GATEWAY_CLUSTER_NODE_NAME"] = name
            process = await asyncio.create_subprocess_exec(*arguments, pass_fds=fds, env=env,
                                                           stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end)
        child = AcceptorChild(index, name, process, writer, reader, asyncio.get_running_loop().create_future())
        child.send({"op": "room", "room": self.local.has_room})
        log.info("SMTP acceptor %s started (pid %d)", name, process.pid)
        return child

    async def _serve(self, child: AcceptorChild) -> None:
        """Answer ``child`` until its channel ends."""
        try:
            while line := await child.reader.readline():
                try:
                    message = json.loads(line)
                    self._received(child, message)
                except (ValueError, KeyError, TypeError) as error:
                    log.warning("SMTP acceptor %s: ignored a malformed message (%s): %r", child.name, error,
                                line[:100])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            child.writer.close()

    def _received(self, child: AcceptorChild, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "queued":
            queue_id = str(message["id"])
            if 0 < len(queue_id) <= 32 and queue_id.isalnum():
                self.local.schedule(queue_id)
        elif op == "rate":
            refused = self.limits.rates.refusal(message.get("account"), str(message["address"]))
            child.send({"op": "answer", "n": message["n"], "refused": refused})
        elif op == "acquire":
            kind: LimitKind = "user" if message["kind"] == "user" else "ip"
            key = str(message["key"])
            slot = self.limits.limiters[kind].try_acquire(key)
            if slot is not None:
                child.slots[(kind, key)].append(slot)
            child.send({"op": "answer", "n": message["n"], "ok": slot is not None})
        elif op == "release":
            kind = "user" if message["kind"] == "user" else "ip"
            held = child.slots.get((kind, str(message["key"])))
            if held:
                held.pop().release()
        elif op == "remote":
            self.wake_remote()
        elif op == "ready":
            if not child.ready.done():
                child.ready.set_result(None)
            first = self._first_ready[child.index]
            if not first.done():
                first.set_result(None)
            elif self.on_change is not None:
                self.on_change()
        else:
            log.warning("SMTP acceptor %s: unknown message %r", child.name, op)

    def _tell_room(self, has_room: bool) -> None:
        for child in self.children.values():
            child.send({"op": "room", "room": has_room})


# ------------------------------------------------------------------ an acceptor process's side


class MainProcessChannel:
    """In an acceptor process: the channel to the main process (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._abandoned: dict[int, dict[str, Any]] = {}   # asked, then cancelled (the client left) before the answer
        self._numbers = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.lost = False

    async def start(self, *, on_room: Callable[[bool], None], on_lost: Callable[[], None]) -> None:
        """Read the main process's messages; ``on_lost`` when the channel ends or the parent changes."""
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        parent = os.getppid()
        self._tasks = [asyncio.create_task(self._read(on_room, on_lost), name="acceptor-channel"),
                       asyncio.create_task(self._watch_parent(parent, on_lost), name="acceptor-parent")]

    async def stop(self) -> None:
        """Once the listeners are closed: what is still to be sent is sent, then the channel closes."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(self._writer.drain(), 5.0)
            self._writer.close()
        self._fail_answers()

    def announce(self, queue_id: str) -> None:
        """``LocalDeliveryWorker.elsewhere``: a queue id committed here, for the main process to deliver."""
        self._send({"op": "queued", "id": queue_id})

    def remote_queued(self) -> None:
        self._send({"op": "remote"})

    def ready(self) -> None:
        self._send({"op": "ready"})

    def release(self, kind: LimitKind, key: str) -> None:
        self._send({"op": "release", "kind": kind, "key": key})

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """A request answered by the main process; MailRefusal 421 when the channel is gone (we are stopping)."""
        if self.lost:
            raise MailRefusal(codes.SERVICE_SHUTTING_DOWN)
        self._numbers += 1
        number = self._numbers
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[number] = answer
        self._send({**message, "n": number})
        try:
            return await answer
        except asyncio.CancelledError:
            self._abandoned[number] = message
            raise
        finally:
            self._answers.pop(number, None)

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            if message["op"] == "queued":
                log.warning("could not announce queued message %s to the main process (it finds it anyway)",
                            message["id"])
            return
        self._writer.write(_line(message))

    async def _read(self, on_room: Callable[[bool], None], on_lost: Callable[[], None]) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if message["op"] == "answer":
                    answer = self._answers.get(message["n"])
                    abandoned = self._abandoned.pop(message["n"], None)
                    if answer is not None and not answer.done():
                        answer.set_result(message)
                    elif abandoned is not None and abandoned["op"] == "acquire" and message.get("ok"):
                        self.release(abandoned["kind"], abandoned["key"])    # a slot nobody holds: given back
                elif message["op"] == "room":
                    on_room(bool(message["room"]))
        except (ConnectionError, ValueError) as error:
            log.error("channel to the main process failed: %s", error)
        self.lost = True
        self._fail_answers()
        log.warning("the main process is gone: stopping")
        on_lost()

    async def _watch_parent(self, parent: int, on_lost: Callable[[], None]) -> None:
        """As gateway.dmp_bridge.examine: a parent killed (-9) leaves us to init; its channel's end says so
        too, this is the second guard."""
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK_SECONDS)
        self.lost = True
        self._fail_answers()
        log.warning("the main process (pid %d) is gone: stopping", parent)
        on_lost()

    def _fail_answers(self) -> None:
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(MailRefusal(codes.SERVICE_SHUTTING_DOWN))


class SharedConcurrencyLimiter(ConcurrencyLimiter):
    """In an acceptor process: a slot of the main process's limiter (connections per IP, sessions per user)."""

    def __init__(self, channel: MainProcessChannel, kind: LimitKind, limit: int) -> None:
        super().__init__(limit)
        self.channel = channel
        self.kind = kind

    def try_acquire(self, key: str) -> Slot | None:
        raise TypeError("an acceptor process asks the main process: await acquire()")

    async def acquire(self, key: str) -> Slot | None:
        answer = await self.channel.ask({"op": "acquire", "kind": self.kind, "key": key})
        if not answer.get("ok"):
            return None
        self._counts[key] += 1
        return Slot(self, key)

    def _give_back(self, key: str) -> None:
        super()._give_back(key)
        self.channel.release(self.kind, key)


class SharedMessageRates(MessageRates):
    """In an acceptor process: the main process's message rates decide."""

    def __init__(self, channel: MainProcessChannel, smtp: SmtpSettings) -> None:
        super().__init__(smtp.messages_per_minute_per_user, smtp.messages_per_minute_per_ip)
        self.channel = channel

    def refusal(self, account: str | None, address: str) -> RateRefusal | None:
        raise TypeError("an acceptor process asks the main process: await check()")

    async def check(self, account: str | None, address: str) -> RateRefusal | None:
        answer = await self.channel.ask({"op": "rate", "account": account, "address": address})
        refused = answer.get("refused")
        return "user" if refused == "user" else "ip" if refused == "ip" else None


def inherited_sockets(specs: Sequence[str]) -> dict[str, list[socket.socket]]:
    """``--acceptor-socket DOOR=FD`` (repeated): the listening sockets inherited from the main process."""
    descriptors: dict[str, list[int]] = defaultdict(list)
    for spec in specs:
        door, _, fd = spec.partition("=")
        if door not in DOORS or not fd.isdigit():
            raise UserError(f"bad --acceptor-socket {spec!r}: DOOR=FD with DOOR one of {', '.join(DOORS)}",
                            field="--acceptor-socket")
        descriptors[door].append(int(fd))
    missing = [door for door in DOORS if door not in descriptors]
    if missing:        # checked before any descriptor is taken as a socket
        raise UserError(f"--acceptor-socket missing for {', '.join(missing)}", field="--acceptor-socket")
    return {door: [socket.socket(fileno=fd) for fd in fds] for door, fds in descriptors.items()}


def acceptor_command(config_file: str | None, data_dir: str | None) -> list[str]:
    """How the main process starts a child: this interpreter, this package, the same configuration."""
    return [sys.executable, "-m", "gateway", *(["--config", config_file] if config_file else []),
            *(["--data-dir", data_dir] if data_dir else []), "serve"]



"""systemd's notification protocol through the real ``gateway serve``: a real AF_UNIX datagram socket stands
where systemd's would (``NOTIFY_SOCKET``), as for a ``Type=notify`` unit (deploy/systemd/gateway.service).

READY=1 arrives only once every listener accepts connections; SIGHUP sends RELOADING=1 (with the monotonic
time sd_notify(3) asks for) then READY=1; SIGTERM sends STOPPING=1 and the process exits; with ``WatchdogSec=``
(``WATCHDOG_USEC``) the event loop pings WATCHDOG=1."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ops.sdnotify import SystemdNotifier
from tests.harness import GATEWAY, REPO, GatewayProcess


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; each datagram is a set of KEY=VALUE lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[dict[str, str]] = []

    def next_with(self, key: str, *, timeout: float, process: subprocess.Popen[bytes] | None = None) -> dict[str, str]:
        """The next datagram carrying ``key`` (WATCHDOG pings in between are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.5)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"gateway serve exited {process.returncode} before sending {key}") from None
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.received.append(fields)
            if key in fields:
                return fields
        raise AssertionError(f"no {key} datagram within {timeout} s; received {self.received}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def test_ready_after_listeners_reloading_on_sighup_stopping_on_sigterm(tmp_path: Path,
                                                                      notify_socket: NotifySocket) -> None:
    gateway = GatewayProcess(tmp_path / "gw", extra_env={"NOTIFY_SOCKET": str(notify_socket.path),
                                                         "WATCHDOG_USEC": "400000"})
    gateway.init_demo()
    log = open(gateway.data_dir / "serve.log", "ab")
    # Started as systemd would: nothing waits for ready.json, only for READY=1.
    gateway.process = subprocess.Popen(GATEWAY + ["--data-dir", str(gateway.data_dir), "serve"], env=gateway.env,
                                       stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        ready = notify_socket.next_with("READY", timeout=120, process=gateway.process)
        refused = [name for name, port in gateway.ports.items() if not _accepts(port)]
        assert ready["READY"] == "1" and not refused, f"READY=1 sent while {refused} did not accept yet"
        assert (gateway.data_dir / "run" / "ready.json").exists()

        notify_socket.next_with("WATCHDOG", timeout=30, process=gateway.process)

        sent_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        gateway.process.send_signal(signal.SIGHUP)
        reloading = notify_socket.next_with("RELOADING", timeout=30, process=gateway.process)
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) >= sent_at
        assert notify_socket.next_with("READY", timeout=30, process=gateway.process)["READY"] == "1"
        assert "SIGHUP: reloaded" in gateway.log_text()

        gateway.process.send_signal(signal.SIGTERM)
        assert notify_socket.next_with("STOPPING", timeout=30)["STOPPING"] == "1"
        assert gateway.process.wait(60) == 0, gateway.log_text()
    finally:
        gateway.stop(signal.SIGKILL)
        log.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = SystemdNotifier.from_environment({})
    assert notifier.ready("serving") is False
    assert notifier.watchdog_usec == 0


def test_abstract_socket_address_and_watchdog_for_another_pid() -> None:
    name = f"gateway-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)   # systemd writes an abstract address with a leading "@"
        sock.settimeout(10)
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000",
                                                     "WATCHDOG_PID": "1"})
        assert notifier.stopping() is True
        assert sock.recv(4096).decode().split("\n")[0] == "STOPPING=1"
    assert notifier.watchdog_usec == 0   # WATCHDOG_PID names another process: not ours to ping


def test_a_socket_that_is_gone_does_not_stop_the_gateway(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "absent.sock"))
    assert notifier.ready("serving") is False
    assert notifier.stopping() is False

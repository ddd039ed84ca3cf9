"""systemd's service notification protocol (sd_notify(3)), for ``Type=notify`` units.

systemd passes an AF_UNIX datagram socket in ``NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``); the service sends newline-separated ``KEY=VALUE`` assignments to it:

- ``READY=1`` once every listener accepts connections (what ``run/ready.json`` and ``/ready`` also say), so
  that ``systemctl start`` returns, and units ordered after the gateway start, only when it serves;
- ``STOPPING=1`` when SIGTERM arrives (listeners close, sessions in flight finish);
- ``RELOADING=1`` with ``MONOTONIC_USEC`` when SIGHUP starts a reload, then ``READY=1`` when it is done, so
  that ``systemctl reload`` returns after the certificates, CRLs and configuration are re-read;
- ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``: sent from the event
  loop, so a loop that no longer turns stops it and systemd restarts the service.

Without ``NOTIFY_SOCKET`` (not started by systemd, or ``Type=exec``) every call does nothing. A send that
fails is logged once and never stops the gateway: notifications are advice to the service manager.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("gateway.systemd")


class SystemdNotifier:
    """Sends sd_notify datagrams to ``address`` (None: systemd is not listening, nothing is sent)."""

    def __init__(self, address: str | None, *, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address else 0
        self._warned = False
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = env.get("WATCHDOG_USEC", "")
        # sd_watchdog_enabled(3): WATCHDOG_PID, when set, names the process meant.
        meant_for_us = env.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        return cls(address, watchdog_usec=int(watchdog) if watchdog.isdigit() and meant_for_us else 0)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was sent."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), target)
        except OSError as error:
            if not self._warned:
                self._warned = True
                log.warning("systemd notification socket %s: %s", self.address, error)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # sd_notify(3): RELOADING=1 comes with the CLOCK_MONOTONIC time, in microseconds, of the request.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                           "STATUS=reloading configuration, CRLs, trust anchors and certificates")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: finishing transactions in flight")

    def start_watchdog(self) -> None:
        """Ping the watchdog from the event loop every half period, as sd_watchdog_enabled(3) advises."""
        if self.watchdog_usec and self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._ping(self.watchdog_usec / 2_000_000))

    async def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)   # its own cancellation, not ours
            self._watchdog = None

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

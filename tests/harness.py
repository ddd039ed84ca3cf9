"""Start the real gateway as a subprocess on loopback ports chosen at run time.

``GatewayProcess`` runs ``gateway init --demo`` in a fresh data directory, then
``gateway serve``, and waits for ``<data_dir>/run/ready.json`` (written once
every listener accepts connections). Tests read accounts, ports and the test
CA from ``demo.json`` through it, exactly as a person trying the gateway would.
"""

from __future__ import annotations

import asyncio

import email
import email.policy
import imaplib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
GATEWAY = [sys.executable, "-m", "gateway"]
PORT_KEYS = ("smtp_relay_port", "smtp_submission_port", "smtp_submissions_port", "imap_port", "imaps_port", "http_port")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (kept bound until all are chosen, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_cli(*args: str, data_dir: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``gateway [--data-dir D] ARGS`` and capture its output."""
    command = GATEWAY + (["--data-dir", str(data_dir)] if data_dir else []) + list(args)
    result = subprocess.run(command, capture_output=True, text=True, env=env or os.environ.copy(), input=input,
                            cwd=REPO, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"gateway {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class GatewayProcess:
    data_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    serve_args: list[str] = field(default_factory=list)   # e.g. ["--only", "imap"]

    @property
    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update({f"GATEWAY_LISTEN_{key.upper()}": str(port) for key, port in self.ports.items()})
        env.update(self.extra_env)
        return env

    def init_demo(self) -> None:
        if not self.ports:
            self.ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
        if not (self.data_dir / "demo.json").exists():
            run_cli("init", "--demo", data_dir=self.data_dir, env=self.env, check=True)

    def start(self, timeout: float = 60.0) -> None:
        self.init_demo()
        ready = self.data_dir / "run" / "ready.json"
        ready.unlink(missing_ok=True)
        log = open(self.data_dir / "serve.log", "ab")
        self.process = subprocess.Popen(GATEWAY + ["--data-dir", str(self.data_dir), "serve", *self.serve_args], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"gateway serve exited {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway serve not ready after {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash or an OOM kill would leave it."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        path = self.data_dir / "serve.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    @property
    def demo(self) -> dict[str, Any]:
        demo: dict[str, Any] = json.loads((self.data_dir / "demo.json").read_text())
        return demo

    def account(self, type_: str, index: int = 0) -> dict[str, Any]:
        accounts: list[dict[str, Any]] = [a for a in self.demo["accounts"] if a["type"] == type_]
        return accounts[index]

    @property
    def ca_file(self) -> str:
        return str(self.demo["ca_certificate"])

    def imaps_login(self, kind: str = "PER", index: int = 0) -> imaplib.IMAP4_SSL:
        """An IMAPS connection to this gateway, trusting its test CA, logged in as a demo account."""
        context = ssl.create_default_context(cafile=self.ca_file)
        client = imaplib.IMAP4_SSL("localhost", self.ports["imaps_port"], ssl_context=context, timeout=30)
        account = self.account(kind, index)
        client.login(account["address"], account["password"])
        return client

    def cli(self, *args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``gateway ARGS`` on this data directory with the gateway's environment, ``env`` set on top of it."""
        return run_cli(*args, data_dir=self.data_dir, env=self.env | (env or {}), **kwargs)


def read_inbox(imap: imaplib.IMAP4, account: dict[str, Any]) -> list[EmailMessage]:
    """Log ``account`` in on an open IMAP connection and fetch every message of its INBOX, as a mail client
    would. The mail store provisions a mailbox's folders at its first delivery: before it, no INBOX."""
    imap.login(account["address"], account["password"])
    typ, data = imap.select("INBOX", readonly=True)
    if typ != "OK":
        return []
    typ, data = imap.uid("SEARCH", "ALL")
    assert typ == "OK", data
    messages = []
    for uid in (data[0] or b"").split():
        typ, parts = imap.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
        assert typ == "OK", parts
        raw = next(part[1] for part in parts if isinstance(part, tuple))
        messages.append(email.message_from_bytes(raw, policy=email.policy.default))
    return messages


T = TypeVar("T")


def wait_until(condition: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something other than None (returned), or fail naming ``what``
    once ``timeout`` seconds have passed: a bound on a hang, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while (result := condition()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {timeout} s")
        time.sleep(interval)
    return result


async def wait_until_async(condition: Callable[[], T | None], *, timeout: float, what: str,
                           interval: float = 0.05) -> T:
    """``wait_until`` inside an event loop: polls without blocking it (background tasks keep running)."""
    deadline = time.monotonic() + timeout
    while (result := condition()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not so after {timeout} s")
        await asyncio.sleep(interval)
    return result

"""A real IMAP server on loopback for the session, transcript and client tests.

``RunningImap`` builds the services the way ``gateway serve`` does (settings in
a temporary data directory, migrated SQLite database, test PKI, the demo
directory, the SQL mail store with its change hub, provisioned mailboxes) and
runs ``start_imap_listeners`` on an event loop in a background thread, so
blocking clients (imaplib, imapclient, mutt, mbsync...) and asyncio clients
(aioimaplib) can both talk to it.  Nothing of ours is mocked.

Test modules import the ``imap`` fixture from here (module scope: one server
per test module; tests keep to their own folders or messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import imaplib
import itertools
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.app import Services, open_services
from gateway.config import load_settings
from gateway.directory.demo import DemoAccount, seed_demo_directory
from gateway.directory.identifiers import add_luhn_key
from gateway.imap.listeners import ImapListeners, start_imap_listeners
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.memory import MemoryMailStore
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.security.at_rest import FieldSealer, HeaderSealer
from gateway.security.keys import KeyManager
from gateway.storage.blobs import BlobStore

T = TypeVar("T")
# The protocol tests run against both implementations of the MailStore interface (pymap does the same).
# "sealed": the SQL store with its header columns sealed at rest, as `gateway serve` runs it (blind index,
# ENVELOPEs kept rendered and sealed).
STORES = pytest.mark.parametrize("imap", ["sql", "sealed", "memory"], indirect=True)
HOST = "127.0.0.1"
_keys = itertools.count(1)
_account_numbers = itertools.count(int(time.time()) % 100000 * 1000)


def make_message(subject: str, *, sender: str = "Dr House <house@autre-operateur.mssante.localhost>",
                 to: str = "claire.medecin@demo.mssante.localhost", body: str = "Bonjour,\r\nvoici le compte rendu.\r\n",
                 extra_headers: str = "") -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    date = email.utils.format_datetime(dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone.utc))
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@test.localhost>\r\n{extra_headers}"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


class RunningImap:
    """The server, its loop thread, and helpers to act on the store from the test."""

    def __init__(self, data_dir: Path, store_kind: str = "sql") -> None:
        self.data_dir = data_dir
        self.store_kind = store_kind     # "sql": SqlMailStore (as served); "memory": MemoryMailStore
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="imap-test-loop", daemon=True)
        self.accounts: list[DemoAccount] = []
        self.mailbox_ids: dict[str, int] = {}
        self.ca_file = ""
        self.starttls_port = 0
        self.imaps_port = 0
        self._stack = contextlib.AsyncExitStack()
        self.store: SqlMailStore | MemoryMailStore | None = None
        self.delivery: LocalDelivery | None = None
        self.listeners: ImapListeners | None = None
        self.services: Services | None = None
        self.professional_domain = ""

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self._stop(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> None:
        settings = load_settings(data_dir=self.data_dir, environ={}, overrides={
            "listen": {"host": HOST, "imap_port": 0, "imaps_port": 0}})
        services = await self._stack.enter_async_context(open_services(settings))
        self.services = services
        self.professional_domain = settings.directory.professional_domain
        if not services.pki.exists():
            services.pki.init()
        services.pki.ensure_gateway_server_cert(settings.hostname, settings.pki.server_names, settings.pki.server_ips)
        await services.directory.ensure_local_domain(settings.directory.professional_domain, kind="professional")
        await services.directory.ensure_local_domain(settings.directory.patient_domain, kind="patient")
        self.accounts = await seed_demo_directory(services.directory, services.pki,
                                                  settings.directory.professional_domain)
        self.ca_file = str(services.pki.ca_bundle_path)
        hub = ChangeHub()
        blobs = BlobStore(settings.data_path / "blobs", KeyManager(services.db, settings.data_path / "keys"))
        self.store = self._make_store(services, blobs, hub, settings.directory.default_quota_mb)
        self.delivery = LocalDelivery(self.store)
        for account in self.accounts:
            found = await services.directory.account(account.address)
            assert found is not None
            self.mailbox_ids[account.address] = found.mailbox_id
            await self.delivery.provision(found.mailbox_id)
        self.listeners = await start_imap_listeners(services, settings, mailstore=self.store, hub=hub)
        (_, self.starttls_port), (_, self.imaps_port) = self.listeners.addresses()

    def _make_store(self, services: Services, blobs: BlobStore, hub: ChangeHub,
                    quota_mb: int) -> SqlMailStore | MemoryMailStore:
        if self.store_kind == "memory":
            return MemoryMailStore(hub, quota_bytes=quota_mb * 1024 * 1024)
        if self.store_kind == "sealed":
            return SqlMailStore(services.db, blobs, hub, headers=HeaderSealer(FieldSealer(blobs.keys)))
        return SqlMailStore(services.db, blobs, hub)

    async def _stop(self) -> None:
        if self.listeners is not None:
            await self.listeners.aclose()
        await self._stack.aclose()

    # --- accounts and messages ----------------------------------------------------------------

    def account(self, kind: str, index: int = 0) -> DemoAccount:
        return [account for account in self.accounts if account.type == kind][index]

    @property
    def doctor(self) -> DemoAccount:
        return self.account("PER", 0)

    def new_account(self, *, delegated_from: str | None = None, provision: bool = True) -> DemoAccount:
        """A fresh professional mailbox (provisioned unless told not to), optionally with read
        delegation on another one."""
        return self.run(self._new_account(delegated_from, provision))

    async def _new_account(self, delegated_from: str | None, provision: bool) -> DemoAccount:
        assert self.services is not None and self.delivery is not None
        directory = self.services.directory
        number = next(_account_numbers)
        professional = await directory.add_professional(
            id_type="RPPS", id_value=add_luhn_key(f"2{number:09d}"), family_name="TESTEUR", given_name=f"T{number}",
            profession_code="10")
        password = secrets.token_urlsafe(12)
        record = await directory.create_mailbox(address=f"testeur{number}@{self.professional_domain}", type="PER",
                                                owner=professional["idnps"], display_name=f"Testeur {number}",
                                                password=password)
        account = DemoAccount(record["address"], password, "PER", f"Testeur {number}", professional["idnps"])
        found = await directory.account(account.address)
        assert found is not None
        self.mailbox_ids[account.address] = found.mailbox_id
        if provision:
            await self.delivery.provision(found.mailbox_id)
        if delegated_from is not None:
            await directory.delegate(delegated_from, account.address, ["read"])
        return account

    def deliver(self, address: str, message: bytes, folder: str = "INBOX") -> int:
        """File ``message`` as the SMTP side would; returns its UID."""
        assert self.delivery is not None
        result = self.run(self.delivery.deliver(self.mailbox_ids[address], message,
                                                delivery_key=f"test-{next(_keys)}-{uuid.uuid4().hex}", folder=folder))
        return result.uid

    # --- client helpers ----------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        context.check_hostname = False     # we connect to 127.0.0.1; certificate names are tested elsewhere
        return context

    def imaps(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL(HOST, self.imaps_port, ssl_context=self.client_context(), timeout=30)

    def starttls(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4(HOST, self.starttls_port, timeout=30)
        client.starttls(self.client_context())
        return client

    def login(self, account: DemoAccount | None = None) -> imaplib.IMAP4_SSL:
        account = account or self.doctor
        client = self.imaps()
        client.login(account.address, account.password)
        return client


@pytest.fixture(scope="module")
def imap(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningImap]:
    """The server on the SQL store; a module parametrised with ``STORES`` (indirect) runs on each store kind."""
    server = RunningImap(tmp_path_factory.mktemp("imap") / "data", getattr(request, "param", "sql"))
    server.start()
    yield server
    server.stop()


class Conversation:
    """A raw IMAP connection for tests that interleave sessions line by line (pymap-style)."""

    def __init__(self, server: RunningImap, account: DemoAccount | None = None, *, login: bool = True) -> None:
        from tests.imap.transcript import TranscriptRunner

        self.runner = TranscriptRunner(HOST, server.imaps_port, server.client_context(), {}, plain=False)
        self.tags = itertools.count(1)
        self.greeting = self.line()
        if login:
            account = account or server.doctor
            self.command(f"LOGIN {account.address} {account.password}")

    def send(self, text: str) -> None:
        self.runner.sock.sendall(text.encode() + b"\r\n")

    def line(self) -> str:
        return self.runner.next_line().decode("utf-8", "replace")

    def command(self, text: str, *, expect: str = "OK") -> list[str]:
        """Send a tagged command; return the untagged lines, checking the tagged status."""
        tag = f"t{next(self.tags)}"
        self.send(f"{tag} {text}")
        lines: list[str] = []
        while True:
            line = self.line()
            if line.startswith(tag + " "):
                status = line.split(" ", 2)[1]
                assert status == expect, f"{text!r}: {line!r} (untagged: {lines})"
                lines.append(line)
                return lines
            lines.append(line)

    def close(self) -> None:
        self.runner.close()

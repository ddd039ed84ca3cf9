"""A real gateway SMTP side for tests: real database, directory, PKI, pipeline and listeners,
run in a thread with its own event loop (as aiosmtpd's Controller does), on loopback
ports chosen by the system. It builds the queue (``gateway.queue.service.MailQueue``, its spool
sealed as ``gateway serve`` seals it) and the pipeline with ``gateway.app.mail_path``, as
``open_services`` does, with the mail store a test chooses, opens the listeners with ``gateway.smtp.listeners`` as
``gateway serve`` does, and lets tests inspect the queue and change the directory
in-process; the crash and memory tests run the real ``gateway serve`` instead
(test_durability.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.app import mail_path
from gateway.config import Settings, load_settings
from gateway.directory.demo import DemoAccount, seed_demo_directory
from gateway.directory.identifiers import add_nir_key
from gateway.directory.service import DirectoryService
from gateway.queue.local_delivery import LocalStore
from gateway.queue.service import MailQueue
from gateway.queue.spool import Spool, spool_root
from gateway.security.at_rest import SpoolCipher
from gateway.security.keys import KeyManager
from gateway.security.passwords import PasswordHasher
from gateway.security.pki import TestPKI
from gateway.smtp.listeners import SmtpListeners, TlsMaterial, open_listeners
from gateway.storage.db import Database

T = TypeVar("T")
PEER_DOMAIN = "autre-operateur.mssante.localhost"
FAST_ARGON2 = {"argon2_memory_kib": 8192, "argon2_time_cost": 1}
StoreFactory = Callable[[Database, Settings], Awaitable[LocalStore | None]]


async def mail_store_for(db: Database, settings: Settings) -> LocalStore | None:
    """The real mail store (encrypted blobs under the data directory), as ``gateway serve`` builds it."""
    from gateway.mailstore.delivery import LocalDelivery as MailStoreDelivery
    from gateway.mailstore.sql import SqlMailStore
    from gateway.security.keys import KeyManager
    from gateway.storage.blobs import BlobStore

    keys = KeyManager(db, settings.data_path / "keys")
    return MailStoreDelivery(SqlMailStore(db, BlobStore(settings.data_path / "blobs", keys)))


@dataclass
class GatewayThread:
    data_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    store_factory: StoreFactory = mail_store_for
    settings: Settings | None = None
    ports: dict[str, int] = field(default_factory=dict)
    accounts: list[DemoAccount] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    pki: TestPKI | None = None
    db: Database | None = None
    directory: DirectoryService | None = None
    listeners: SmtpListeners | None = None
    queue: MailQueue | None = None
    mail_store: Any = None
    loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: asyncio.Event | None = None
    _error: BaseException | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 120.0) -> "GatewayThread":
        self._thread = threading.Thread(target=self._run, name="gateway-smtp", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"gateway did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Stop and wait; calling it again is harmless."""
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(60)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the gateway's loop (directory changes, queue inspection)."""
        assert self.loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._setup()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            assert self.listeners is not None and self.queue is not None and self.db is not None
            await self.listeners.aclose()
            await self.queue.stop()
            await self.db.dispose()

    async def _setup(self) -> None:
        overrides = {"listen": {"smtp_relay_port": 0, "smtp_submission_port": 0, "smtp_submissions_port": 0},
                     "auth": FAST_ARGON2}
        for section, values in self.overrides.items():
            overrides.setdefault(section, {}).update(values)
        self.settings = settings = load_settings(data_dir=self.data_dir, environ={}, overrides=overrides)
        first_run = not (self.data_dir / "smtp-accounts.json").exists()
        self.db = Database(settings.database_url)
        await self.db.migrate()
        self.directory = DirectoryService(self.db, settings, PasswordHasher.from_settings(settings.auth))
        self.pki = TestPKI(self.data_dir / "pki")
        if first_run:
            await self._seed(settings)
        else:
            self._load_accounts()
        issued = self.pki.ensure_gateway_server_cert("localhost", ["localhost"], ["127.0.0.1"])
        tls = TlsMaterial(issued.chain_path, issued.key_path, self.pki.ca_bundle_path)
        self.mail_store = await self.store_factory(self.db, settings)
        spool = Spool(spool_root(settings), await SpoolCipher.load(KeyManager(self.db, settings.data_path / "keys")))
        self.queue, pipeline = mail_path(settings, self.db, self.directory, spool, self.mail_store)
        await self.queue.start_local()
        self.listeners = await open_listeners(pipeline, self.directory, settings, tls)
        self.ports = {kind: port for kind, (_, port) in self.listeners.addresses.items()}

    async def _seed(self, settings: Settings) -> None:
        assert self.directory is not None and self.pki is not None
        self.pki.init()
        await self.directory.ensure_local_domain(settings.directory.professional_domain, kind="professional")
        await self.directory.ensure_local_domain(settings.directory.patient_domain, kind="patient")
        self.accounts = await seed_demo_directory(self.directory, self.pki, settings.directory.professional_domain)
        for state, ins13 in (("closed", "1850775056124"), ("opposed", "2800175056125")):
            patient = await self.directory.add_patient(ins=add_nir_key(ins13), ins_oid="1.2.250.1.213.1.4.10",
                                                       birth_family_name=state.upper(), first_given_name="TEST",
                                                       birth_date="1980-01-01", sex="M" if ins13[0] == "1" else "F")
            await self.directory.update_patient(patient["ins"], state=state)
            self.extra[f"{state}_patient"] = patient["mailbox"]
        peer = self.pki.issue_server("peer-mx", [f"mx.{PEER_DOMAIN}"])
        stranger = self.pki.issue_server("stranger-mx", ["mx.not-trusted.example"])
        self.extra.update(peer_cert=str(peer.cert_path), peer_key=str(peer.key_path),
                          stranger_cert=str(stranger.cert_path), stranger_key=str(stranger.key_path),
                          ca_file=str(self.pki.ca_bundle_path))
        (self.data_dir / "smtp-accounts.json").write_text(json.dumps(
            {"accounts": [vars(a) for a in self.accounts], "extra": self.extra}, indent=2))

    def _load_accounts(self) -> None:
        saved = json.loads((self.data_dir / "smtp-accounts.json").read_text())
        self.accounts = [DemoAccount(**record) for record in saved["accounts"]]
        self.extra = saved["extra"]

    # ----------------------------------------------------------------- conveniences for tests

    def account(self, type_: str, index: int = 0) -> DemoAccount:
        return [a for a in self.accounts if a.type == type_][index]

    @property
    def ca_file(self) -> str:
        return self.extra["ca_file"]

    def wait_delivered(self) -> None:
        """Until the local delivery workers have nothing scheduled."""
        assert self.queue is not None
        self.call(self.queue.local.wait_idle())

    def inbox(self, address: str) -> list[bytes]:
        """Every message in the INBOX of ``address``, as the mail store returns it."""
        return self.call(self._inbox(address))

    async def _inbox(self, address: str) -> list[bytes]:
        from gateway.mailstore.interface import FolderRef
        assert self.directory is not None and self.mail_store is not None
        account = await self.directory.account(address)
        assert account is not None
        store = self.mail_store.store
        await self.mail_store.provision(account.mailbox_id)
        folder = FolderRef(account.mailbox_id, "INBOX")
        snapshot = await store.select(folder, read_only=True)
        bodies = []
        for uid in snapshot.uids:
            async with await store.open_message(folder, uid) as body:
                bodies.append(await body.read())
        return bodies

"""Documents filed per second by the DMP bridge's FilingWorker, on SQLite with fsync on.

A stream of messages, each carrying one CI-SIS CDA (the VAC-NOTE sample with a
fresh id and setId per message, so every one is a new document), is delivered
into the test patient's mailbox first; then one worker pass reads each message
from the mail store, extracts and parses the CDA, identifies the patient
against the directory, writes the encrypted document (fsync) and its row, its
audit entry and its outcome, and queues the patient's notification. Only the
filing pass is timed: wall clock, and the CPU time of the whole process (every thread:
the event loop, SQLite's connection threads, the blob and spool writers) per document,
which is what to compare on a machine that others keep busy, plus that of the extraction processes
(``filing.extract_processes``, started before the timing as ``gateway serve`` starts them). Run:

    .venv/bin/python bench/dmp_filing.py [--count N] [--database URL]

Before (one transaction per job, one audit head claim per entry): 6-20 documents/s,
about 55-60 ms of CPU per document; see docs/PERFORMANCE.md for the measured figures.
The batch's transaction as one synchronous function (run_in_transaction, SQL Core):
about 8 ms of CPU per document against 9.5 for the async ORM transaction, side by side.
After the pass, the audit chain is verified (as ``gateway audit verify`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from gateway.audit.log import AuditLog
from gateway.config import load_settings
from gateway.directory.identifiers import add_luhn_key
from gateway.directory.service import DirectoryService
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.worker import build_filing_worker
from gateway.mailstore.delivery import LocalDelivery
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.queue.tables import QueuedMessage
from gateway.security.at_rest import FieldSealer, SpoolCipher
from gateway.security.keys import KeyManager
from gateway.queue.generated import GeneratedMailQueue
from gateway.queue.spool import Spool
from gateway.security.passwords import PasswordHasher
from gateway.storage.blobs import BlobStore
from gateway.storage import db as db_module
from gateway.storage.db import Database

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "samples" / "VAC-NOTE_2023.01.xml"
INS, OID = "279035121518989", "1.2.250.1.213.1.4.10"

LAB = "resultats.labo@demo.mssante.localhost"


class BenchServices:
    """The subset of gateway.app.Services the filing worker needs, over a throwaway data directory."""

    def __init__(self, data_dir: Path, database_url: str | None, extract_processes: int | None = None) -> None:
        self.settings = load_settings(data_dir=data_dir, environ={})
        if extract_processes is not None:
            self.settings.filing.extract_processes = extract_processes
        self.db = Database(database_url or f"sqlite+aiosqlite:///{data_dir / 'bench.db'}")
        self.directory = DirectoryService(self.db, self.settings, PasswordHasher(time_cost=1, memory_kib=8))
        self.blobs = BlobStore(data_dir / "blobs", KeyManager(self.db, data_dir / "keys"))
        self.fields = FieldSealer(self.blobs.keys)
        self.hub = ChangeHub()
        self.mailstore = SqlMailStore(self.db, self.blobs, self.hub)
        self.smime = None  # the bench's documents are not S/MIME
        # Acknowledgements are queued (sealed, in their queue rows or spool files), not delivered: the bench
        # times the filing. The spool is built as ``open_services`` builds it once the keys exist (``prepare``).
        self.spool_root = data_dir / "spool"
        self.generated = GeneratedMailQueue(self.settings, self.directory, Spool(self.spool_root), schedule_local=None)


def document(number: int) -> bytes:
    cda = SAMPLE.read_bytes()
    cda = cda.replace(b'<id root="1.2.250.1.213.1.1.1.46.2023.1.1"/>', f'<id root="1.2.250.1.999.{number}.1"/>'.encode())
    return cda.replace(b'<setId root="1.2.250.1.213.1.1.1.46.2023.1"/>', f'<setId root="1.2.250.1.999.{number}"/>'.encode())


def message(number: int, patient_address: str) -> bytes:
    mail = EmailMessage(policy=email.policy.SMTP)
    mail["Return-Path"] = f"<{LAB}>"
    mail["From"] = LAB
    mail["To"] = patient_address
    mail["Subject"] = f"XDM/1.0/DDM+Note de vaccination {number}"
    mail["Message-ID"] = f"<{number}@bench.dmp>"
    mail.set_content("Compte rendu en pièce jointe.\n")
    mail.add_attachment(document(number), maintype="text", subtype="xml", filename="VAC-NOTE.xml")
    return mail.as_bytes()


async def prepare(services: BenchServices, count: int) -> None:
    await services.db.migrate()
    # As gateway.app.open_services builds it: sealed under the spool key, small messages in their queue rows.
    services.generated.spool = Spool(services.spool_root, await SpoolCipher.load(services.blobs.keys), db=services.db)
    await services.directory.add_local_domain("demo.mssante.localhost")
    await services.directory.add_local_domain(services.settings.directory.patient_domain, kind="patient")
    patient = await services.directory.add_patient(ins=INS, ins_oid=OID, birth_family_name="PAT-TROIS",
                                                   first_given_name="DOMINIQUE", birth_date="1979-03-28", sex="F")
    # The lab's application mailbox deposits the documents: the filing binds them to the sender that the
    # submission door authenticated, read from the queue row the door wrote at acceptance.
    lab = await services.directory.add_organisation(id_type="SIRET", id_value=add_luhn_key("1234567800001"),
                                                    name="LABO BENCH")
    await services.directory.create_mailbox(address=LAB, type="APP", owner=lab["idnst"])
    account = await services.directory.account(patient["mailbox"])
    assert account is not None
    delivery = LocalDelivery(services.mailstore)
    for number in range(count):
        raw = message(number, patient["mailbox"])
        async with services.db.session() as session:
            session.add(QueuedMessage(id=f"bench{number}", door="submission", sender=LAB, size=len(raw),
                                      trace_headers="", client_address="127.0.0.1", authenticated_as=LAB))
            await session.commit()
        await delivery.deliver(account.mailbox_id, raw, delivery_key=f"bench{number}:1")


@contextlib.contextmanager
def sampled(output: str | None):  # type: ignore[no-untyped-def]
    """py-spy sampling this very process (every thread) while the filing pass runs, when asked."""
    if output is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [spy, "record", "--pid", str(os.getpid()), "--threads", "--gil", "--rate", "250", "--format",
               "raw" if not output.endswith(".svg") else "flamegraph", "--output", output]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


@contextlib.contextmanager
def traced(output: str | None):  # type: ignore[no-untyped-def]
    """``strace -c -f`` of this very process (every thread) while the filing pass runs, when asked: the
    count of fsync and fdatasync calls (the durability cost per document), a summary table into ``output``."""
    if output is None:
        yield
        return
    command = ["strace", "-c", "-f", "-e", "trace=fsync,fdatasync", "-o", output, "-p", str(os.getpid())]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # strace attaches to every thread
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def _syscalls(output: str) -> dict[str, int]:
    """The calls counted by ``strace -c`` in ``output``, by name."""
    counted: dict[str, int] = {}
    for line in Path(output).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in ("fsync", "fdatasync") and fields[3].isdigit():
            counted[fields[-1]] = int(fields[3])
    return counted


class DatabaseThreadClock:
    """The CPU and wall time the filing's synchronous transactions spend on SQLite's database thread
    (``Database.run_in_transaction``: the forecast and the batch's transaction), while the pass runs."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0
        self.transactions = 0

    @contextlib.contextmanager
    def watching(self):  # type: ignore[no-untyped-def]
        original = db_module._run_sync_transaction

        def timed(*args):  # type: ignore[no-untyped-def]
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return original(*args)
            finally:
                self.cpu += time.thread_time() - cpu
                self.wall += time.perf_counter() - wall
                self.transactions += 1

        db_module._run_sync_transaction = timed
        try:
            yield self
        finally:
            db_module._run_sync_transaction = original


def _helper_cpu(worker: object) -> float:
    """The CPU seconds used so far by the filing's extraction processes (``filing.extract_processes``)."""
    pool = getattr(getattr(worker, "examiner", None), "_pool", None)
    total = 0.0
    for process in (getattr(pool, "_processes", None) or {}).values():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def main(count: int, database_url: str | None, profile: str | None = None,
               extract_processes: int | None = None, strace: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        services = BenchServices(Path(directory), database_url, extract_processes)
        try:
            await prepare(services, count)
            worker = build_filing_worker(services)
            await worker.examiner.start()  # as `gateway serve` does before its first pass
            clock = DatabaseThreadClock()
            with sampled(profile), traced(strace), clock.watching():
                started, cpu_started = time.perf_counter(), time.process_time()
                helpers_started = _helper_cpu(worker)
                jobs = await worker.run_once()
                elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                helpers = _helper_cpu(worker) - helpers_started
                cpu += helpers
            await worker.stop()
            filed = len(await RecordStore(services.db, services.blobs).list_for_patient(INS))
            files = {name: sum(1 for path in (Path(directory) / name).rglob("*") if path.is_file())
                     for name in ("blobs", "spool")}
            chain = await AuditLog.for_data_dir(services.db, services.settings.data_path).verify()
            if not chain.ok:
                raise SystemExit(f"the audit chain does not verify: {chain.summary()}")
        finally:
            await services.db.dispose()
    print(f"{jobs} messages, {filed} documents filed in {elapsed:.2f} s: {filed / elapsed:.1f} documents/s, "
          f"{1000 * cpu / max(filed, 1):.1f} ms CPU/document "
          f"(of which {1000 * helpers / max(filed, 1):.1f} in {worker.examiner.processes} extraction process(es)) "
          f"({'SQLite, synchronous=FULL' if database_url is None else database_url.split(':', 1)[0]}); "
          f"audit chain {chain.summary()}")
    print(f"files left: {files['blobs']} blob files (the delivered messages' included), "
          f"{files['spool']} spool files")
    if strace is not None:
        counted = _syscalls(strace)
        print(f"strace: {counted.get('fsync', 0)} fsync + {counted.get('fdatasync', 0)} fdatasync during the pass: "
              f"{sum(counted.values()) / max(filed, 1):.2f} per document")
    if clock.transactions:
        print(f"database thread: {clock.transactions} transactions, {1000 * clock.cpu / max(filed, 1):.2f} ms CPU and "
              f"{1000 * clock.wall / max(filed, 1):.2f} ms wall per document")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--database", help="database URL (default: SQLite in a temporary directory)")
    parser.add_argument("--profile", metavar="FILE",
                        help="sample the filing pass with py-spy into FILE (.svg: a flame graph; else collapsed stacks)")
    parser.add_argument("--extract-processes", type=int, metavar="N",
                        help="filing.extract_processes (default: the configuration's default; 0: worker threads)")
    parser.add_argument("--strace", metavar="FILE",
                        help="count the filing pass's fsync and fdatasync calls (strace -c -f) into FILE")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.count, arguments.database, arguments.profile, arguments.extract_processes,
                     arguments.strace))

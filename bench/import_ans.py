"""Benchmark: import a synthetic ANS MSSanté extraction twice into a fresh database.

Generates ``--rows`` rows (default 100,000) in a temporary directory, imports
them into a fresh SQLite database (or ``--database-url``, which must point to an
empty database), then imports the same file again (the idempotent path: nothing
to write). Prints one result line and a Markdown table row for docs/PERFORMANCE.md.

    .venv/bin/python bench/import_ans.py [--rows N] [--database-url URL] [--batch-size N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.directory.ans_import import DEFAULT_BATCH_SIZE, ImportReport, import_ans_extraction  # noqa: E402
from gateway.directory.synthetic import write_synthetic_extraction  # noqa: E402
from gateway.storage.db import Database  # noqa: E402
from gateway.storage.models import LocalDomain, TrustedDomain  # noqa: E402

LOCAL_DOMAIN = "ch-bench.mssante.fr"
TRUSTED_DOMAIN = "labo-bench.mssante.fr"


@dataclass
class Run:
    report: ImportReport
    seconds: float
    cpu_seconds: float  # user + system CPU of this process: what the import cost, whatever the machine's load
    rss_before_mib: float  # the process's RSS when the import started (the generator's leftovers included)
    peak_rss_mib: float  # the process's peak RSS during the import alone (Linux; else the process's peak)

    @property
    def rows_per_second(self) -> float:
        return self.report.rows / self.seconds if self.seconds else 0.0


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


async def prepare(db: Database) -> None:
    await db.migrate()
    async with db.session() as session:
        session.add(LocalDomain(name=LOCAL_DOMAIN))
        session.add(TrustedDomain(name=TRUSTED_DOMAIN, source="manual"))


def _status_mib(field: str) -> float | None:
    """A memory figure of /proc/self/status (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_process_peak_mib = 0.0  # the whole process's peak, kept across the resets below


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs), so a peak is one import's."""
    global _process_peak_mib
    _process_peak_mib = max(_process_peak_mib, peak_rss_mib())
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


async def timed_import(db: Database, path: Path, batch_size: int) -> Run:
    gc.collect()
    _reset_peak_rss()
    rss_before = _status_mib("VmRSS") or 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    report = await import_ans_extraction(db, path, batch_size=batch_size)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return Run(report, seconds, cpu_seconds, rss_before, _status_mib("VmHWM") or peak_rss_mib())


async def bench(rows: int, database_url: str | None, batch_size: int, workdir: Path) -> tuple[Run, Run, float]:
    path = workdir / "Extraction_Correspondance_MSSante_bench.txt"
    started = time.perf_counter()
    write_synthetic_extraction(path, rows, domains=[LOCAL_DOMAIN, TRUSTED_DOMAIN], seed=1, bad_rows=True)
    generate_seconds = time.perf_counter() - started
    db = Database(database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}")
    try:
        await prepare(db)
        first = await timed_import(db, path, batch_size)
        second = await timed_import(db, path, batch_size)
    finally:
        await db.dispose()
    return first, second, generate_seconds


def describe(run: Run) -> str:
    r = run.report
    return (f"{run.seconds:.2f} s, CPU {run.cpu_seconds:.2f} s ({run.rows_per_second:,.0f} rows/s; created {r.created}, updated {r.updated}, "
            f"unchanged {r.unchanged}, rejected {r.rejected}; longest batch {r.longest_batch_seconds:.2f} s; "
            f"RSS {run.rss_before_mib:.0f} MiB at the start, peak {run.peak_rss_mib:.0f} MiB during the import)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--database-url", help="an empty database (default: a fresh SQLite file in a temp dir)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-import-ans-") as tmp:
        first, second, generated = asyncio.run(bench(args.rows, args.database_url, args.batch_size, Path(tmp)))
    backend = (args.database_url or "sqlite").split(":", 1)[0].split("+", 1)[0]
    machine = f"{os.cpu_count()} CPU, Python {platform.python_version()}"
    rss = max(_process_peak_mib, peak_rss_mib())  # generator and both imports
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"import_ans rows={args.rows} db={backend} generate={generated:.2f}s first: {describe(first)}; "
          f"second: {describe(second)}; peak RSS {rss:.0f} MiB ({machine}; load average at the end {load})")
    print("| benchmark | rows | database | load | first import (CPU) | rows/s | re-import, no change (CPU) | rows/s "
          "| peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| import_ans | {args.rows:,} | {backend} | {load} | {first.seconds:.2f} s ({first.cpu_seconds:.2f} s) | "
          f"{first.rows_per_second:,.0f} | {second.seconds:.2f} s ({second.cpu_seconds:.2f} s) | "
          f"{second.rows_per_second:,.0f} | {rss:.0f} MiB |")


if __name__ == "__main__":
    main()

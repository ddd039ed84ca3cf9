"""Benchmark: directory search latency among a national-size directory.

Imports a synthetic ANS extraction of ``--rows`` rows (default 536,000, the national
size) into a fresh SQLite database (or ``--database-url``, an empty database), then
times ``DirectoryService.list_professionals(query=...)`` (what ``gateway directory
search professional QUERY`` runs): name prefixes of 3-6 letters, typed with accents
and capitals, found through the indexed folded ``search_name`` column, and a
substring that only the unindexed ``search_text`` holds (the slow path, for contrast).

    .venv/bin/python bench/directory_search.py [--rows N] [--database-url URL] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.import_ans import LOCAL_DOMAIN, TRUSTED_DOMAIN, prepare  # noqa: E402
from gateway.config import load_settings  # noqa: E402
from gateway.directory.ans_import import import_ans_extraction  # noqa: E402
from gateway.directory.service import DirectoryService  # noqa: E402
from gateway.directory.synthetic import write_synthetic_extraction  # noqa: E402
from gateway.security.passwords import PasswordHasher  # noqa: E402
from gateway.storage.db import Database  # noqa: E402

PREFIXES = ("MAR", "Léf", "DUR", "bern", "Petit", "GARCÍ", "rous", "Morel")


async def bench(rows: int, database_url: str | None, repeat: int, workdir: Path) -> dict[str, list[float]]:
    path = workdir / "extraction.txt"
    write_synthetic_extraction(path, rows, domains=[LOCAL_DOMAIN, TRUSTED_DOMAIN], seed=1, bad_rows=False)
    db = Database(database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}")
    try:
        await prepare(db)
        started = time.perf_counter()
        report = await import_ans_extraction(db, path)
        print(f"imported {report.created} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        settings = load_settings(data_dir=workdir / "data", environ={})
        directory = DirectoryService(db, settings, PasswordHasher.from_settings(settings.auth))
        timings: dict[str, list[float]] = {}
        for query in [*PREFIXES, "ETIENNE"]:
            await directory.list_professionals(query=query, limit=100)  # warm the cache and the plan
            samples = []
            for _ in range(repeat):
                started = time.perf_counter()
                found = await directory.list_professionals(query=query, limit=100)
                samples.append((time.perf_counter() - started) * 1000)
            timings[f"{query} ({len(found)} found)"] = samples
        return timings
    finally:
        await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=536_000)
    parser.add_argument("--database-url", help="an empty database (default: a fresh SQLite file in a temp dir)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        timings = asyncio.run(bench(args.rows, args.database_url, args.repeat, Path(tmp)))
    backend = (args.database_url or "sqlite").split(":", 1)[0].split("+", 1)[0]
    print("| query | rows | database | median | p95 |")
    print("| --- | --- | --- | --- | --- |")
    for query, samples in timings.items():
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
        print(f"| {query} | {args.rows:,} | {backend} | {statistics.median(samples):.1f} ms | {p95:.1f} ms |")


if __name__ == "__main__":
    main()

"""The blind index's share of a delivery: CPU and bytes per message of its tokens and rows, alone.

For each message of the SMTP benchmark's shape (``bench/compare_smtp.py``: From with a display name,
To, a numbered Subject, a random Message-ID), times in this process's CPU:

- ``tokens``: ``IndexKey.message_tokens`` (one keyed BLAKE2b per trigram of the five header columns);
- ``rows``: ``append_rows.write_tokens`` on a SQLite file (WAL, synchronous=FULL, the store's own
  tables: one packed row per message, in transactions of ``--batch`` messages as the delivery group
  commit writes them), plus the folds into the posting lists (and their compactions) that the store runs
  in transactions of their own every ``blind_index.FOLD_AT`` messages (``BlindIndex.fold_all``);

and the octets the database gained per message (main file plus WAL after a checkpoint) and the octets
the process wrote to storage per message (``/proc/self/io`` write_bytes: WAL frames and checkpoints).
``--prefill N`` first writes N messages (untimed), to see the cost once the posting lists are big: each
message's tokens are random keys, so every one lands on another leaf page.

    PYTHONPATH=. .venv/bin/python bench/blind_index_rows.py [--messages 2000] [--prefill 0] [--batch 10]

Run it with PYTHONPATH pointing at two trees to compare them (prints one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, event

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import cast

from gateway.mailstore.append_rows import write_tokens
from gateway.mailstore.blind_index import BlindIndex, IndexKey
from gateway.mailstore.tables import MessageTokens, TokenPostings
from gateway.security.keys import KeyManager

MAILBOX = 1


def values(number: int) -> dict[str, str | None]:
    return {"from_addr": "load sender <claire.medecin@demo.mssante.localhost>",
            "to_addr": "<marc.pharmacien@demo.mssante.localhost>", "cc_addr": None,
            "subject": f"load test message {number}",
            "message_id": f"<{secrets.token_hex(8)}.{number}@loadgen.invalid>"}


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--batch", type=int, default=10)
    args = parser.parse_args()
    key = IndexKey(secrets.token_bytes(32))
    with tempfile.TemporaryDirectory(prefix="blind-index-rows-") as workdir:
        path = Path(workdir) / "index.db"
        engine = create_engine(f"sqlite:///{path}")

        @event.listens_for(engine, "connect")
        def pragmas(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        for table in (MessageTokens, TokenPostings):   # no foreign keys enforced here (no PRAGMA foreign_keys)
            table.__table__.create(engine)  # type: ignore[attr-defined]
        index = BlindIndex(cast(KeyManager, None))       # only its fold bookkeeping: no key is derived

        def write(first: int, count: int) -> tuple[float, float, int]:
            token_cpu = row_cpu = 0.0
            tokens_written = 0
            for start in range(first, first + count, args.batch):
                numbers = range(start, min(first + count, start + args.batch))
                began = time.process_time()
                batch = [(number, key.message_tokens(values(number))) for number in numbers]
                token_cpu += time.process_time() - began
                began = time.process_time()
                with engine.begin() as connection:
                    for number, tokens in batch:
                        write_tokens(connection, MAILBOX, number + 1, tokens)
                        tokens_written += len(tokens)
                if index.note_unposted(MAILBOX, len(batch)):
                    with engine.begin() as connection:
                        index.fold_all(connection, MAILBOX)
                row_cpu += time.process_time() - began
            return token_cpu, row_cpu, tokens_written

        if args.prefill:
            write(0, args.prefill)
        with engine.begin() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        size_before = path.stat().st_size
        io_before = written_bytes()
        token_cpu, row_cpu, tokens = write(args.prefill, args.messages)
        io_after = written_bytes()
        with engine.begin() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        size_after = path.stat().st_size
        engine.dispose()
    per = 1_000_000 / args.messages
    print(json.dumps({
        "tree": os.environ.get("PYTHONPATH", ""), "messages": args.messages, "prefill": args.prefill,
        "batch": args.batch, "tokens_per_message": round(tokens / args.messages, 1),
        "cpu_us_per_message": {"tokens": round(token_cpu * per, 1), "rows": round(row_cpu * per, 1)},
        "database_bytes_per_message": round((size_after - size_before) / args.messages),
        "written_bytes_per_message": round((io_after - io_before) / args.messages),
    }, indent=2))


if __name__ == "__main__":
    main()

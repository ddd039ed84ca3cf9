"""Counts the SQL statements SQLite runs in this process, for benchmarks (statements per message).

Loaded by Python at start-up when this directory is on PYTHONPATH (``sitecustomize``) and
``BENCH_SQL_STATEMENTS`` names an output file: every ``sqlite3.connect`` gets a trace callback
(``Connection.set_trace_callback``) counting each statement SQLite executes (BEGIN and COMMIT included)
by its first words; the counts are written to ``<that file>.<pid>`` as JSON every 2,000 statements and at exit.

    PYTHONPATH=bench/stmtcount:$PWD BENCH_SQL_STATEMENTS=/tmp/stmts.json python -m gateway ...
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import sqlite3
import sys
import threading

_OUT = os.environ.get("BENCH_SQL_STATEMENTS")
if _OUT:
    _OUT = f"{_OUT}.{os.getpid()}"               # one file per process (the bench and the server both count)

if _OUT:
    _counts: collections.Counter[str] = collections.Counter()
    _lock = threading.Lock()
    _real_connect = sqlite3.connect
    _TABLE = re.compile(r"^\s*(INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM|SELECT\b.*?\bFROM|BEGIN\s*\w*|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|PRAGMA)\s*\(?\s*(\w*)",
                        re.IGNORECASE | re.DOTALL)

    def _dump() -> None:
        with _lock:
            data = {"argv": sys.argv, "total": sum(_counts.values()), "by_kind": dict(_counts.most_common())}
        tmp = f"{_OUT}.tmp"
        with open(tmp, "w") as file:
            json.dump(data, file, indent=1)
        os.replace(tmp, _OUT)

    def _trace(statement: str) -> None:
        match = _TABLE.match(statement)
        kind = " ".join(match.group(1).split()[:1] + [match.group(2)]) if match else statement.split(None, 1)[0]
        with _lock:
            _counts[kind.upper()] += 1
            total = sum(_counts.values())
        if total % 2000 == 0:
            _dump()

    def _connect(*args, **kwargs):  # type: ignore[no-untyped-def]
        connection = _real_connect(*args, **kwargs)
        connection.set_trace_callback(_trace)
        return connection

    sqlite3.connect = _connect  # type: ignore[assignment]
    sqlite3.dbapi2.connect = _connect  # type: ignore[assignment]  # what SQLAlchemy's pysqlite dialect calls
    atexit.register(_dump)

if _OUT and os.environ.get("BENCH_SQL_CONNECT_STACKS"):
    # Where the engine opens connections (a pool that closes and reopens them shows here).
    import traceback

    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    def _opened(_dbapi_connection: object, _record: object) -> None:
        import greenlet
        parent = greenlet.getcurrent().parent            # the async caller, suspended in greenlet_spawn
        stack = traceback.extract_stack(parent.gr_frame) if parent is not None and parent.gr_frame else []
        frames = [f"{f.filename.rsplit('/gateway/', 1)[-1]}:{f.lineno}:{f.name}" for f in stack
                  if "/gateway/" in f.filename][-5:]
        with _lock:
            _counts["CONNECT " + " < ".join(reversed(frames))] += 1

    event.listen(Pool, "connect", _opened)

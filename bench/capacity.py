"""The costs behind docs/DEPLOYMENT.md's capacity model, measured on a real ``gateway serve``.

    PYTHONPATH=. .venv/bin/python bench/capacity.py messages --database postgresql --messages 600
    PYTHONPATH=. .venv/bin/python bench/capacity.py messages --database sqlite --messages 600
    PYTHONPATH=. .venv/bin/python bench/capacity.py connections --count 200
    PYTHONPATH=. .venv/bin/python bench/capacity.py argon2 --rounds 40

- ``messages``: a fresh ``gateway init --demo``; on ``postgresql`` a cluster set up as docs/DEPLOYMENT.md says
  (tests/ops/pg_deployment.py: deploy/postgresql/gateway.conf, fsync and synchronous_commit on, the gateway as a
  plain role over TLS). The same smtp_load.py load as bench/compare_smtp.py (submission, STARTTLS + AUTH, N
  messages of --size octets to one mailbox); then: server CPU seconds per message accepted + delivered
  (/proc/PID/stat utime + stime, every thread), and what stays per message: rows and bytes per table (PostgreSQL:
  pg_total_relation_size, tables + indexes + TOAST, after VACUUM; SQLite: the database file), blob bytes under
  data_dir/blobs, spool bytes left. Then (--readers, 5) every message is read and deleted over IMAPS as a client
  does (STATUS, UID FETCH FLAGS / ENVELOPE / BODY.PEEK[], STORE \\Seen, STORE \\Deleted, UID EXPUNGE): server
  CPU per message read and per command.
- ``connections``: --count IMAPS connections logged in with INBOX selected, then --count SMTP submission sessions
  after STARTTLS + AUTH, all left open: the server's RSS growth per connection, and its CPU per connection set up
  (TLS handshake + one argon2id verification + SELECT / EHLO).
- ``argon2``: one argon2id verification with the gateway's parameters (gateway/security/passwords.py,
  auth.argon2_*), CPU ms of this process (time.process_time) and wall ms.

Prints one JSON object. Not a test: figures vary with the machine and its load (report CPU, not wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import json
import os
import shutil
import smtplib
import sqlite3
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from compare_smtp import cpu_seconds, run_load  # noqa: E402

from tests.harness import GatewayProcess  # noqa: E402

UNLIMITED = {"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0", "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0",
             "GATEWAY_SMTP_MAX_CONNECTIONS_PER_IP": "100000", "GATEWAY_SMTP_MAX_SESSIONS_PER_USER": "100000",
             "GATEWAY_IMAP_MAX_CONNECTIONS_PER_USER": "1000", "GATEWAY_IMAP_MAX_CONNECTIONS": "100000"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def tree_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under ``path``."""
    total = count = 0
    for item in path.rglob("*") if path.exists() else []:
        if item.is_file() and not item.is_symlink():
            total += item.stat().st_size
            count += 1
    return total, count


# ------------------------------------------------------------------------------------------------ storage snapshots

async def _pg_snapshot(env: dict[str, str], vacuum: bool) -> dict[str, dict[str, int]]:
    import asyncpg
    url = env["GATEWAY_DATABASE_URL"].replace("postgresql+asyncpg", "postgresql")
    context = ssl.create_default_context(cafile=env["PGSSLROOTCERT"])
    connection = await asyncpg.connect(url, ssl=context)
    try:
        if vacuum:
            await connection.execute("VACUUM ANALYZE")
        tables = [row["tablename"] for row in await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
        result = {}
        for table in tables:
            rows = await connection.fetchval(f'SELECT count(*) FROM "{table}"')
            size = await connection.fetchval("SELECT pg_total_relation_size($1::regclass)", f'public."{table}"')
            result[table] = {"rows": int(rows), "bytes": int(size)}
        result["(database)"] = {"rows": 0, "bytes": int(await connection.fetchval(
            "SELECT pg_database_size(current_database())"))}
        # Commits (every transaction of every connection to this database) and WAL written so far: the server
        # itself counts them; the snapshot's own VACUUM and queries are a few, against hundreds per run.
        await connection.execute("SELECT pg_stat_clear_snapshot()")
        result["(commits)"] = {"rows": int(await connection.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")), "bytes": 0}
        result["(wal)"] = {"rows": 0, "bytes": int(await connection.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"))}
        return result
    finally:
        await connection.close()


def _sqlite_snapshot(database: Path) -> dict[str, dict[str, int]]:
    with sqlite3.connect(database, timeout=30) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        tables = [row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        result = {table: {"rows": int(connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]),
                          "bytes": 0} for table in tables}
    result["(database)"] = {"rows": 0, "bytes": database.stat().st_size}
    return result


def _delivered(gateway: GatewayProcess, env: dict[str, str]) -> int:
    query = "SELECT count(*) FROM queue_recipients WHERE state = 'delivered'"
    if "GATEWAY_DATABASE_URL" not in env:
        with sqlite3.connect(gateway.data_dir / "gateway.db", timeout=30) as connection:
            return int(connection.execute(query).fetchone()[0])

    async def count() -> int:
        import asyncpg
        connection = await asyncpg.connect(env["GATEWAY_DATABASE_URL"].replace("postgresql+asyncpg", "postgresql"),
                                           ssl=ssl.create_default_context(cafile=env["PGSSLROOTCERT"]))
        try:
            return int(await connection.fetchval(query))
        finally:
            await connection.close()
    return asyncio.run(count())


def snapshot(gateway: GatewayProcess, env: dict[str, str]) -> dict[str, Any]:
    if "GATEWAY_DATABASE_URL" in env:
        tables = asyncio.run(_pg_snapshot(env, vacuum=True))
    else:
        tables = _sqlite_snapshot(gateway.data_dir / "gateway.db")
    blobs, blob_files = tree_bytes(gateway.data_dir / "blobs")
    spool, spool_files = tree_bytes(gateway.data_dir / "spool")
    return {"tables": tables, "blobs": {"bytes": blobs, "files": blob_files},
            "spool": {"bytes": spool, "files": spool_files}}


def per_message(before: dict[str, Any], after: dict[str, Any], messages: int) -> dict[str, Any]:
    grown = {}
    for table, values in after["tables"].items():
        old = before["tables"].get(table, {"rows": 0, "bytes": 0})
        rows, size = values["rows"] - old["rows"], values["bytes"] - old["bytes"]
        if rows or size:
            grown[table] = {"rows_per_msg": round(rows / messages, 3), "bytes_per_msg": round(size / messages, 1)}
    return {"tables": grown,
            "blob_bytes_per_msg": round((after["blobs"]["bytes"] - before["blobs"]["bytes"]) / messages, 1),
            "blob_files_per_msg": round((after["blobs"]["files"] - before["blobs"]["files"]) / messages, 3),
            "spool_bytes_left": after["spool"]["bytes"]}


def measure_messages(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="capacity-"))
    cluster = None
    env: dict[str, str] = dict(UNLIMITED)
    if args.database == "postgresql":
        from tests.ops.pg_deployment import DeployedPostgres
        cluster = DeployedPostgres()
        cluster.start()
        env.update(cluster.gateway_env())
    gateway = GatewayProcess(root / "data", extra_env=env)
    try:
        gateway.start()
        assert gateway.process is not None
        pid = gateway.process.pid
        sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
        time.sleep(2)   # start-up work (queue recovery, first scrapes) out of the figure
        before = snapshot(gateway, env)
        cpu_before, rss_before = cpu_seconds(pid), rss_kib(pid)
        summary, started = run_load(gateway.ports["smtp_submission_port"], args, [
            "--starttls", "--insecure", "--auth-user", sender["address"], "--auth-pass", sender["password"],
            "--from", sender["address"], "--to", recipient["address"]])
        accepted = int(summary.get("ok", 0))
        deadline = time.monotonic() + 600
        while _delivered(gateway, env) < accepted and time.monotonic() < deadline:
            time.sleep(0.2)
        delivered_after = time.monotonic() - started
        cpu = cpu_seconds(pid) - cpu_before
        rss_after = rss_kib(pid)
        after = snapshot(gateway, env)
        reading = read_everything(gateway, recipient, args.readers) if args.readers else None
    finally:
        gateway.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {"database": args.database, "messages": accepted, "size": args.size, "concurrency": args.concurrency,
            "accepted_msgs_per_s": summary.get("msgs_per_s"), "all_delivered_after_s": round(delivered_after, 2),
            "server_cpu_s": round(cpu, 2), "server_cpu_ms_per_msg": round(cpu * 1000 / max(1, accepted), 2),
            "rss_mb": {"before": round(rss_before / 1024, 1), "after": round(rss_after / 1024, 1)},
            "per_message": per_message(before, after, max(1, accepted)),
            "database_bytes": {"before": before["tables"]["(database)"]["bytes"],
                               "after": after["tables"]["(database)"]["bytes"]},
            "reading": reading}


READ_STEPS = 7   # per message, as a client reads and then deletes it (the capacity model's "read once")


def read_everything(gateway: GatewayProcess, account: dict[str, Any], readers: int) -> dict[str, Any]:
    """``readers`` IMAPS clients, logged in with INBOX selected, share the INBOX's messages; for each one:
    STATUS INBOX (the new-mail check), UID FETCH (FLAGS), (ENVELOPE), (BODY.PEEK[]), UID STORE +FLAGS (\\Seen),
    UID STORE +FLAGS.SILENT (\\Deleted), UID EXPUNGE. Server CPU from the first command to the last (the logins
    and SELECTs before are not in it)."""
    import threading
    assert gateway.process is not None
    pid = gateway.process.pid
    context = ssl.create_default_context(cafile=gateway.ca_file)
    clients = []
    for _ in range(readers):
        client = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=context)
        client.login(account["address"], account["password"])
        client.select("INBOX")
        clients.append(client)
    _, found = clients[0].uid("SEARCH", "ALL")
    uids = found[0].decode().split()
    errors: list[str] = []

    def read(client: imaplib.IMAP4_SSL, mine: list[str]) -> None:
        for uid in mine:
            replies = [client.status("INBOX", "(MESSAGES UNSEEN UIDNEXT)"),
                       client.uid("FETCH", uid, "(FLAGS)"), client.uid("FETCH", uid, "(ENVELOPE)"),
                       client.uid("FETCH", uid, "(BODY.PEEK[])"), client.uid("STORE", uid, "+FLAGS", "(\\Seen)"),
                       client.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)"), client.uid("EXPUNGE", uid)]
            errors.extend(f"{uid}: {typ} {data!r}"[:200] for typ, data in replies if typ != "OK")

    cpu, wall = cpu_seconds(pid), time.monotonic()
    threads = [threading.Thread(target=read, args=(client, uids[n::readers])) for n, client in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu, wall = cpu_seconds(pid) - cpu, time.monotonic() - wall
    for client in clients:
        client.logout()
    commands = READ_STEPS * len(uids)
    return {"readers": readers, "messages_read": len(uids), "commands": commands, "errors": len(errors),
            "first_errors": errors[:3], "server_cpu_s": round(cpu, 2),
            "server_cpu_ms_per_message_read": round(cpu * 1000 / max(1, len(uids)), 2),
            "server_cpu_ms_per_command": round(cpu * 1000 / max(1, commands), 2),
            "commands_per_s": round(commands / wall, 1)}


# ------------------------------------------------------------------------------------------------ connections

def measure_connections(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="capacity-conn-"))
    gateway = GatewayProcess(root / "data", extra_env=dict(UNLIMITED))
    imap_clients: list[imaplib.IMAP4_SSL] = []
    smtp_clients: list[smtplib.SMTP] = []
    try:
        gateway.start()
        assert gateway.process is not None
        pid = gateway.process.pid
        context = ssl.create_default_context(cafile=gateway.ca_file)
        accounts = [a for a in gateway.demo["accounts"] if a["type"] == "PER"]
        first = accounts[0]
        with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=context) as warm:
            warm.login(first["address"], first["password"])   # first login: caches, imports, the INBOX made
            warm.select("INBOX")
        with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"]) as smtp:
            smtp.starttls(context=context)
            smtp.login(first["address"], first["password"])
            smtp.sendmail(first["address"], [a["address"] for a in accounts],
                          f"From: {first['address']}\r\nSubject: warm\r\n\r\nwarm\r\n".encode())
        time.sleep(3)
        result: dict[str, Any] = {"count": args.count}
        rss0, cpu0 = rss_kib(pid), cpu_seconds(pid)
        for n in range(args.count):
            account = accounts[n % len(accounts)]
            client = imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=context)
            client.login(account["address"], account["password"])
            client.select("INBOX")
            imap_clients.append(client)
        time.sleep(3)
        rss1, cpu1 = rss_kib(pid), cpu_seconds(pid)
        result["imap_idle_logged_in_selected"] = {
            "rss_kib_per_connection": round((rss1 - rss0) / args.count, 1),
            "cpu_ms_per_connection_setup": round((cpu1 - cpu0) * 1000 / args.count, 2)}
        for n in range(args.count):
            account = accounts[n % len(accounts)]
            smtp = smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=60)
            smtp.starttls(context=context)
            smtp.login(account["address"], account["password"])
            smtp_clients.append(smtp)
        time.sleep(3)
        rss2, cpu2 = rss_kib(pid), cpu_seconds(pid)
        result["smtp_authenticated_idle"] = {
            "rss_kib_per_connection": round((rss2 - rss1) / args.count, 1),
            "cpu_ms_per_connection_setup": round((cpu2 - cpu1) * 1000 / args.count, 2)}
        result["rss_mb"] = {"before": round(rss0 / 1024, 1), "with_imap": round(rss1 / 1024, 1),
                            "with_imap_and_smtp": round(rss2 / 1024, 1)}
    finally:
        for client in imap_clients:
            try:
                client.logout()
            except Exception:  # noqa: BLE001
                pass
        for smtp in smtp_clients:
            try:
                smtp.quit()
            except Exception:  # noqa: BLE001
                pass
        gateway.stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------ argon2id

def measure_argon2(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.config import Settings
    from gateway.security.passwords import PasswordHasher

    auth = Settings().auth
    hasher = PasswordHasher.from_settings(auth)
    stored = hasher.hash("Correct-Horse-Battery-42")
    assert hasher.verify(stored, "Correct-Horse-Battery-42")
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(args.rounds):
        hasher.verify(stored, "Correct-Horse-Battery-42")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"parameters": {"time_cost": auth.argon2_time_cost, "memory_kib": auth.argon2_memory_kib,
                           "parallelism": auth.argon2_parallelism},
            "rounds": args.rounds, "cpu_ms_per_verify": round(cpu * 1000 / args.rounds, 2),
            "wall_ms_per_verify": round(wall * 1000 / args.rounds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    messages = commands.add_parser("messages")
    messages.add_argument("--database", choices=["sqlite", "postgresql"], default="postgresql")
    messages.add_argument("--messages", type=int, default=600)
    messages.add_argument("--concurrency", type=int, default=20)
    messages.add_argument("--size", type=int, default=4096)
    messages.add_argument("--max-seconds", type=int, default=600)
    messages.add_argument("--readers", type=int, default=5,
                          help="then read every message over IMAPS with this many clients (0: do not)")
    connections = commands.add_parser("connections")
    connections.add_argument("--count", type=int, default=200)
    argon = commands.add_parser("argon2")
    argon.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    measure = {"messages": measure_messages, "connections": measure_connections, "argon2": measure_argon2}
    print(json.dumps(measure[args.command](args), indent=2))


if __name__ == "__main__":
    os.umask(0o077)
    main()

"""Fill one mailbox with N messages, fast, in the gateway or in the reference Dovecot.

The messages are the ones ``/work/shared/bench-tools/imap_load.py --populate``
would APPEND (its ``make_message``: ~4 KB, ``From: Sender k <senderk@example.test>``
with k = i mod 50, ``Subject: Report i: <topic>``, a ``tok<i mod 997>`` body token,
every third one \\Seen), so both servers hold byte-identical mailboxes.

Gateway (``gateway`` subcommand): through the mail store, in the gateway's own
data directory (run it while ``gateway serve`` is stopped). Each body goes
through ``BlobStore.put`` (encrypted at rest, file + directory fsynced, as in
any delivery; ``--concurrency`` puts in flight), then the rows are inserted with
the store's own ``_insert_message`` (UID, MODSEQ, folder counters, cached
header fields and ENVELOPE exactly as APPEND writes them) in one transaction
per ``--batch`` messages under the folder lock. This is *not* the SMTP/APPEND
path (no per-message transaction, no protocol): it measures the store's bulk
write cost, and exists because 100,000 APPENDs would take far too long.

Dovecot (``dovecot`` subcommand): Maildir files written directly into
``/var/tmp/ref-mail/users/<user>/Maildir/cur`` (one file per message, flags in
the file name, owned by refmail, no fsync), then ``doveadm index`` builds
Dovecot's index and cache (timed separately: that is the work Dovecot would
otherwise do at the first SELECT).

    .venv/bin/python bench/populate_mailbox.py gateway --data-dir D --address A [--count 100000]
    .venv/bin/python bench/populate_mailbox.py dovecot --user user3 [--count 100000]

Prints one JSON object with the timings.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path("/work/shared/bench-tools")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))

from imap_load import make_message  # noqa: E402  (the shared load client's generator)

DOVECOT_CONF = "/etc/ref-mail/dovecot/dovecot.conf"
REF_USERS = Path("/var/tmp/ref-mail/users")


def message(i: int, size: int, to: str) -> tuple[bytes, bool]:
    """Message i (1-based) and whether it is \\Seen, as imap_load.py --populate makes them."""
    return make_message(i, size, to), i % 3 == 0


def internaldate(i: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(1700000000 + i * 60, dt.timezone.utc)


# ---------------------------------------------------------------- gateway

async def populate_gateway(data_dir: Path, address: str, count: int, size: int, batch: int,
                           concurrency: int) -> dict[str, object]:
    from sqlalchemy import select

    from gateway.app import open_services
    from gateway.config import load_settings
    from gateway.mailstore.delivery import LocalDelivery
    from gateway.mailstore.headers import MAX_HEADER_BYTES, header_section, parse_headers
    from gateway.mailstore.interface import INBOX, FolderRef
    from gateway.mailstore.sql import _next_modseq  # noqa: F401  (the store's own helpers are used below)
    from gateway.mailstore import flags as flagcodec
    from gateway.security.keys import mailbox_owner
    from gateway.storage.models import Mailbox

    settings = load_settings(data_dir=data_dir)
    async with open_services(settings, migrate=False) as services:
        store = services.mailstore
        async with services.db.session() as session:
            mailbox_id = await session.scalar(select(Mailbox.id).where(Mailbox.address == address))
        if mailbox_id is None:
            raise SystemExit(f"no mailbox {address} in {data_dir}")
        await LocalDelivery(store).provision(mailbox_id)
        ref = FolderRef(mailbox_id, INBOX)
        status = await store.status(ref)
        start = status.messages + 1
        owner = mailbox_owner(mailbox_id)
        seen_bits, seen_keywords = flagcodec.encode(["\\Seen"])
        none_bits, none_keywords = flagcodec.encode([])
        sealer = getattr(store, "headers", None)

        blob_s = db_s = 0.0
        started = time.perf_counter()
        for first in range(start, count + 1, batch):
            numbers = list(range(first, min(count, first + batch - 1) + 1))
            raws = [message(i, size, address) for i in numbers]

            t = time.perf_counter()
            pending = iter(range(len(raws)))
            stored: list[object] = [None] * len(raws)

            async def put_worker() -> None:
                for k in pending:
                    stored[k] = await store.blobs.put(owner, raws[k][0])

            await asyncio.gather(*(put_worker() for _ in range(concurrency)))
            blob_s += time.perf_counter() - t

            t = time.perf_counter()
            headers = [parse_headers(header_section(raw[:MAX_HEADER_BYTES])) for raw, _ in raws]
            if sealer is not None:
                headers = [await sealer.seal(owner, h) for h in headers]

            async def work(session, headers=headers, raws=raws, stored=stored, numbers=numbers):  # type: ignore[no-untyped-def]
                folder = await store._lock_folder(session, ref)
                for (raw, seen), blob, head, i in zip(raws, stored, headers, numbers, strict=True):
                    bits, keywords = (seen_bits, seen_keywords) if seen else (none_bits, none_keywords)
                    store._insert_message(session, folder, blob, head, bits, keywords, internaldate(i))
                await session.flush()

            await store._transaction(work)
            db_s += time.perf_counter() - t
            done = numbers[-1]
            if done % 10000 < batch:
                print(f"  {done}/{count}  {done / (time.perf_counter() - started):.0f} msg/s", file=sys.stderr)
        elapsed = time.perf_counter() - started
        final = await store.status(ref)
    added = count - start + 1 if count >= start else 0
    return {"server": "gateway", "address": address, "mailbox_id": mailbox_id, "added": added,
            "exists": final.messages, "elapsed_s": round(elapsed, 1),
            "msgs_per_s": round(added / elapsed, 1) if elapsed and added else None,
            "blob_put_s": round(blob_s, 1), "db_insert_s": round(db_s, 1), "put_concurrency": concurrency,
            "batch": batch}


# ---------------------------------------------------------------- dovecot

def populate_dovecot(user: str, count: int, size: int, fresh: bool) -> dict[str, object]:
    maildir = REF_USERS / user / "Maildir"
    home = REF_USERS / user
    if fresh and home.exists():
        shutil.rmtree(home)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    existing = len(os.listdir(maildir / "cur")) + len(os.listdir(maildir / "new"))
    host = socket.gethostname().replace("/", "_").replace(":", "_")
    to = user + "@example.test"  # what imap_load.py puts in To: for a user name without a domain
    started = time.perf_counter()
    for i in range(existing + 1, count + 1):
        raw, seen = message(i, size, to)
        stamp = 1700000000 + i * 60
        name = f"{stamp}.M{i}P{os.getpid()}.{host},S={len(raw)}:2,{'S' if seen else ''}"
        path = maildir / "cur" / name
        with open(path, "wb") as file:
            file.write(raw)
        os.utime(path, (stamp, stamp))  # Maildir INTERNALDATE is the file's mtime
    write_s = time.perf_counter() - started
    subprocess.run(["chown", "-R", "refmail:refmail", str(home)], check=True)
    started = time.perf_counter()
    subprocess.run(["doveadm", "-c", DOVECOT_CONF, "index", "-u", user, "INBOX"], check=True)
    index_s = time.perf_counter() - started
    status = subprocess.run(["doveadm", "-c", DOVECOT_CONF, "mailbox", "status", "-u", user, "messages", "INBOX"],
                            check=True, capture_output=True, text=True).stdout.strip()
    added = max(0, count - existing)
    return {"server": "dovecot", "user": user, "added": added, "status": status,
            "maildir_write_s": round(write_s, 1), "doveadm_index_s": round(index_s, 1),
            "msgs_per_s_write": round(added / write_s, 1) if added and write_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="target", required=True)
    gw = sub.add_parser("gateway")
    gw.add_argument("--data-dir", type=Path, required=True)
    gw.add_argument("--address", required=True)
    gw.add_argument("--batch", type=int, default=1000)
    gw.add_argument("--concurrency", type=int, default=32, help="blob writes in flight")
    dv = sub.add_parser("dovecot")
    dv.add_argument("--user", default="user3")
    dv.add_argument("--fresh", action="store_true", help="remove the user's home first")
    for p in (gw, dv):
        p.add_argument("--count", type=int, default=100_000)
        p.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    if args.target == "gateway":
        result = asyncio.run(populate_gateway(args.data_dir, args.address, args.count, args.size, args.batch,
                                              args.concurrency))
    else:
        result = populate_dovecot(args.user, args.count, args.size, args.fresh)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

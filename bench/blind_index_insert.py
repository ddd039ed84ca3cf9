"""What the SEARCH blind index costs at APPEND/delivery: CPU per message and index rows/bytes per message.

Appends --count messages of the ``imap_load.py --populate`` shape (50 senders, 10 subjects, a unique
Message-ID, ~4 KB) to a fresh sealed store on SQLite, once with the blind index and once without it
(``index=None``), and prints the process CPU seconds per message of each (the background folds into the
posting lists included, awaited before the clock stops), and the index rows per message (packed token rows
and posting segments).

    .venv/bin/python bench/blind_index_insert.py [--count 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from gateway.mailstore.delivery import LocalDelivery  # noqa: E402
from gateway.mailstore.interface import INBOX, FolderRef  # noqa: E402
from gateway.mailstore.notify import ChangeHub  # noqa: E402
from gateway.mailstore.sql import SqlMailStore  # noqa: E402
from gateway.mailstore.tables import MessageTokens, TokenPostings  # noqa: E402
from gateway.security.at_rest import FieldSealer, HeaderSealer  # noqa: E402
from gateway.security.keys import KeyManager  # noqa: E402
from gateway.storage.blobs import BlobStore  # noqa: E402
from gateway.storage.db import Database  # noqa: E402
from gateway.storage.models import Mailbox, Professional  # noqa: E402

SUBJECTS = ["Compte rendu de consultation", "Résultats de biologie", "Courrier de sortie", "Ordonnance",
            "Demande d'avis", "Compte rendu opératoire", "Vaccination: rappel", "Imagerie: IRM du genou",
            "Lettre de liaison", "Convocation"]


def message(number: int) -> bytes:
    sender = number % 50
    body = ("Bonjour, voici le document demandé. " * 110)[:4000]
    return (f"From: Dr Sender {sender} <sender{sender}@hopital.example>\r\nTo: claire.medecin@demo.example\r\n"
            f"Subject: {SUBJECTS[number % 10]} {number}\r\nMessage-ID: <load-{number}@bench.example>\r\n"
            f"Date: Fri, 04 Dec 2026 10:00:00 +0100\r\n\r\n{body}\r\n").encode()


async def run(count: int, indexed: bool, directory: Path) -> dict[str, float]:
    database = Database(f"sqlite+aiosqlite:///{directory}/gateway.db")
    await database.migrate()
    keys = KeyManager(database, directory / "keys")
    store = SqlMailStore(database, BlobStore(directory / "blobs", keys), ChangeHub(),
                         headers=HeaderSealer(FieldSealer(keys)))
    if not indexed:
        store.index = None
    async with database.session() as session:
        person = Professional(idnps="810000000001", id_type="RPPS", id_value="10000000001", family_name="Bench",
                              profession_code="10", profession_label="Médecin")
        session.add(person)
        await session.flush()
        box = Mailbox(address="bench@demo.example", domain="demo.example", type="PER", professional=person,
                      quota_bytes=0)
        session.add(box)
        await session.flush()
        mailbox_id = box.id
    await LocalDelivery(store).provision(mailbox_id)
    folder = FolderRef(mailbox_id, INBOX)
    await store.append(folder, message(0))  # keys created, caches warm
    cpu, wall = time.process_time(), time.perf_counter()
    for number in range(1, count + 1):
        await store.append(folder, message(number))
    await asyncio.gather(*store._fold_tasks)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    rows = 0
    async with database.session() as session:
        for table in (MessageTokens, TokenPostings):
            rows += await session.scalar(select(func.count()).select_from(table)) or 0
    await database.dispose()
    return {"cpu_ms_per_message": round(cpu / count * 1000, 3), "wall_ms_per_message": round(wall / count * 1000, 2),
            "index_rows_per_message": round((rows or 0) / (count + 1), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    results = {}
    for indexed in (False, True, False, True):
        with tempfile.TemporaryDirectory() as directory:
            label = "with index" if indexed else "without index"
            results.setdefault(label, []).append(asyncio.run(run(args.count, indexed, Path(directory))))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Server time of the webmail's record pages with 5,000 messages and 500 documents in one patient's space.

A fresh ``gateway init --demo`` data directory; the demo patient (PAT-TROIS)
receives ``--documents`` messages each carrying a CI-SIS CDA (the VAC-NOTE
sample with a fresh id and setId), filed by one FilingWorker pass (so the
record has that many documents and the audit log a filing entry for each),
then plain messages up to ``--messages`` in the mailbox (bench/populate_mailbox.py's
bulk path). The webmail application (``build_webmail_app``, every middleware)
is served by aiohttp on loopback HTTP (no TLS: the TLS cost is the listener's,
not the page's) with a signed-in session; each page is requested ``--repeat``
times one after the other, and the median and 95th percentile of the request
time are printed (JSON), with the export's total time and size. Run:

    .venv/bin/python bench/webmail_pages.py [--messages 5000] [--documents 500] [--repeat 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmp_filing import message as cda_message  # noqa: E402
from populate_mailbox import populate_gateway  # noqa: E402

from gateway.app import open_services  # noqa: E402
from gateway.config import load_settings  # noqa: E402
from gateway.dmp_bridge.worker import build_filing_worker  # noqa: E402
from gateway.mailstore.delivery import LocalDelivery  # noqa: E402
from gateway.queue.tables import QueuedMessage  # noqa: E402
from gateway.webmail.app import build_webmail_app  # noqa: E402
from gateway.webmail.sessions import Stage  # noqa: E402
from gateway.webmail.web import CONTEXT, SESSION_COOKIE  # noqa: E402

PATIENT = "279035121518989"


def init_demo(data_dir: Path) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "gateway", "--data-dir", str(data_dir), "init", "--demo"], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    demo: dict[str, Any] = json.loads((data_dir / "demo.json").read_text())
    return next(a for a in demo["accounts"] if a["type"] == "PAT" and a.get("owner") == PATIENT)


async def file_documents(data_dir: Path, address: str, count: int) -> float:
    settings = load_settings(data_dir=data_dir)
    async with open_services(settings) as services:
        account = await services.directory.account(address)
        assert account is not None
        delivery = LocalDelivery(services.mailstore)
        lab = "resultats.labo@demo.mssante.localhost"
        for number in range(count):
            raw = cda_message(number, address)
            queue_id = f"bench{number}"
            async with services.db.session() as session:  # the queue row the submission door writes: the depositor
                session.add(QueuedMessage(id=queue_id, door="submission", sender=lab, size=len(raw), trace_headers="",
                                          client_address="127.0.0.1", authenticated_as=lab))
            await delivery.deliver(account.mailbox_id, raw, delivery_key=f"{queue_id}:1")
        worker = build_filing_worker(services)
        started = time.perf_counter()
        while await worker.run_once():
            pass
        return time.perf_counter() - started


async def time_pages(data_dir: Path, address: str, repeat: int) -> dict[str, Any]:
    settings = load_settings(data_dir=data_dir)
    async with open_services(settings) as services:
        app: web.Application = build_webmail_app(services, settings)
        account = await services.directory.account(address)
        assert account is not None
        token = await app[CONTEXT].sessions.open(account.mailbox_id, Stage.SIGNED_IN, "password+totp", "127.0.0.1")
        cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
        async with TestClient(TestServer(app)) as client:
            listing = await client.get("/documents", headers=cookie)
            text = await listing.text()
            assert listing.status == 200, text[:500]
            first_id = text.split('<a href="/documents/', 1)[1].split('"', 1)[0]
            pages = {"documents (all)": "/documents", "documents, one type": "/documents?type=87273-9",
                     "documents, dates": "/documents?du=2020-01-01&au=2030-01-01&versions=actuelles",
                     "document (CDA, N3)": f"/documents/{first_id}", "history (50 lines)": "/historique",
                     "settings": "/reglages", "inbox": "/"}
            results: dict[str, Any] = {}
            for name, path in pages.items():
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    response = await client.get(path, headers=cookie)
                    await response.read()
                    times.append((time.perf_counter() - started) * 1000)
                    assert response.status == 200, (path, response.status)
                times.sort()
                results[name] = {"median_ms": round(statistics.median(times), 1),
                                 "p95_ms": round(times[int(len(times) * 0.95) - 1], 1)}
            page = await (await client.get("/reglages", headers=cookie)).text()
            csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            started = time.perf_counter()
            export = await client.post("/reglages/export", data={"csrf": csrf}, headers=cookie)
            size = len(await export.read())
            results["export (zip, streamed)"] = {"total_ms": round((time.perf_counter() - started) * 1000),
                                                 "bytes": size}
    return results


async def main(messages: int, documents: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        data_dir = Path(directory) / "data"
        patient = init_demo(data_dir)
        filing_s = await file_documents(data_dir, patient["address"], documents)
        await populate_gateway(data_dir, patient["address"], messages, 4096, 1000, 16)
        results = await time_pages(data_dir, patient["address"], repeat)
    print(json.dumps({"messages": messages, "documents": documents, "repeat": repeat,
                      "filing_s": round(filing_s, 1), "pages": results}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--documents", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=30)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.messages, arguments.documents, arguments.repeat))

"""Server time per webmail page for a patient with 5,000 messages (sealed headers and bodies, SQLite, fsync on).

The webmail app runs as ``gateway serve`` builds it (same services, middlewares and templates) on a plain
loopback HTTP socket; a timing middleware placed first measures each request inside the server, from the
first middleware to the response. The session is opened directly in the session store (sign-in is measured
by the sign-in page only). Run: .venv/bin/python bench/webmail.py [--messages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.app import open_services
from gateway.config import load_settings
from gateway.directory.identifiers import add_luhn_key, add_nir_key
from gateway.mailstore.delivery import LocalDelivery
from gateway.storage.models import utcnow
from gateway.webmail.app import build_webmail_app
from gateway.webmail.sessions import Stage
from gateway.webmail.web import CONTEXT, SESSION_COOKIE

PRO_DOMAIN = "demo.mssante.localhost"


def message(number: int, sender: str, patient: str) -> bytes:
    mail = EmailMessage()
    mail["From"] = f"Dr Claire MEDECIN <{sender}>"
    mail["To"] = patient
    mail["Subject"] = f"Compte rendu {number}"
    mail["Date"] = format_datetime(utcnow())
    mail["Message-ID"] = make_msgid(domain=PRO_DOMAIN)
    mail.set_content("Bonjour,\n\nVoici le compte rendu de votre consultation.\n" * 20)
    mail.add_alternative("<p>Bonjour,</p>" + "<p>Voici le <b>compte rendu</b> de votre consultation.</p>" * 20,
                         subtype="html")
    return mail.as_bytes()


async def run(count: int, rounds: int, directory: Path) -> None:
    settings = load_settings(data_dir=directory / "data", environ={})
    async with open_services(settings) as services:
        d = services.directory
        await d.add_local_domain(PRO_DOMAIN)
        await d.add_local_domain(settings.directory.patient_domain, kind="patient")
        doctor = await d.add_professional(id_type="RPPS", id_value=add_luhn_key("1000000001"), family_name="MEDECIN",
                                          given_name="Claire", profession_code="10")
        sender = (await d.create_mailbox(address=f"claire.medecin@{PRO_DOMAIN}", type="PER", owner=doctor["idnps"]))["address"]
        patient = await d.add_patient(ins=add_nir_key("2790351215189"), ins_oid="1.2.250.1.213.1.4.10",
                                      birth_family_name="PAT-TROIS", first_given_name="DOMINIQUE",
                                      birth_date="1979-03-28", sex="F")
        account = await d.account(patient["mailbox"])
        assert account is not None
        delivery = LocalDelivery(services.mailstore)
        await delivery.provision(account.mailbox_id)
        numbers = iter(range(count))
        started = time.perf_counter()

        async def deliver() -> None:
            for number in numbers:
                await delivery.deliver(account.mailbox_id, message(number, sender, account.address),
                                       delivery_key=f"bench-{number}")

        await asyncio.gather(*(deliver() for _ in range(8)))
        print(f"delivered {count} messages in {time.perf_counter() - started:.1f} s")

        app = build_webmail_app(services, settings)
        timings: dict[str, list[float]] = {}

        @web.middleware
        async def timed(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
            begun = time.perf_counter()
            try:
                return await handler(request)
            finally:
                timings.setdefault(request["bench_page"] if "bench_page" in request else request.path, []).append(
                    (time.perf_counter() - begun) * 1000)

        app.middlewares.insert(0, timed)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        token = await app[CONTEXT].sessions.open(account.mailbox_id, Stage.SIGNED_IN, "bench", None)
        pages = {"sign-in page": "/connexion", "inbox (newest 50)": "/", "inbox, oldest page": f"/?page={max(1, -(-count // 50))}",
                 "read a message": f"/messages/{count // 2}",
                 f"conversation ({count:,} from one doctor)": f"/conversations/{sender}",
                 "account security": "/compte/securite"}
        signed_in = {"Cookie": f"{SESSION_COOKIE}={token}"}
        async with aiohttp.ClientSession() as http:
            for label, path in pages.items():
                for _ in range(rounds + 2):
                    headers = None if path == "/connexion" else signed_in
                    async with http.get(f"http://127.0.0.1:{port}{path}", headers=headers,
                                        allow_redirects=False) as answer:
                        assert answer.status == 200, (path, answer.status, (await answer.text())[:300])
                        await answer.read()
                samples = timings.pop(path.split("?")[0])[2:]       # two warm-up requests
                print(f"{label:40s} median {statistics.median(samples):7.1f} ms   "
                      f"p95 {statistics.quantiles(samples, n=20)[-1]:7.1f} ms   ({len(samples)} requests)")
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-webmail-") as directory:
        asyncio.run(run(args.messages, args.rounds, Path(directory)))


if __name__ == "__main__":
    main()

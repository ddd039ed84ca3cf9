"""Local delivery alone: queued messages -> mail store -> DMP filing worker, CPU per delivered message.

The queue is filled first, while nothing delivers (spool files sealed and
fsynced, queue rows committed, as the pipeline leaves them after a 250), on a
fresh ``gateway init --demo`` data directory. Then the services ``gateway
serve`` runs behind its listeners are started in this process: local delivery
(its recovery pass schedules every queued message) and the filing worker,
which examines every delivery. Measured from that start until every
recipient is delivered and every filing job has ended:

- delivered msgs/s (wall clock; the machine is shared, so also)
- CPU ms per delivered message of this process (``time.process_time``:
  the event loop and aiosqlite's threads), delivery and filing apart; user and
  system apart, and context switches (voluntary + involuntary, every thread:
  ``getrusage``) per delivered message, from the start until every delivery.

    .venv/bin/python bench/local_delivery.py [--messages 1000] [--recipients 1] [--mailboxes 1] [--profile FILE]

``--recipients N`` addresses each message to N demo mailboxes (professionals
first, then patients); ``--mailboxes M`` spreads single-recipient messages
over M mailboxes. ``--profile out.pstats`` runs the measured part under cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.app import open_services  # noqa: E402
from gateway.config import load_settings  # noqa: E402
from gateway.dmp_bridge.tables import OPEN_JOB_STATES, FilingJob  # noqa: E402
from gateway.dmp_bridge.worker import build_filing_worker  # noqa: E402
from gateway.queue.store import AcceptedRows, QueueStore  # noqa: E402
from gateway.queue.tables import QueuedRecipient, RecipientState, RouteKind  # noqa: E402
from gateway.storage.models import Mailbox  # noqa: E402
from sqlalchemy import func, select  # noqa: E402


def body(number: int, size: int, recipient: str) -> bytes:
    head = (f"From: Dr Bench <bench@demo.mssante.localhost>\r\nTo: <{recipient}>\r\n"
            f"Subject: bench message {number}\r\nMessage-ID: <bench-{number}@demo.mssante.localhost>\r\n"
            "Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"Compte rendu de consultation, texte libre sans document joint.\r\n"
    text = line * max(1, (size - len(head)) // len(line))
    return head.encode() + text


def trace(queue_id: str, sender: str, recipient: str) -> str:
    return (f"Return-Path: <{sender}>\r\nReceived: from bench ([127.0.0.1])\r\n\tby gateway with ESMTPSA id {queue_id}"
            f"\r\n\tfor <{recipient}>; Fri, 04 Dec 2026 12:00:00 +0000\r\n"
            f"Authentication-Results: bench;\r\n\tauth=pass smtp.auth={sender}\r\n")


async def fill(settings: Any, messages: int, recipients: int, mailboxes: int, size: int) -> int:
    """Queue ``messages`` as the pipeline does after the 250 (spool file durable, then the rows)."""
    async with open_services(settings) as services:
        async with services.db.session() as s:
            rows = (await s.execute(select(Mailbox.id, Mailbox.address, Mailbox.type).where(Mailbox.hosted.is_(True))
                                    .order_by(Mailbox.type.desc(), Mailbox.id))).all()
        targets = [(r.id, r.address) for r in rows if r.type in ("PER", "PAT")]
        sender = targets[0][1]
        targets = targets[1:]
        for number in range(messages):
            if recipients > 1:
                chosen = targets[:recipients]
            else:
                chosen = [targets[number % max(1, mailboxes) % len(targets)]]
            spool_file = services.spool.new_file()
            spool_file.write(body(number, size, chosen[0][1]))
            await spool_file.make_durable()
            message = dict(id=spool_file.queue_id, door="submission", sender=sender, body_type="7BIT",
                           smtputf8=False, size=spool_file.size,
                           message_id_header=f"<bench-{number}@demo.mssante.localhost>",
                           trace_headers=trace(spool_file.queue_id, sender, chosen[0][1]),
                           authenticated_as=sender, client_address="127.0.0.1", client_helo="bench")
            rcpts: list[dict[str, object]] = [
                dict(address=address, route=RouteKind.LOCAL.value, mailbox_id=mailbox_id,
                     domain=address.split("@", 1)[1], state=RecipientState.PENDING.value, attempts=0)
                for mailbox_id, address in chosen]
            copy = AcceptedRows(message, rcpts)
            await services.db.run_in_transaction(lambda c: QueueStore.insert_accepted(c, [copy], []), write=True)
            spool_file.keep()
        return messages * len(chosen)


async def measure(settings: Any, expected: int, profile: str | None) -> dict[str, Any]:
    async with open_services(settings) as services:
        delivery = services.queue.local       # as open_services() builds it (filing intake included)
        filing = build_filing_worker(services)
        profiler = cProfile.Profile() if profile else None
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        await delivery.start()
        await filing.start()
        await delivery.wait_idle()
        cpu1, wall1 = time.process_time(), time.perf_counter()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        while await open_jobs(services.db):
            filing.wake()
            await asyncio.sleep(0.05)
        cpu2, wall2 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        await filing.stop()
        await delivery.stop()
        group = services.mailstore.append_group
        async with services.db.session() as s:
            delivered = await s.scalar(select(func.count()).select_from(QueuedRecipient).where(
                QueuedRecipient.state == RecipientState.DELIVERED.value))
    assert delivered == expected, f"{delivered} delivered, {expected} expected"
    return {
        "delivered": delivered,
        "delivered_msgs_per_s": round(delivered / (wall1 - wall0), 1),
        "delivered_and_filed_per_s": round(delivered / (wall2 - wall0), 1),
        "cpu_ms_per_delivery_incl_concurrent_filing": round((cpu1 - cpu0) * 1000 / delivered, 2),
        "cpu_ms_per_message_total": round((cpu2 - cpu0) * 1000 / delivered, 2),
        "delivery_cpu_ms_user_system": [round((usage1.ru_utime - usage0.ru_utime) * 1000 / delivered, 2),
                                        round((usage1.ru_stime - usage0.ru_stime) * 1000 / delivered, 2)],
        "delivery_context_switches_per_msg": round(
            (usage1.ru_nvcsw + usage1.ru_nivcsw - usage0.ru_nvcsw - usage0.ru_nivcsw) / delivered, 1),
        "wall_s": round(wall2 - wall0, 2),
        "deliveries_per_commit": round(group.grouped / group.batches, 2) if group and group.batches else None,
        "workers": settings.smtp.delivery_workers,
    }


async def open_jobs(db: Any) -> int:
    async with db.session() as s:
        missing = await s.scalar(select(func.count()).select_from(QueuedRecipient).where(
            QueuedRecipient.state == RecipientState.DELIVERED.value))
        jobs = await s.scalar(select(func.count()).select_from(FilingJob))
        running = await s.scalar(select(func.count()).select_from(FilingJob).where(FilingJob.state.in_(OPEN_JOB_STATES)))
    return int(running or 0) + max(0, int(missing or 0) - int(jobs or 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--mailboxes", type=int, default=1)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--profile")
    parser.add_argument("--keep", help="keep the data directory here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as scratch:
        data_dir = Path(args.keep or scratch) / "data"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-m", "gateway", "--data-dir", str(data_dir), "init", "--demo"], check=True,
                       env=env, cwd=REPO, capture_output=True)
        settings = load_settings(None, data_dir=data_dir)
        expected = asyncio.run(fill(settings, args.messages, args.recipients, args.mailboxes, args.size))
        figures = asyncio.run(measure(settings, expected, args.profile))
    print(json.dumps({"messages": args.messages, "recipients": args.recipients, "mailboxes": args.mailboxes,
                      "size": args.size, **figures}))


if __name__ == "__main__":
    main()

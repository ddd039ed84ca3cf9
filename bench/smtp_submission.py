"""Benchmark: SMTP submission with STARTTLS and AUTH, durable acceptance, local delivery.

Starts ``gateway serve`` on a data directory made by ``gateway init --demo`` (SQLite, encrypted mail store),
drives it with the shared load client (/work/shared/bench-tools/smtp_load.py:
4 KB messages, 20 concurrent connections, STARTTLS, AUTH PLAIN), then reads the
queue to measure what happened after each 250:

- accepted msgs/s: messages acknowledged per second (250 = spool file fsynced,
  its directory fsynced, queue rows committed);
- DATA -> mailbox latency: from the queue commit (just before the 250) to the
  mail store's commit of the delivered copy, per recipient (p50/p95/p99/max);
- delivered msgs/s: deliveries per second over the whole run.

    .venv/bin/python bench/smtp_submission.py [--messages 2000] [--concurrency 20] [--size 4096]

Prints one JSON object. Results and the machine they came from go in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import GatewayProcess  # noqa: E402  (after the path setup above)

LOAD_CLIENT = Path("/work/shared/bench-tools/smtp_load.py")


def run_load(server: GatewayProcess, args: argparse.Namespace) -> str:
    sender, recipient = server.account("PER", 0), server.account("PER", 1)
    command = [sys.executable, str(LOAD_CLIENT), "--host", "127.0.0.1", "--port", str(server.ports["smtp_submission_port"]),
               "--messages", str(args.messages), "--concurrency", str(args.concurrency), "--size", str(args.size),
               "--per-connection", "0", "--starttls", "--insecure",
               "--auth-user", sender["address"], "--auth-pass", sender["password"],
               "--from", sender["address"], "--to", recipient["address"], "--max-seconds", "600"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"load client failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def parse_summary(line: str) -> dict[str, float | str]:
    values: dict[str, float | str] = {}
    for token in line.split():
        key, _, value = token.partition("=")
        if value:
            try:
                values[key] = float(value)
            except ValueError:
                values[key] = value
    return values


def wait_for_deliveries(database: Path, expected: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(database) as conn:
            done = conn.execute("SELECT count(*) FROM queue_recipients WHERE state = 'delivered'").fetchone()[0]
        if done >= expected:
            return
        time.sleep(0.2)
    raise SystemExit(f"only {done} of {expected} messages delivered after {timeout}s")


def _parse_time(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def delivery_figures(database: Path) -> dict[str, float]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT m.received_at, r.delivered_at FROM queue_recipients r "
                            "JOIN queue_messages m ON m.id = r.message_id WHERE r.state = 'delivered'").fetchall()
    pairs = [(_parse_time(received), _parse_time(delivered)) for received, delivered in rows]
    latencies = sorted((delivered - received).total_seconds() * 1000 for received, delivered in pairs)
    span = (max(d for _, d in pairs) - min(r for r, _ in pairs)).total_seconds()

    def percentile(fraction: float) -> float:
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))]

    return {
        "delivered": len(latencies),
        "delivered_msgs_per_s": round(len(latencies) / span, 1) if span else 0.0,
        "data_to_mailbox_ms_p50": round(statistics.median(latencies), 1),
        "data_to_mailbox_ms_p95": round(percentile(0.95), 1),
        "data_to_mailbox_ms_p99": round(percentile(0.99), 1),
        "data_to_mailbox_ms_max": round(latencies[-1], 1),
    }


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096, help="body bytes per message")
    parser.add_argument("--delivery-workers", type=int, default=4, help="smtp.delivery_workers of the gateway")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    server = GatewayProcess(root / "data", extra_env={"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0",
                                                      "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0",
                                                      "GATEWAY_SMTP_DELIVERY_WORKERS": str(args.delivery_workers)})
    server.start()
    try:
        summary = parse_summary(run_load(server, args))
        database = root / "data" / "gateway.db"
        wait_for_deliveries(database, int(summary.get("ok", 0)))
        peak_rss_mib = round(peak_rss_kib(server.process.pid if server.process else 0) / 1024, 1)
    finally:
        server.stop()
    result = {
        "messages": args.messages, "concurrency": args.concurrency, "size": args.size,
        "delivery_workers": args.delivery_workers,
        "transport": "submission, STARTTLS (TLS 1.3), AUTH PLAIN, reused connections",
        "durability": "fsync file + directory, SQLite synchronous=FULL commit before 250",
        "accepted_ok": summary.get("ok"), "accepted_failed": summary.get("fail"),
        "accepted_msgs_per_s": summary.get("msgs_per_s"),
        "accept_latency_ms_p50": summary.get("lat_ms_p50"), "accept_latency_ms_p95": summary.get("lat_ms_p95"),
        **delivery_figures(database),
        "server_peak_rss_mib": peak_rss_mib,
        "load_client_line": " ".join(f"{k}={v}" for k, v in summary.items()),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()

"""Benchmark / reproduction: SIGTERM in the middle of a submission load, and how long ``gateway serve`` takes to exit.

Starts ``gateway serve`` (``gateway init --demo``, SQLite), drives it with the shared load client
(/work/shared/bench-tools/smtp_load.py: 4 KB messages, 20 connections, STARTTLS, AUTH PLAIN), sends SIGTERM
``--after`` seconds into the load, and reports the seconds from SIGTERM to exit (bounded by ``--limit``: a hang is
reported as such, the process is then killed) and the server's CPU seconds (user + system, from wait4).

    .venv/bin/python bench/sigterm_under_load.py [--messages 2000] [--after 20] [--limit 120]

Before the fix, the process hung for good in asyncio's cancellation of its tasks (exit_seconds: null).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import GatewayProcess  # noqa: E402  (after the path setup above)

LOAD_CLIENT = Path("/work/shared/bench-tools/smtp_load.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--after", type=float, default=20.0, help="seconds into the load before SIGTERM")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds to wait for the exit before SIGKILL")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-sigterm-"))
    server = GatewayProcess(root / "data", extra_env={"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0",
                                                      "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0"})
    server.start()
    assert server.process is not None
    sender, recipient = server.account("PER", 0), server.account("PER", 1)
    load = subprocess.Popen(
        [sys.executable, str(LOAD_CLIENT), "--host", "127.0.0.1", "--port", str(server.ports["smtp_submission_port"]),
         "--messages", str(args.messages), "--concurrency", "20", "--size", "4096", "--per-connection", "0",
         "--starttls", "--insecure", "--auth-user", sender["address"], "--auth-pass", sender["password"],
         "--from", sender["address"], "--to", recipient["address"], "--max-seconds", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(args.after)
    pid = server.process.pid
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    exit_seconds: float | None = None
    while time.monotonic() - started < args.limit:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            exit_seconds = round(time.monotonic() - started, 2)
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        done, status, usage = os.wait4(pid, 0)
    server.process.returncode = os.waitstatus_to_exitcode(status)
    out, _ = load.communicate(timeout=300)
    print(json.dumps({"messages": args.messages, "sigterm_after_s": args.after, "exit_seconds": exit_seconds,
                      "exit_code": server.process.returncode, "server_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                      "load_client_line": (out.strip().splitlines() or [""])[-1]}, indent=2))
    subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()

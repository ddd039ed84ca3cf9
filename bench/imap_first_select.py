"""The first SELECT of a big folder after ``gateway serve`` starts: wall-clock, server CPU, RSS, per code tree.

Starts ``gateway serve`` on a copy-on-use data directory (the caller's copy: nothing here copies 1.5 GB),
waits --settle seconds after it reports ready (0: SELECT at once, as a client that was waiting would),
then one client: STARTTLS + LOGIN, SELECT INBOX (the first: its folder index is loaded, unless the start
preloaded it), SELECT INBOX again (warm). Reports client wall-clock and server CPU (utime+stime from /proc,
10 ms ticks) of each, and the server's RSS before the first SELECT and after. ``--profile FILE`` records the
server with py-spy (idle threads included, raw collapsed stacks) from start to the end of the first SELECT.

    PYTHONPATH=. .venv/bin/python bench/imap_first_select.py --gateway-data-dir D --gateway-user ADDRESS
        [--settle 0] [--gateway-tree NAME=PATH ...] [--rounds 3] [--profile PREFIX]

``--gateway-tree base=/work/wt/x-base``: the same, from another worktree (say, main), alternated with this
one --rounds times, so both see the same machine load. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import compare_imap as ci  # noqa: E402
from imap_mix import tree_of  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def one_start(tree: Path, data_dir: Path, user: str, settle: float, profile: str | None) -> dict[str, Any]:
    with tree_of(tree):
        started = time.perf_counter()
        server = ci.start_gateway(data_dir, 10)
    out: dict[str, Any] = {"start_s": round(time.perf_counter() - started, 2)}
    spy = None
    try:
        assert server.process is not None
        pid = server.process.pid
        if profile:
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
                                    "--rate", "250", "--idle", "--threads", "--format", "raw", "--output", profile,
                                    "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        time.sleep(settle)
        password = next(a["password"] for a in server.demo["accounts"] if a["address"] == user)
        target = {"host": "127.0.0.1", "port": server.ports["imap_port"], "user": user, "password": password,
                  "starttls": True}
        client = ci.timed_cpu(out, "login", pid, lambda: ci.connect(target))
        out["rss_before_select_mib"] = rss_mib(pid)
        data = ci.timed_cpu(out, "first_select", pid, lambda: ci.check(client.select("INBOX"), "SELECT"))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            spy = None
        out["exists"] = int(data[0])
        out["rss_after_select_mib"] = rss_mib(pid)
        ci.timed_cpu(out, "second_select", pid, lambda: ci.check(client.select("INBOX"), "SELECT"))
        client.logout()
        return out
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-data-dir", type=Path, required=True)
    parser.add_argument("--gateway-user", required=True)
    parser.add_argument("--gateway-tree", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--settle", type=float, default=0.0, help="seconds between ready and the first SELECT")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy each start into PREFIX-NAME-ROUND.txt")
    parser.add_argument("--prime", action="store_true",
                        help="first one unreported start + SELECT of each tree (a previous run that used the INBOX)")
    args = parser.parse_args()
    trees = [("gateway", REPO)] + [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1]).resolve())
                                    for spec in args.gateway_tree]
    if args.prime:
        for _name, tree in trees:
            one_start(tree, args.gateway_data_dir, args.gateway_user, 0.0, None)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    for round_number in range(args.rounds):
        for name, tree in trees:
            profile = args.profile and f"{args.profile}-{name}-{round_number}.txt"
            runs[name].append(one_start(tree, args.gateway_data_dir, args.gateway_user, args.settle, profile))
            print(json.dumps({name: runs[name][-1]}), file=sys.stderr)
    summary = {name: {key: statistics.median(run[key] for run in values)
                      for key in values[0] if isinstance(values[0][key], int | float)}
               for name, values in runs.items()}
    print(json.dumps({"settle_s": args.settle, "median": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

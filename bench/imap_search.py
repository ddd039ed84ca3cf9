"""Header SEARCH side by side: Dovecot and one or more gateways (code trees) on the same 100,000 messages.

The three SEARCH rows of ``bench/compare_imap.py`` (UID SEARCH FROM "sender7@", SUBJECT "vaccination",
HEADER Message-ID "<load-77777@"), each repeated ``--repeat`` times on one logged-in, selected
connection per server, servers measured one after the other in one run. Reported per server and
search: client wall-clock (first, median, min) and the server's CPU seconds per SEARCH (utime + stime
of the server's process tree from /proc, before and after each command: Dovecot's master tree, the
gateway's one process).

A gateway is ``DATA_DIR`` or ``DATA_DIR=REPO``: ``gateway serve`` is started from REPO (default: this
tree), so a baseline worktree of main runs on its own copy of the data directory:

    .venv/bin/python bench/imap_search.py --gateway-user claire.medecin@demo.mssante.localhost \\
        --gateway /work/bench-data/base-100k=/work/wt/base --gateway /work/bench-data/new-100k [--repeat 5]

Each data directory is used as is (a gateway migrates its database when it starts: give each tree its
own copy). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import compare_imap  # noqa: E402  (same directory: the shared client helpers)
import rss_watch  # noqa: E402  (put on the path by compare_imap)

SEARCHES = (("from", ("FROM", '"sender7@"')), ("subject", ("SUBJECT", '"vaccination"')),
            ("message_id", ("HEADER", "Message-ID", '"<load-77777@"')))


def tree_cpu(pid: int) -> float:
    stats = rss_watch.all_stats()
    return sum(stats[p][1] for p in rss_watch.tree(pid, stats))


def run_searches(target: dict[str, Any], pid: int, repeat: int) -> dict[str, Any]:
    client = compare_imap.connect(target)
    compare_imap.check(client.select("INBOX"), "SELECT")
    out: dict[str, Any] = {}
    for name, criteria in SEARCHES:
        times, cpus, hits = [], [], 0
        for _ in range(repeat):
            cpu_before = tree_cpu(pid)
            started = time.perf_counter()
            data = compare_imap.check(client.uid("SEARCH", *criteria), f"SEARCH {name}")
            times.append((time.perf_counter() - started) * 1000)
            cpus.append(tree_cpu(pid) - cpu_before)
            hits = len(data[0].split()) if data and data[0] else 0
        out[name] = {"hits": hits, "first_ms": round(times[0], 1), "median_ms": round(statistics.median(times), 1),
                     "min_ms": round(min(times), 1), "cpu_s_median": round(statistics.median(cpus), 3),
                     "cpu_s_min": round(min(cpus), 3)}
        print(f"   {name}: {out[name]}", file=sys.stderr)
    client.logout()
    return out


@contextlib.contextmanager
def gateway_from_spec(spec: str, user: str) -> Iterator[tuple[Any, dict[str, Any], Path]]:
    """``DATA_DIR[=REPO]``: ``gateway serve`` of that tree on that data directory; yields the process, the IMAP
    target of ``user`` (STARTTLS) and the tree, and stops the gateway at the end."""
    import tests.harness as harness

    data_dir, _, repo = spec.partition("=")
    tree = Path(repo).resolve() if repo else REPO
    harness.REPO = tree  # ``gateway serve`` runs from that tree (its cwd comes first on sys.path)
    gateway = harness.GatewayProcess(Path(data_dir), extra_env={"PYTHONPATH": str(tree)})
    gateway.start(timeout=300)
    try:
        password = next(a["password"] for a in gateway.demo["accounts"] if a["address"] == user)
        target = {"host": "127.0.0.1", "port": gateway.ports["imap_port"], "user": user, "password": password,
                  "starttls": True}
        assert gateway.process is not None
        yield gateway, target, tree
    finally:
        gateway.stop()


def measure_gateway(spec: str, user: str, repeat: int) -> dict[str, Any]:
    with gateway_from_spec(spec, user) as (gateway, target, tree):
        return {"target": f"gateway {tree}", "data_dir": spec.partition("=")[0],
                **run_searches(target, gateway.process.pid, repeat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="append", default=[], metavar="DATA_DIR[=REPO]")
    parser.add_argument("--gateway-user", required=True)
    parser.add_argument("--dovecot-user", default="user3")
    parser.add_argument("--dovecot-port", type=int, default=10143)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    results = []
    print("== dovecot", file=sys.stderr)
    dovecot = {"host": "127.0.0.1", "port": args.dovecot_port, "user": args.dovecot_user, "password": "pass",
               "starttls": False}
    results.append({"target": "dovecot", **run_searches(
        dovecot, int(compare_imap.DOVECOT_PID.read_text().split()[0]), args.repeat)})
    for spec in args.gateway:
        print(f"== gateway {spec}", file=sys.stderr)
        results.append(measure_gateway(spec, args.gateway_user, args.repeat))
    ratios = {result["target"]: {name: round(result[name]["median_ms"] / results[0][name]["median_ms"], 2)
                                 for name, _ in SEARCHES} for result in results[1:]}
    print(json.dumps({"results": results, "median_ratio_over_dovecot": ratios}, indent=2))


if __name__ == "__main__":
    main()

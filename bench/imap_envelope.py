"""FETCH of 1,000 ENVELOPEs side by side: Dovecot and one or more gateways (code trees), same 100,000 messages.

On one logged-in, selected connection per server (servers measured one after the other in one run):
``--rounds`` FETCHes of 1,000 ENVELOPEs, each over a range not fetched before in that server's run
(sequence numbers 50001:51000, 51001:52000, ...: "cold", nothing rendered yet in the gateway's
process), then the first range again ``--rounds`` times ("warm"). Reported per server: client
wall-clock (first, median, min) and the server's CPU milliseconds per FETCH (the run time of every
thread of the server's process tree, from /proc/PID/task/TID/schedstat in nanoseconds, before and
after each command: Dovecot's master tree, the gateway's one process; /proc/PID/stat's utime + stime
count in 10 ms ticks, too coarse for a command of a few milliseconds), and the ratios over Dovecot
(median wall-clock, mean CPU).

A gateway is ``DATA_DIR`` or ``DATA_DIR=REPO`` (``gateway serve`` started from REPO, default this tree):

    .venv/bin/python bench/imap_envelope.py --gateway-user claire.medecin@demo.mssante.localhost \\
        --gateway /work/bench-data/base-100k=/work/wt/base --gateway /work/bench-data/new-100k [--rounds 5]

``--profile FILE`` runs py-spy (``record --format raw``) on each gateway during its FETCHes
(FILE gets the gateway's position appended). Each data directory is used as is (a gateway migrates
its database when it starts: give each tree its own copy). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import compare_imap  # noqa: E402  (same directory: the shared client helpers)
import rss_watch  # noqa: E402  (put on the path by compare_imap)
from imap_search import gateway_from_spec  # noqa: E402

FIRST = 50001
COUNT = 1000


def tree_cpu(pid: int) -> dict[str, int]:
    """CPU nanoseconds so far of each thread of a process tree, from their schedstat."""
    stats = rss_watch.all_stats()
    threads_cpu: dict[str, int] = {}
    for process in rss_watch.tree(pid, stats):
        try:
            threads = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue                                   # gone meanwhile
        for thread in threads:
            try:
                with open(f"/proc/{process}/task/{thread}/schedstat") as schedstat:
                    threads_cpu[f"{process}/{thread}"] = int(schedstat.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return threads_cpu


def cpu_between(before: dict[str, int], after: dict[str, int]) -> float:
    """CPU seconds the tree's threads used between two samples: a thread gone meanwhile (another client's
    Dovecot process ending) is not counted as negative time; one started meanwhile counts from zero."""
    return sum(used - before.get(thread, 0) for thread, used in after.items()) / 1e9


def _summary(times: list[float], cpus: list[float]) -> dict[str, Any]:
    return {"first_ms": round(times[0], 1), "median_ms": round(statistics.median(times), 1),
            "min_ms": round(min(times), 1), "cpu_ms_median": round(statistics.median(cpus) * 1000, 2),
            "cpu_ms_mean": round(sum(cpus) / len(cpus) * 1000, 2)}


def run_fetches(target: dict[str, Any], pid: int, rounds: int) -> dict[str, Any]:
    client = compare_imap.connect(target)
    compare_imap.check(client.select("INBOX"), "SELECT")
    out: dict[str, Any] = {}
    plans = {"cold": [FIRST + COUNT * n for n in range(rounds)], "warm": [FIRST] * rounds}
    for phase, starts in plans.items():
        times, cpus = [], []
        for start in starts:
            cpu_before = tree_cpu(pid)
            started = time.perf_counter()
            data = compare_imap.check(client.fetch(f"{start}:{start + COUNT - 1}", "(ENVELOPE)"), "FETCH ENVELOPE")
            times.append((time.perf_counter() - started) * 1000)
            cpus.append(cpu_between(cpu_before, tree_cpu(pid)))
            answered = sum(1 for item in data if item and b"ENVELOPE" in (item[0] if isinstance(item, tuple) else item))
            if answered != COUNT:
                raise SystemExit(f"FETCH {start}: {answered} ENVELOPEs, not {COUNT}")
        out[phase] = _summary(times, cpus)
        print(f"   {phase}: {out[phase]}", file=sys.stderr)
    client.logout()
    return out


def measure_gateway(spec: str, user: str, rounds: int, profile: str | None, rate: int = 200) -> dict[str, Any]:
    with gateway_from_spec(spec, user) as (gateway, target, tree):
        spy: subprocess.Popen[bytes] | None = None
        if profile:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen([py_spy, "record", "--format", "raw", "-r", str(rate), "-o", profile,
                                    "--pid", str(gateway.process.pid)], stdout=subprocess.DEVNULL)
            time.sleep(1)
        try:
            return {"target": f"gateway {tree}", "data_dir": spec.partition("=")[0],
                    **run_fetches(target, gateway.process.pid, rounds)}
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", action="append", default=[], metavar="DATA_DIR[=REPO]")
    parser.add_argument("--gateway-user", required=True)
    parser.add_argument("--dovecot-user", default="user3")
    parser.add_argument("--dovecot-port", type=int, default=10143)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    args = parser.parse_args()

    results = []
    print("== dovecot", file=sys.stderr)
    dovecot = {"host": "127.0.0.1", "port": args.dovecot_port, "user": args.dovecot_user, "password": "pass",
               "starttls": False}
    results.append({"target": "dovecot", **run_fetches(
        dovecot, int(compare_imap.DOVECOT_PID.read_text().split()[0]), args.rounds)})
    for position, spec in enumerate(args.gateway):
        print(f"== gateway {spec}", file=sys.stderr)
        profile = f"{args.profile}.{position}" if args.profile else None
        results.append(measure_gateway(spec, args.gateway_user, args.rounds, profile, args.profile_rate))
    ratios = {result["target"]: {phase: {"wall": round(result[phase]["median_ms"] / results[0][phase]["median_ms"], 2),
                                         "cpu": round(result[phase]["cpu_ms_mean"]
                                                      / max(results[0][phase]["cpu_ms_mean"], 0.1), 2)}
                                 for phase in ("cold", "warm")} for result in results[1:]}
    print(json.dumps({"results": results, "median_ratio_over_dovecot": ratios}, indent=2))


if __name__ == "__main__":
    main()

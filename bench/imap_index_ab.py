"""SELECT, UID FETCH 1:* (UID FLAGS) and FETCH of 1,000 ENVELOPEs, gateway and Dovecot alternated step by step.

On a shared, loaded machine, wall-clock figures measured minutes apart are not comparable; here each step
runs on Dovecot then on the gateway, --rounds times, so both see the same load. Reported per step and
server: median client wall-clock (ms) and median server CPU (ms, from /proc over the server's process
tree; clock ticks of 10 ms). The first SELECT of the gateway after its start (index loaded) is reported
apart as ``first_select``. Same clients and transports as compare_imap.py (gateway: STARTTLS).

    .venv/bin/python bench/imap_index_ab.py --gateway-data-dir D --gateway-user ADDRESS [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_imap as ci  # noqa: E402


def _steps(exists: int) -> dict[str, Any]:
    low = exists // 2 + 1
    return {
        "select": lambda client: ci.check(client.select("INBOX"), "SELECT"),
        "uid_fetch_all_flags": lambda client: ci.check(client.uid("FETCH", "1:*", "(UID FLAGS)"), "UID FETCH"),
        "fetch_1000_envelopes": lambda client: ci.check(client.fetch(f"{low}:{low + 999}", "(ENVELOPE)"), "FETCH"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-data-dir", type=Path, required=True)
    parser.add_argument("--gateway-user", required=True)
    parser.add_argument("--dovecot-user", default="user3")
    parser.add_argument("--dovecot-port", type=int, default=10143)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    gateway = ci.start_gateway(args.gateway_data_dir, 10)
    try:
        password = next(a["password"] for a in gateway.demo["accounts"] if a["address"] == args.gateway_user)
        servers = {
            "dovecot": ({"host": "127.0.0.1", "port": args.dovecot_port, "user": args.dovecot_user,
                         "password": "pass", "starttls": False}, int(ci.DOVECOT_PID.read_text().split()[0])),
            "gateway": ({"host": "127.0.0.1", "port": gateway.ports["imap_port"], "user": args.gateway_user,
                         "password": password, "starttls": True}, gateway.process.pid),
        }
        clients = {name: ci.connect(target) for name, (target, _) in servers.items()}
        first: dict[str, Any] = {}
        exists = 0
        for name, client in clients.items():
            exists = int(ci.timed_cpu(first, name, servers[name][1], lambda c=client: c.select("INBOX"))[1][0])
        samples: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for _ in range(args.rounds):
            for step, run in _steps(exists).items():
                for name, client in clients.items():
                    out: dict[str, Any] = {}
                    ci.timed_cpu(out, "x", servers[name][1], lambda r=run, c=client: r(c))
                    samples.setdefault(step, {}).setdefault(name, []).append((out["x_ms"], out["x_server_cpu_ms"]))
        for client in clients.values():
            client.logout()
    finally:
        gateway.stop()
    report: dict[str, Any] = {"rounds": args.rounds, "exists": exists, "first_select": first, "steps": {}}
    for step, by_server in samples.items():
        row: dict[str, Any] = {}
        for name, values in by_server.items():
            row[name] = {"wall_ms_median": round(statistics.median(v[0] for v in values), 1),
                         "server_cpu_ms_median": round(statistics.median(v[1] for v in values), 1),
                         "server_cpu_ms_mean": round(statistics.fmean(v[1] for v in values), 1)}
        row["wall_ratio_gateway_over_dovecot"] = round(row["gateway"]["wall_ms_median"] /
                                                       row["dovecot"]["wall_ms_median"], 2)
        report["steps"][step] = row
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

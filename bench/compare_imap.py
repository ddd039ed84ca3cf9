"""IMAP side by side: the gateway and the reference Dovecot on the same 100,000-message mailbox.

Both mailboxes are filled beforehand with ``bench/populate_mailbox.py`` (the
same messages, byte for byte). Client: Python's imaplib for everything (the
same client as /work/shared/bench-tools/imap_load.py). Steps, against each server:

1. single client, two rounds (round 1 = first access after the server started,
   round 2 = warm), each timed on the client:
   SELECT INBOX; UID FETCH 1:* (UID FLAGS); FETCH of 1,000 ENVELOPEs
   (sequence numbers 50001:51000); UID SEARCH FROM "sender7@";
   UID SEARCH SUBJECT "vaccination"; UID SEARCH HEADER Message-ID "<load-77777@".
2. --clients (50) concurrent clients, each its own process: LOGIN, SELECT
   INBOX, then --ops (40) operations drawn at random (seeded): 50% UID FETCH
   of one random message BODY.PEEK[], 25% UID FETCH of 50 consecutive UIDs
   (FLAGS ENVELOPE), 25% UID STORE of one random message +FLAGS/-FLAGS
   (\\Flagged); bounded by --mix-seconds. Reported: total operations per
   second, latency percentiles per kind, SELECT time under that concurrency.
3. memory per idle connection: --idle (100) connections opened, logged in
   and with INBOX selected, then left idle; (memory with them - memory
   before) / N, from /proc over the server's process tree (gateway: one
   process, RSS; Dovecot: the master's tree, RSS and PSS, PSS being the fair
   figure for forked processes sharing pages).

The gateway runs as ``gateway serve`` on its populated data directory; it
requires TLS before LOGIN, so its clients use STARTTLS (Dovecot's reference
instance has no TLS: its clients use plain LOGIN; say so when comparing). Its
per-user IMAP connection limit (imap.max_connections_per_user, 20 by default) is raised to
allow --clients/--idle connections of one user: the only change.

    .venv/bin/python bench/compare_imap.py --gateway-data-dir D --gateway-user ADDRESS \\
        [--dovecot-user user3] [--clients 50] [--ops 40] [--idle 100] [--only gateway|dovecot]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import multiprocessing
import random
import re
import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path("/work/shared/bench-tools")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))

import rss_watch  # noqa: E402  (the shared memory sampler's /proc helpers)

imaplib._MAXLINE = 50_000_000  # type: ignore[attr-defined]  # UID FETCH 1:* of 100,000 messages is one long answer
DOVECOT_PID = Path("/run/ref-mail/dovecot/master.pid")
UID_RE = re.compile(rb"UID (\d+)")


# ---------------------------------------------------------------- clients

class SourcedIMAP4(imaplib.IMAP4):
    """imaplib from a chosen loopback source address: Dovecot allows 10 connections per user and IP
    (mail_max_userip_connections), so many clients of one user are spread over 127.0.0.2-127.0.0.255."""

    def __init__(self, host: str, port: int, timeout: float, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float | None = None) -> Any:
        import socket
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


_next_source = [0]


def connect(target: dict[str, Any]) -> imaplib.IMAP4:
    _next_source[0] += 1
    source = f"127.0.0.{2 + (_next_source[0] + 7 * target.get('seed', 0)) % 250}"
    client = SourcedIMAP4(target["host"], target["port"], 120, source)
    if target["starttls"]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.starttls(ssl_context=context)
    check(client.login(target["user"], target["password"]), "LOGIN")
    return client


def check(answer: tuple[str, Any], what: str) -> Any:
    typ, data = answer
    if typ != "OK":
        raise RuntimeError(f"{what}: {typ} {data!r:.200}")
    return data


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (children reaped included), from /proc."""
    stats = rss_watch.all_stats()
    return sum(stats[p][1] for p in rss_watch.tree(pid, stats))


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def timed_cpu(out: dict[str, Any], key: str, pid: int, fn: Any) -> Any:
    """Run ``fn``: its client-side wall-clock in ``out[key + "_ms"]``, the server tree's CPU in
    ``out[key + "_server_cpu_ms"]`` (clock ticks of 10 ms: meaningful from tens of ms up)."""
    cpu_before = tree_cpu(pid)
    ms, result = timed(fn)
    out[key + "_ms"] = round(ms, 1)
    out[key + "_server_cpu_ms"] = round((tree_cpu(pid) - cpu_before) * 1000, 1)
    return result


def single_client(target: dict[str, Any], rounds: int, pid: int, searches: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = timed_cpu(out, "login", pid, lambda: connect(target))
    for r in range(1, rounds + 1):
        p = f"r{r}_"
        data = timed_cpu(out, p + "select", pid, lambda: check(client.select("INBOX"), "SELECT"))
        exists = int(data[0])
        out["exists"] = exists
        data = timed_cpu(out, p + "uid_fetch_all_flags", pid,
                         lambda: check(client.uid("FETCH", "1:*", "(UID FLAGS)"), "UID FETCH 1:* (UID FLAGS)"))
        out[p + "uid_fetch_all_flags_n"] = sum(1 for item in data if isinstance(item, bytes) and UID_RE.search(item))
        lo = max(1, exists // 2 + 1)
        hi = min(exists, lo + 999)
        data = timed_cpu(out, p + "fetch_1000_envelopes", pid,
                         lambda: check(client.fetch(f"{lo}:{hi}", "(ENVELOPE)"), "FETCH ENVELOPE"))
        out[p + "fetch_envelopes_n"] = sum(1 for item in data if item and b"ENVELOPE" in (
            item[0] if isinstance(item, tuple) else item))
        for name, criteria in (("from", ("FROM", '"sender7@"')), ("subject", ("SUBJECT", '"vaccination"')),
                               ("message_id", ("HEADER", "Message-ID", '"<load-77777@"'))):
            if not searches:
                break
            data = timed_cpu(out, p + f"search_{name}", pid,
                             lambda criteria=criteria: check(client.uid("SEARCH", *criteria), f"SEARCH {name}"))
            out[p + f"search_{name}_hits"] = len(data[0].split()) if data and data[0] else 0
    client.logout()
    return out


def mix_worker(job: tuple[dict[str, Any], int, int, float, float]) -> dict[str, Any]:
    target, seed, ops, deadline, start_at = job
    rnd = random.Random(seed)
    times: dict[str, list[float]] = {"body": [], "envelopes50": [], "store": []}
    errors: list[str] = []
    while time.time() < start_at:
        time.sleep(0.01)
    try:
        target = {**target, "seed": seed}  # each client process from its own loopback source address
        login_ms, client = timed(lambda: connect(target))
        select_ms, data = timed(lambda: check(client.select("INBOX"), "SELECT"))
        exists = int(data[0])
        uidnext = exists  # populated mailboxes: UIDs 1..exists
        for _ in range(ops):
            if time.time() > deadline:
                break
            pick = rnd.random()
            uid = rnd.randint(1, uidnext)
            if pick < 0.5:
                ms, _ = timed(lambda: check(client.uid("FETCH", str(uid), "(BODY.PEEK[])"), "FETCH BODY"))
                times["body"].append(ms)
            elif pick < 0.75:
                first = max(1, min(uid, uidnext - 49))
                ms, _ = timed(lambda: check(client.uid("FETCH", f"{first}:{first + 49}", "(FLAGS ENVELOPE)"),
                                            "FETCH 50 ENVELOPE"))
                times["envelopes50"].append(ms)
            else:
                sign = "+" if rnd.random() < 0.5 else "-"
                ms, _ = timed(lambda: check(client.uid("STORE", str(uid), sign + "FLAGS", "(\\Flagged)"), "STORE"))
                times["store"].append(ms)
        client.logout()
    except Exception as exc:  # noqa: BLE001  (reported, counted)
        errors.append(f"{type(exc).__name__}: {exc}"[:200])
        login_ms = select_ms = float("nan")
    return {"times": times, "errors": errors, "login_ms": login_ms, "select_ms": select_ms}


def pct(values: list[float]) -> dict[str, float]:
    values = sorted(v for v in values if v == v)
    if not values:
        return {}
    return {"n": len(values), "p50": round(statistics.median(values), 1),
            "p95": round(values[min(len(values) - 1, int(0.95 * len(values)))], 1), "max": round(values[-1], 1)}


def concurrent_mix(target: dict[str, Any], clients: int, ops: int, seconds: float) -> dict[str, Any]:
    start_at = time.time() + 2.0  # every process forked and ready before the first LOGIN
    jobs = [(target, seed, ops, start_at + seconds, start_at) for seed in range(clients)]
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        results = pool.map(mix_worker, jobs)
    elapsed = time.time() - start_at
    merged: dict[str, list[float]] = {"body": [], "envelopes50": [], "store": []}
    for result in results:
        for kind, values in result["times"].items():
            merged[kind].extend(values)
    total = sum(len(v) for v in merged.values())
    errors = [e for r in results for e in r["errors"]]
    return {
        "clients": clients, "ops_per_client": ops, "elapsed_s": round(elapsed, 2), "operations": total,
        "ops_per_s": round(total / elapsed, 1), "errors": len(errors), "first_errors": errors[:3],
        "login_ms": pct([r["login_ms"] for r in results]), "select_ms": pct([r["select_ms"] for r in results]),
        **{f"{kind}_ms": pct(values) for kind, values in merged.items()},
    }


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, PSS KiB, processes) summed over ``pid`` and its descendants."""
    stats = rss_watch.all_stats()
    pids = rss_watch.tree(pid, stats)
    rss = pss = 0
    for p in pids:
        r, s = rss_watch.mem(p)
        rss += r
        pss += s
    return rss, pss, len(pids)


def idle_memory(target: dict[str, Any], pid: int, count: int) -> dict[str, Any]:
    time.sleep(1.0)
    before = tree_memory(pid)
    clients = []
    try:
        for _ in range(count):
            client = connect(target)
            check(client.select("INBOX"), "SELECT")
            clients.append(client)
        time.sleep(3.0)  # let the server settle (freed buffers, workers parked)
        after = tree_memory(pid)
    finally:
        for client in clients:
            try:
                client.logout()
            except Exception:  # noqa: BLE001
                pass
    return {"connections": count, "rss_kib_before": before[0], "rss_kib_after": after[0],
            "pss_kib_before": before[1], "pss_kib_after": after[1], "processes_before": before[2],
            "processes_after": after[2],
            "rss_kib_per_connection": round((after[0] - before[0]) / count, 1),
            "pss_kib_per_connection": round((after[1] - before[1]) / count, 1)}


def measure(name: str, target: dict[str, Any], pid: int, args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {name}: single client", file=sys.stderr)
    result: dict[str, Any] = {"target": name, "transport": "STARTTLS + LOGIN" if target["starttls"] else
                              "plain LOGIN, no TLS"}
    result["memory_at_start_kib"] = dict(zip(("rss", "pss", "processes"), tree_memory(pid), strict=True))
    result["single"] = single_client(target, args.rounds, pid, searches=not args.skip_search)
    if args.clients:
        print(f"== {name}: {args.clients} concurrent clients", file=sys.stderr)
        result["mix"] = concurrent_mix(target, args.clients, args.ops, args.mix_seconds)
    print(f"== {name}: {args.idle} idle connections", file=sys.stderr)
    try:
        result["idle"] = idle_memory(target, pid, args.idle)
    except Exception as exc:  # noqa: BLE001  (keep the other figures)
        result["idle"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), file=sys.stderr)  # partial results survive a later failure
    result["memory_at_end_kib"] = dict(zip(("rss", "pss", "processes"), tree_memory(pid), strict=True))
    return result


# ---------------------------------------------------------------- servers

def start_gateway(data_dir: Path, connections: int) -> Any:
    import tests.harness as harness

    # ``gateway serve`` with one change: the IMAP per-user connection limit (imap.max_connections_per_user).
    gateway = harness.GatewayProcess(data_dir, extra_env={"GATEWAY_IMAP_MAX_CONNECTIONS_PER_USER": str(connections)})
    gateway.start(timeout=120)
    return gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-data-dir", type=Path)
    parser.add_argument("--gateway-user", help="address of the populated mailbox (its password is in demo.json)")
    parser.add_argument("--dovecot-user", default="user3")
    parser.add_argument("--dovecot-port", type=int, default=10143)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--ops", type=int, default=40)
    parser.add_argument("--mix-seconds", type=float, default=120)
    parser.add_argument("--idle", type=int, default=100)
    parser.add_argument("--skip-search", action="store_true", help="leave out the three UID SEARCH steps")
    parser.add_argument("--only", choices=["gateway", "dovecot"])
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    if args.only in (None, "dovecot"):
        target = {"host": "127.0.0.1", "port": args.dovecot_port, "user": args.dovecot_user, "password": "pass",
                  "starttls": False}
        results.append(measure("dovecot", target, int(DOVECOT_PID.read_text().split()[0]), args))
    if args.only in (None, "gateway"):
        if not args.gateway_data_dir or not args.gateway_user:
            parser.error("--gateway-data-dir and --gateway-user are needed for the gateway")
        gateway = start_gateway(args.gateway_data_dir, args.clients + args.idle + 10)
        try:
            password = next(a["password"] for a in gateway.demo["accounts"] if a["address"] == args.gateway_user)
            target = {"host": "127.0.0.1", "port": gateway.ports["imap_port"], "user": args.gateway_user,
                      "password": password, "starttls": True}
            results.append(measure("gateway", target, gateway.process.pid, args))
        finally:
            gateway.stop()

    ratios: dict[str, Any] = {}
    by = {r["target"]: r for r in results}
    if len(by) == 2:
        gw, dv = by["gateway"], by["dovecot"]
        for key, value in gw["single"].items():
            if key.endswith("_ms") and dv["single"].get(key):
                ratios[key] = round(value / dv["single"][key], 2)
        if "mix" in gw and "mix" in dv and dv["mix"]["ops_per_s"]:
            ratios["mix_ops_per_s"] = round(gw["mix"]["ops_per_s"] / dv["mix"]["ops_per_s"], 2)
        if "rss_kib_per_connection" in gw["idle"] and dv["idle"].get("pss_kib_per_connection"):
            ratios["idle_kib_per_connection_gateway_rss_vs_dovecot_pss"] = round(
                gw["idle"]["rss_kib_per_connection"] / dv["idle"]["pss_kib_per_connection"], 2)
    print(json.dumps({"results": results, "ratios_gateway_over_dovecot": ratios,
                      "note": "time ratios: >1 means the gateway is slower; ops_per_s: >1 means faster"}, indent=2))


if __name__ == "__main__":
    main()

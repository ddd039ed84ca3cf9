"""Multi-client IMAP mix over TLS: the gateway and the reference Dovecot, one user's INBOX, in one run.

Issue 12 (Speed): 10 clients that stay logged in and run a mix of SELECT,
FETCH (flags, envelopes, bodies), STORE, EXPUNGE, APPEND, LIST and STATUS over
TLS for a bounded time. Per server:

1. a fresh INBOX of --messages (3,000) messages of --size (4 KB) octets, the
   messages of ``bench/populate_mailbox.py`` (gateway: a fresh ``gateway init
   --demo`` data directory filled through the mail store, then ``gateway
   serve``; Dovecot: the user's Maildir recreated and indexed);
2. --clients (10) client processes (imaplib, from spread loopback source
   addresses as in ``bench/compare_imap.py``) each STARTTLS + LOGIN + SELECT
   INBOX, then wait until all are ready;
3. server CPU is sampled (utime+stime of the server's process tree, reaped
   children included, from /proc/PID/stat), then every client runs commands
   drawn at random (seeded) for --seconds (30), then CPU is sampled again
   before anyone logs out, so logins and logouts are not in the figure.

The mix (weights out of 100), all UID commands so concurrent expunges never
shift what a client names:

    select 5          SELECT INBOX
    fetch_flags 15    UID FETCH u:u+99 (FLAGS)
    fetch_envelope 15 UID FETCH u:u+19 (ENVELOPE)
    fetch_body 15     UID FETCH u (BODY.PEEK[])
    store 15          UID STORE u +FLAGS/-FLAGS (\\Flagged or \\Seen)
    expunge 10        UID STORE u +FLAGS.SILENT (\\Deleted) (counted as a store), then UID EXPUNGE u
    append 10         APPEND INBOX of one more message
    list 5            LIST "" "*"
    status 10         STATUS INBOX (MESSAGES UNSEEN UIDNEXT)

APPEND and EXPUNGE have the same weight, so the INBOX keeps its size: each
client expunges only messages it owns (initial UIDs = its index modulo
--clients, then its own APPENDUIDs), oldest first, so an expunge always finds
its message. FETCH and STORE name UIDs in the live window [UIDNEXT - messages,
UIDNEXT) as the client last learnt UIDNEXT (SELECT, STATUS, its own APPENDs).

Reported per server: operations (IMAP commands) per second in total and per
kind, latency p50/p95 per kind, errors (NO/BAD/exceptions) per kind with the
first few, and server CPU seconds per operation.

    PYTHONPATH=. .venv/bin/python bench/imap_mix.py [--clients 10] [--seconds 30] [--messages 3000]
        [--dovecot-user user150] [--only gateway|dovecot] [--gateway-tree NAME=PATH ...]

``--gateway-tree base=/work/wt/x-base`` also runs ``gateway serve`` from another
worktree (say, main) on a copy of the same populated data directory: before and
after in the same invocation. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import imaplib
import json
import multiprocessing
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import compare_imap
import populate_mailbox
from compare_imap import connect, pct, rss_watch

DOVECOT_PORT = 10143   # STARTTLS (REF_TLS=1 in the reference setup)
WEIGHTS = {"select": 5, "fetch_flags": 15, "fetch_envelope": 15, "fetch_body": 15, "store": 15, "expunge": 10,
           "append": 10, "list": 5, "status": 10}
KINDS = ("select", "fetch_flags", "fetch_envelope", "fetch_body", "store", "expunge", "append", "list", "status")
UIDNEXT_RE = re.compile(rb"UIDNEXT (\d+)")
APPENDUID_RE = re.compile(rb"APPENDUID \d+ (\d+)")


# ---------------------------------------------------------------- one client

class MixClient:
    """One logged-in client: knows UIDNEXT, owns some UIDs to expunge, times each command by kind."""

    def __init__(self, target: dict[str, Any], index: int, clients: int, messages: int, size: int) -> None:
        self.rnd = random.Random(index)
        self.index = index
        self.messages = messages
        self.size = size
        self.client = connect({**target, "seed": index})
        self.times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.errors: dict[str, int] = {kind: 0 for kind in KINDS}
        self.first_errors: list[str] = []
        self.uidnext = 1
        self.select()
        self.owned = [uid for uid in range(1, self.uidnext) if uid % clients == index % clients]
        self.appended = 0

    def run(self, kind: str, command: Callable[[], tuple[str, Any]]) -> Any:
        started = time.perf_counter()
        try:
            typ, data = command()
        except imaplib.IMAP4.error as exc:   # BAD, or a NO where imaplib raises
            typ, data = "BAD", [str(exc).encode()]
        self.times[kind].append((time.perf_counter() - started) * 1000)
        if kind == "select":
            self.learn_uidnext(b" ".join(self.client.untagged_responses.get("UIDNEXT", [])))
        self.client.untagged_responses.clear()   # updates from other sessions: not kept
        if typ != "OK":
            self.errors[kind] += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(f"{kind}: {typ} {data!r:.160}")
            return None
        return data

    def learn_uidnext(self, text: bytes) -> None:
        """From ``UIDNEXT n`` (STATUS) or the bare ``n`` of SELECT's ``[UIDNEXT n]`` (imaplib keeps the code's
        argument only)."""
        match = UIDNEXT_RE.search(text) or re.fullmatch(rb"\s*(\d+).*", text, re.DOTALL)
        if match:
            self.uidnext = max(self.uidnext, int(match.group(1)))

    def select(self) -> None:
        self.run("select", lambda: self.client.select("INBOX"))

    def live_uid(self) -> int:
        return self.rnd.randint(max(1, self.uidnext - self.messages), max(1, self.uidnext - 1))

    def step(self, kind: str | None = None) -> None:
        kind = kind or self.rnd.choices(KINDS, weights=[WEIGHTS[k] for k in KINDS])[0]
        uid = self.live_uid()
        imap = self.client
        if kind == "select":
            self.select()
        elif kind == "fetch_flags":
            self.run(kind, lambda: imap.uid("FETCH", f"{uid}:{uid + 99}", "(FLAGS)"))
        elif kind == "fetch_envelope":
            self.run(kind, lambda: imap.uid("FETCH", f"{uid}:{uid + 19}", "(ENVELOPE)"))
        elif kind == "fetch_body":
            self.run(kind, lambda: imap.uid("FETCH", str(uid), "(BODY.PEEK[])"))
        elif kind == "store":
            flag = self.rnd.choice(("\\Flagged", "\\Seen"))
            sign = self.rnd.choice("+-")
            self.run(kind, lambda: imap.uid("STORE", str(uid), sign + "FLAGS", f"({flag})"))
        elif kind == "expunge":
            if not self.owned:
                return
            doomed = str(self.owned.pop(0))
            if self.run("store", lambda: imap.uid("STORE", doomed, "+FLAGS.SILENT", "(\\Deleted)")) is not None:
                self.run(kind, lambda: imap.uid("EXPUNGE", doomed))
        elif kind == "append":
            self.appended += 1
            number = 1_000_000 * (self.index + 1) + self.appended
            raw, _ = populate_mailbox.message(number, self.size, "mix@example.test")
            data = self.run(kind, lambda: imap.append("INBOX", None, None, raw))
            match = APPENDUID_RE.search(b" ".join(d for d in data or [] if isinstance(d, bytes)))
            if match:
                uid_added = int(match.group(1))
                self.owned.append(uid_added)
                self.uidnext = max(self.uidnext, uid_added + 1)
        elif kind == "list":
            self.run(kind, lambda: imap.list('""', "*"))
        elif kind == "status":
            data = self.run(kind, lambda: imap.status("INBOX", "(MESSAGES UNSEEN UIDNEXT)"))
            if data:
                self.learn_uidnext(data[0])


def mix_worker(target: dict[str, Any], index: int, args: dict[str, Any], ready: Any, start: Any,
               measured: Any, results: Any) -> None:
    outcome: dict[str, Any] = {"index": index}
    client: MixClient | None = None
    try:
        client = MixClient(target, index, args["clients"], args["messages"], args["size"])
        ready.put(index)
        start.wait()
        deadline = time.monotonic() + args["seconds"]
        while time.monotonic() < deadline:
            client.step()
        outcome.update(times=client.times, errors=client.errors, first_errors=client.first_errors)
    except Exception as exc:  # noqa: BLE001  (reported, the others go on)
        ready.put(index)
        outcome.update(fatal=f"{type(exc).__name__}: {exc}"[:300])
    results.put(outcome)
    measured.wait()
    if client is not None:
        with contextlib.suppress(Exception):
            client.client.logout()


# ---------------------------------------------------------------- one server

def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, reaped children included) of ``pid`` and its descendants."""
    stats = rss_watch.all_stats()
    return sum(stats[p][1] for p in rss_watch.tree(pid, stats))


def run_mix(name: str, target: dict[str, Any], pid: int, args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {name}: {args.clients} clients, {args.seconds} s", file=sys.stderr)
    context = multiprocessing.get_context("fork")
    ready, results = context.Queue(), context.Queue()
    start, measured = context.Event(), context.Event()
    settings = {"clients": args.clients, "messages": args.messages, "size": args.size, "seconds": args.seconds}
    workers = [context.Process(target=mix_worker, args=(target, i, settings, ready, start, measured, results))
               for i in range(args.clients)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=300)
    cpu_before = tree_cpu(pid)
    started = time.monotonic()
    start.set()
    outcomes = [results.get(timeout=args.seconds + 300) for _ in workers]
    elapsed = time.monotonic() - started
    cpu = tree_cpu(pid) - cpu_before
    measured.set()
    for worker in workers:
        worker.join(60)
    return summarise(name, outcomes, elapsed, cpu, target)


def solo(target: dict[str, Any], pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """One client, --solo commands of each kind in turn: server CPU per command of that kind alone."""
    client = MixClient(target, 0, 1, args.messages, args.size)   # owns every message: expunges never run out
    figures: dict[str, Any] = {}
    for kind in KINDS:
        client.step(kind)                         # warm
        before, done = tree_cpu(pid), sum(len(v) for v in client.times.values())
        started = time.monotonic()
        for _ in range(args.solo):
            client.step(kind)
        commands = max(1, sum(len(v) for v in client.times.values()) - done)
        figures[kind] = {"commands": commands, "ms_per_command_wall": round(1000 * (time.monotonic() - started) / commands, 2),
                         "server_cpu_ms_per_command": round(1000 * (tree_cpu(pid) - before) / commands, 3)}
    client.client.logout()
    return {"errors": client.errors, "first_errors": client.first_errors, "per_kind": figures}


def summarise(name: str, outcomes: list[dict[str, Any]], elapsed: float, cpu: float,
              target: dict[str, Any]) -> dict[str, Any]:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    errors = dict.fromkeys(KINDS, 0)
    first_errors: list[str] = []
    for outcome in outcomes:
        if "fatal" in outcome:
            first_errors.append(f"client {outcome['index']}: {outcome['fatal']}")
            continue
        for kind in KINDS:
            times[kind] += outcome["times"][kind]
            errors[kind] += outcome["errors"][kind]
        first_errors += outcome["first_errors"]
    total = sum(len(values) for values in times.values())
    per_kind = {kind: {"ops_per_s": round(len(times[kind]) / elapsed, 1), "errors": errors[kind],
                       **{k: v for k, v in pct(times[kind]).items() if k in ("n", "p50", "p95")}}
                for kind in KINDS}
    return {
        "target": name, "transport": "STARTTLS + LOGIN" if target["starttls"] else "plain",
        "clients": len(outcomes), "elapsed_s": round(elapsed, 2), "operations": total,
        "ops_per_s": round(total / elapsed, 1), "errors": sum(errors.values()),
        "fatal_clients": sum(1 for outcome in outcomes if "fatal" in outcome), "first_errors": first_errors[:8],
        "server_cpu_s": round(cpu, 2), "server_cpu_ms_per_op": round(1000 * cpu / total, 3) if total else None,
        "latency_ms_all": {k: v for k, v in pct([t for v in times.values() for t in v]).items() if k != "max"},
        "per_kind": per_kind,
    }


# ---------------------------------------------------------------- servers

def dovecot(args: argparse.Namespace) -> dict[str, Any]:
    print(f"== dovecot: fresh INBOX of {args.messages} messages for {args.dovecot_user}", file=sys.stderr)
    populate_mailbox.populate_dovecot(args.dovecot_user, args.messages, args.size, fresh=True)
    target = {"host": "127.0.0.1", "port": DOVECOT_PORT, "user": args.dovecot_user, "password": "pass",
              "starttls": True}
    pid = int(compare_imap.DOVECOT_PID.read_text().split()[0])
    figures = solo(target, pid, args) if args.solo else None
    result = run_mix("dovecot", target, pid, args)
    if figures:
        result["solo"] = figures
    return result


def populated_gateway(work: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """A fresh ``init --demo`` data directory whose first professional's INBOX holds the messages."""
    from tests import harness

    data_dir = work / "gateway"
    harness.GatewayProcess(data_dir).init_demo()
    demo = json.loads((data_dir / "demo.json").read_text())
    address = next(a["address"] for a in demo["accounts"] if a["type"] == "PER")
    print(f"== gateway: fresh INBOX of {args.messages} messages for {address}", file=sys.stderr)
    asyncio.run(populate_mailbox.populate_gateway(data_dir, address, args.messages, args.size, batch=1000,
                                                  concurrency=16))
    return data_dir, address


@contextlib.contextmanager
def tree_of(path: Path) -> Iterator[None]:
    """``gateway serve`` from another worktree: the harness runs ``python -m gateway`` in its REPO."""
    from tests import harness

    saved, harness.REPO = harness.REPO, path
    try:
        yield
    finally:
        harness.REPO = saved


@contextlib.contextmanager
def py_spy(pid: int, output: str | None, gil: bool = False) -> Iterator[None]:
    """Record the server with py-spy (raw collapsed stacks in ``output``) while the block runs; ``gil``: only
    the thread holding the GIL (Python CPU time, without idle worker threads and suspended greenlets)."""
    if not output:
        yield
        return
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "100",
                            "--format", "raw", "--output", output, "--nonblocking", *(["--gil"] if gil else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def gateway(name: str, data_dir: Path, address: str, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tree_of(tree):
        server = compare_imap.start_gateway(data_dir, args.clients + 10)
    try:
        password = next(a["password"] for a in server.demo["accounts"] if a["address"] == address)
        target = {"host": "127.0.0.1", "port": server.ports["imap_port"], "user": address, "password": password,
                  "starttls": True}
        assert server.process is not None
        if args.solo:
            solo_figures = solo(target, server.process.pid, args)
        with py_spy(server.process.pid, args.profile and f"{args.profile}-{name}.txt", args.profile_gil):
            result = run_mix(name, target, server.process.pid, args)
        result["tree"] = str(tree)
        if args.solo:
            result["solo"] = solo_figures
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--dovecot-user", default="user150")
    parser.add_argument("--only", choices=["gateway", "dovecot"])
    parser.add_argument("--gateway-tree", action="append", default=[], metavar="NAME=PATH",
                        help="also run gateway serve from this worktree (e.g. base=/work/wt/x-base)")
    parser.add_argument("--solo", type=int, default=0, metavar="N",
                        help="first, one client runs N commands of each kind alone (server CPU per command kind)")
    parser.add_argument("--profile", metavar="PREFIX", help="py-spy each gateway into PREFIX-NAME.txt")
    parser.add_argument("--profile-gil", action="store_true", help="py-spy --gil: only the GIL holder's stacks")
    parser.add_argument("--keep", action="store_true", help="keep the gateway data directories")
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    if args.only in (None, "dovecot"):
        results.append(dovecot(args))
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.only in (None, "gateway"):
        work = Path(tempfile.mkdtemp(prefix="imap-mix-"))
        try:
            data_dir, address = populated_gateway(work, args)
            trees = [("gateway", REPO)] + [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1]).resolve())
                                            for spec in args.gateway_tree]
            for name, tree in trees:
                copy = work / f"run-{name}"
                shutil.copytree(data_dir, copy, symlinks=True)
                results.append(gateway(name, copy, address, tree, args))
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    by = {r["target"]: r for r in results}
    ratios = {name: round(r["ops_per_s"] / by["dovecot"]["ops_per_s"], 3)
              for name, r in by.items() if name != "dovecot" and "dovecot" in by and by["dovecot"]["ops_per_s"]}
    print(json.dumps({"results": results, "ops_per_s_over_dovecot": ratios}, indent=2))


if __name__ == "__main__":
    main()

"""SMTP side by side: the gateway's submission port and the reference Postfix, same load, one run.

Both targets get the same ``/work/shared/bench-tools/smtp_load.py`` load (N
messages of --size body octets, --concurrency connections reused for the
whole run, one recipient per message, all to one mailbox):

- gateway: ``gateway serve`` (``gateway init --demo`` in a fresh data
  directory, SQLite synchronous=FULL, encrypted mail store), submission port,
  STARTTLS + AUTH PLAIN; a 250 means the queue rows committed (SQLite
  synchronous=FULL) with the message's sealed octets in its row (up to 64 KiB
  sealed; larger: its spool file + directory fsynced first). Per-user/per-IP message rate limits set to 0 (unlimited) for
  the run through GATEWAY_SMTP_* variables; nothing else changed.
- postfix: the reference instance of setup-reference.sh (127.0.0.1:10025,
  no TLS, no AUTH, delivering over LMTP into Dovecot's Maildir of user1).
  ``--postfix-tls`` adds a run against a throwaway copy of that instance with
  a self-signed certificate and STARTTLS (see ``PostfixTls``).

Figures per target: accepted msgs/s and accept latency (smtp_load.py:
MAIL FROM to the reply after the final dot), delivered msgs/s (polling how many
have reached the mailbox: the queue's delivered rows for the gateway, files in
the Maildir for Postfix; from the start of the load to the last delivery),
DATA -> mailbox time (gateway: queue received_at -> delivered_at per
recipient; Postfix: the ``delay=`` of each LMTP delivery in its log, from
arrival in the queue to delivery), and memory and CPU (rss_watch.py over the
process tree: for Postfix the postfix master tree plus the Dovecot tree,
which does the delivery). For the gateway also its CPU seconds per accepted
message from /proc/PID/stat (utime + stime, every thread, summed over the
process tree: with ``smtp.acceptor_processes`` the SMTP acceptor children too;
``acceptor_processes`` says how many ran): during the load,
and up to the last delivery (accepted + delivered); ``--profile FILE`` runs
``py-spy record`` on it during the load.

    .venv/bin/python bench/compare_smtp.py [--messages 3000] [--concurrency 20] [--size 4096] [--postfix-tls] [--only gateway] [--profile gw.txt [--profile-gil]]

Needs root for the Postfix log and Maildir; start the reference servers first
(start-reference.sh). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import GatewayProcess  # noqa: E402

TOOLS = Path("/work/shared/bench-tools")
LOAD = TOOLS / "smtp_load.py"
RSS = TOOLS / "rss_watch.py"
REF_ETC = Path("/etc/ref-mail")
REF_LOG = Path("/var/tmp/ref-mail/log/postfix.log")
REF_USERS = Path("/var/tmp/ref-mail/users")
POSTFIX_PID = Path("/var/spool/postfix-ref/pid/master.pid")
DOVECOT_PID = Path("/run/ref-mail/dovecot/master.pid")


def parse_line(line: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for token in line.split():
        key, _, value = token.partition("=")
        if value:
            try:
                values[key] = float(value)
            except ValueError:
                values[key] = value
    return values


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def at(fraction: float) -> float:
        return round(values[min(len(values) - 1, int(fraction * len(values)))], 1)

    return {"p50": round(statistics.median(values), 1), "p95": at(0.95), "p99": at(0.99), "max": round(values[-1], 1)}


class Watch:
    """rss_watch.py over some process trees for the duration of a load."""

    def __init__(self, trees: dict[str, int]) -> None:
        args = [sys.executable, str(RSS), "--interval", "0.25", "--max-seconds", "900"]
        for name, pid in trees.items():
            args += ["--tree", f"{name}={pid}"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)

    def stop(self) -> dict[str, dict[str, Any]]:
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=30)
        result = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[0] == "rss_watch":
                result[fields[1]] = parse_line(" ".join(fields[2:]))
        return result


def run_load(port: int, args: argparse.Namespace, extra: list[str]) -> tuple[dict[str, Any], float]:
    command = [sys.executable, str(LOAD), "--host", "127.0.0.1", "--port", str(port), "--messages", str(args.messages),
               "--concurrency", str(args.concurrency), "--size", str(args.size), "--per-connection", "0",
               "--max-seconds", str(args.max_seconds), *extra]
    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.max_seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = result.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"load client failed: {result.stderr}")
    summary = parse_line(lines[-1])
    # The load client's own CPU (user + system), so that what the server could have used of the two cores shows.
    summary["client_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
    if result.returncode != 0 or result.stderr.strip():
        summary["errors"] = result.stderr.strip()[-500:]
    return summary, started


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (the gateway and its SMTP acceptor processes, smtp.acceptor_processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process tree so far, every thread included (/proc/PID/stat fields 14 and 15)."""
    user, system = cpu_split(pid)
    return user + system


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every live thread of a process tree (each a thread hop or a
    wait)."""
    total = 0
    for member in process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line)
    return total


def cpu_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each live process of the tree, by pid."""
    seconds = {}
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[member] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree so far (the gateway and its acceptor processes), every
    thread included."""
    user = system = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / os.sysconf("SC_CLK_TCK")
        system += int(fields[12]) / os.sysconf("SC_CLK_TCK")
    return user, system


class Profiler:
    """``py-spy record`` attached to the server for the length of the load (``--profile FILE``)."""

    def __init__(self, pid: int, output: str | None, *, gil: bool = False) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        if output:
            fmt = "speedscope" if output.endswith(".json") else "raw" if output.endswith(".txt") else "flamegraph"
            self.process = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                             "--rate", "200", "--format", fmt, "--output", output, "--nonblocking", "--subprocesses",
                                             *(["--gil"] if gil else [])],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)


def wait_until(count_fn: Any, expected: int, started: float, timeout: float) -> float | None:
    """Poll ``count_fn`` every 50 ms; the seconds from ``started`` to the moment it reached ``expected``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_fn() >= expected:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------- gateway

def run_gateway(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="cmp-smtp-gw-"))
    extra_env = {"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0", "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0"}
    for item in args.gateway_env:
        key, _, value = item.partition("=")
        extra_env[key] = value
    gateway = GatewayProcess(root / "data", extra_env=extra_env)
    gateway.start()
    try:
        sender = gateway.account("PER", 0)
        recipient = gateway.account("PER", 1)
        database = root / "data" / "gateway.db"
        assert gateway.process is not None
        pid = gateway.process.pid
        watch = Watch({"gateway": pid})
        profiler = Profiler(pid, args.profile, gil=args.profile_gil)

        def delivered() -> int:
            with sqlite3.connect(database, timeout=30) as conn:
                return int(conn.execute("SELECT count(*) FROM queue_recipients WHERE state = 'delivered'").fetchone()[0])

        ready = json.loads((root / "data" / "run" / "ready.json").read_text())
        acceptors = len(ready.get("acceptors", []))
        cpu_before = cpu_seconds(pid)
        each_before = cpu_by_process(pid)
        split_before = cpu_split(pid)
        switches_before = context_switches(pid)
        summary, started = run_load(gateway.ports["smtp_submission_port"], args, [
            "--starttls", "--insecure", "--auth-user", sender["address"], "--auth-pass", sender["password"],
            "--from", sender["address"], "--to", recipient["address"]])
        cpu_accepted = cpu_seconds(pid) - cpu_before
        profiler.stop()
        done_s = wait_until(delivered, int(summary.get("ok", 0)), started, 600)
        cpu_delivered = cpu_seconds(pid) - cpu_before
        each_after = cpu_by_process(pid)
        split_after = cpu_split(pid)
        switches = context_switches(pid) - switches_before
        memory = watch.stop()
        with sqlite3.connect(database) as conn:
            rows = conn.execute("SELECT m.received_at, r.delivered_at FROM queue_recipients r JOIN queue_messages m "
                                "ON m.id = r.message_id WHERE r.state = 'delivered'").fetchall()
        latencies = [(_time(d) - _time(r)).total_seconds() * 1000 for r, d in rows]
    finally:
        gateway.stop()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    figures = _figures("gateway", "submission, STARTTLS (TLS 1.3) + AUTH PLAIN", summary, done_s, latencies, memory)
    figures["acceptor_processes"] = acceptors      # smtp.acceptor_processes (0: SMTP in the one process)
    ok = max(1, int(summary.get("ok", 0)))
    # Server CPU per message: during the load (acceptance, plus whatever delivery ran meanwhile in the same
    # process) and up to the last delivery (accepted + delivered).
    figures["server_cpu_s"] = {"during_load": round(cpu_accepted, 2), "until_all_delivered": round(cpu_delivered, 2)}
    figures["server_cpu_ms_per_msg"] = {"during_load": round(cpu_accepted * 1000 / ok, 2),
                                        "accepted_and_delivered": round(cpu_delivered * 1000 / ok, 2)}
    figures["server_context_switches_per_msg"] = round(switches / ok, 1)
    # The main process (delivery, and SMTP without acceptor processes) and each acceptor process apart.
    figures["server_cpu_ms_per_msg_by_process"] = {
        ("main" if member == pid else f"acceptor pid {member}"): round((seconds - each_before.get(member, 0.0)) * 1000 / ok, 2)
        for member, seconds in each_after.items()}
    figures["server_cpu_ms_per_msg_user_system"] = [round((after - before) * 1000 / ok, 2)
                                                    for before, after in zip(split_before, split_after)]
    return figures


def _time(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _figures(name: str, transport: str, summary: dict[str, Any], done_s: float | None, latencies: list[float],
             memory: dict[str, Any]) -> dict[str, Any]:
    ok = int(summary.get("ok", 0))
    return {
        "target": name, "transport": transport,
        "accepted_ok": ok, "accepted_failed": int(summary.get("fail", 0)),
        "accepted_msgs_per_s": summary.get("msgs_per_s"),
        "accept_latency_ms": {k: summary.get(f"lat_ms_{k}") for k in ("p50", "p95", "p99", "max")},
        "delivered_msgs_per_s": round(ok / done_s, 1) if done_s else None,
        "all_delivered_after_s": round(done_s, 2) if done_s else None,
        "data_to_mailbox_ms": percentiles(latencies),
        "memory": memory,
        "load_client": {k: v for k, v in summary.items() if k not in ("host",)},
    }


# ---------------------------------------------------------------- postfix

def _pid(path: Path) -> int:
    return int(path.read_text().split()[0])


def run_postfix(args: argparse.Namespace, *, port: int = 10025, tls: bool = False,
                log: Path = REF_LOG) -> dict[str, Any]:
    user = args.postfix_user
    maildir = REF_USERS / user / "Maildir"
    if maildir.exists():
        shutil.rmtree(maildir)  # one mailbox, emptied first, so that counting its files counts this run
    log_offset = log.stat().st_size if log.exists() else 0
    watch = Watch({"postfix": _pid(POSTFIX_PID) if port == 10025 else _pid(PostfixTls.PID),
                   "dovecot": _pid(DOVECOT_PID)})

    def delivered() -> int:
        return sum(len(os.listdir(maildir / sub)) for sub in ("new", "cur") if (maildir / sub).is_dir())

    extra = ["--from", "bench@ref.test", "--to", f"{user}@ref.test"] + (["--starttls", "--insecure"] if tls else [])
    summary, started = run_load(port, args, extra)
    done_s = wait_until(delivered, int(summary.get("ok", 0)), started, 600)
    memory = watch.stop()
    time.sleep(1.0)  # the log line is written just after the delivery
    with open(log, "rb") as file:
        file.seek(log_offset)
        text = file.read().decode(errors="replace")
    delays = [float(m.group(1)) * 1000 for m in re.finditer(r"relay=\S+:10024.*? delay=([\d.]+),.*status=sent", text)]
    name = "postfix+tls" if tls else "postfix"
    transport = "STARTTLS (TLS 1.3, self-signed), no AUTH" if tls else "plain SMTP, no TLS, no AUTH"
    return _figures(name, transport + ", LMTP into Dovecot Maildir", summary, done_s, delays, memory)


class PostfixTls:
    """A throwaway copy of the reference Postfix with STARTTLS, on 127.0.0.1:10026.

    The reference config (/etc/ref-mail/postfix) is copied into a temporary
    config directory, given its own queue and data directories, log file and a
    self-signed certificate; /etc/ref-mail and /work/shared are not modified.
    Postfix only accepts ``-c DIR`` for directories listed in the default
    instance's ``alternate_config_directories``, so the directory is added
    there for the run and removed afterwards.
    """

    CONF = Path("/var/tmp/cmp-postfix-tls/etc")
    QUEUE = Path("/var/tmp/cmp-postfix-tls/spool")
    DATA = Path("/var/tmp/cmp-postfix-tls/data")
    LOG = Path("/var/tmp/cmp-postfix-tls/postfix.log")
    PID = QUEUE / "pid" / "master.pid"
    PORT = 10026

    def __enter__(self) -> PostfixTls:
        shutil.rmtree(self.CONF.parent, ignore_errors=True)
        self.CONF.mkdir(parents=True)
        for name in ("main.cf", "master.cf"):
            shutil.copy(REF_ETC / "postfix" / name, self.CONF / name)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=localhost", "-keyout", str(self.CONF / "key.pem"), "-out", str(self.CONF / "cert.pem")],
                       check=True, capture_output=True)
        master = (self.CONF / "master.cf").read_text().replace("127.0.0.1:10025 inet", f"127.0.0.1:{self.PORT} inet")
        (self.CONF / "master.cf").write_text(master)
        self.DATA.mkdir(parents=True)
        self.QUEUE.mkdir(parents=True)
        shutil.chown(self.DATA, "postfix")
        settings = {
            "config_directory": str(self.CONF), "queue_directory": str(self.QUEUE), "data_directory": str(self.DATA),
            "multi_instance_name": "postfix-cmp-tls", "maillog_file": str(self.LOG),
            "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(self.CONF / "cert.pem"),
            "smtpd_tls_key_file": str(self.CONF / "key.pem"), "smtpd_tls_protocols": ">=TLSv1.2",
        }
        subprocess.run(["postconf", "-c", str(self.CONF), "-e", *(f"{k}={v}" for k, v in settings.items())], check=True)
        current = subprocess.run(["postconf", "-h", "alternate_config_directories"], capture_output=True,
                                 text=True).stdout.strip()
        self.previous = current
        if str(self.CONF) not in current.split():
            subprocess.run(["postconf", "-e", f"alternate_config_directories = {current} {self.CONF}".strip()],
                           check=True)
        subprocess.run(["postfix", "-c", str(self.CONF), "set-permissions"], capture_output=True)
        subprocess.run(["postfix", "-c", str(self.CONF), "check"], check=True)
        subprocess.run(["postfix", "-c", str(self.CONF), "start"], check=True, capture_output=True)
        for _ in range(100):
            if self.PID.exists() and self.PID.read_text().strip():
                break
            time.sleep(0.1)
        time.sleep(1.0)
        return self

    def __exit__(self, *_exc: object) -> None:
        subprocess.run(["postfix", "-c", str(self.CONF), "stop"], capture_output=True)
        time.sleep(1.0)
        current = subprocess.run(["postconf", "-h", "alternate_config_directories"], capture_output=True,
                                 text=True).stdout.split()
        kept = " ".join(d for d in current if d != str(self.CONF))
        subprocess.run(["postconf", "-e", f"alternate_config_directories = {kept}"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--postfix-user", default="user1")
    parser.add_argument("--postfix-tls", action="store_true", help="also run against a STARTTLS copy of Postfix")
    parser.add_argument("--only", choices=["gateway", "postfix"], help="run one side only")
    parser.add_argument("--keep", action="store_true", help="keep the gateway's data directory")
    parser.add_argument("--profile", metavar="FILE", help="py-spy record the gateway during the load into FILE "
                        "(.svg flame graph, .json speedscope, .txt collapsed stacks)")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL (py-spy --gil)")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for gateway serve (repeatable)")
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    if args.only in (None, "postfix"):
        results.append(run_postfix(args))
        if args.postfix_tls:
            with PostfixTls():
                results.append(run_postfix(args, port=PostfixTls.PORT, tls=True, log=PostfixTls.LOG))
    if args.only in (None, "gateway"):
        results.append(run_gateway(args))
    by_name = {r["target"]: r for r in results}
    ratios: dict[str, Any] = {}
    if "gateway" in by_name:
        gw = by_name["gateway"]
        for ref in ("postfix", "postfix+tls"):
            if ref in by_name:
                ref_r = by_name[ref]
                ratios[f"gateway/{ref}"] = {
                    key: round(gw[key] / ref_r[key], 2) if gw.get(key) and ref_r.get(key) else None
                    for key in ("accepted_msgs_per_s", "delivered_msgs_per_s")
                }
                ratios[f"gateway/{ref}"]["data_to_mailbox_p50"] = (
                    round(gw["data_to_mailbox_ms"]["p50"] / ref_r["data_to_mailbox_ms"]["p50"], 2)
                    if gw["data_to_mailbox_ms"] and ref_r["data_to_mailbox_ms"] and ref_r["data_to_mailbox_ms"]["p50"]
                    else None)
    print(json.dumps({"messages": args.messages, "concurrency": args.concurrency, "size": args.size,
                      "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()

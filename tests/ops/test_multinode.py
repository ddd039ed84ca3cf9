"""Several gateway nodes on one PostgreSQL database (issue 13): roles split with ``gateway serve --only``,
work claimed with row locks, one spool and one blob store shared by the nodes."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import json
import re
import shutil
import smtplib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PORT_KEYS, GatewayProcess, free_ports, run_cli, wait_until
from tests.pg import PgCluster


def test_serve_only_names_the_unknown_role(tmp_path: Path) -> None:
    result = run_cli("serve", "--only", "smtp,pop3", data_dir=tmp_path / "data")
    assert result.returncode != 0
    assert "'pop3'" in result.stderr and "--only" in result.stderr
    assert "smtp, imap, https, workers" in result.stderr


def test_serve_only_refuses_an_empty_list(tmp_path: Path) -> None:
    result = run_cli("serve", "--only", ",", data_dir=tmp_path / "data")
    assert result.returncode != 0 and "--only" in result.stderr


@pytest.mark.slow
def test_serve_only_imap_opens_imap_and_runs_no_worker(tmp_path: Path) -> None:
    node = GatewayProcess(tmp_path / "data", serve_args=["--only", "imap"])
    node.start()
    try:
        ready = json.loads((node.data_dir / "run" / "ready.json").read_text())
        assert set(ready["listeners"]) == {"imap", "imaps"}
        assert ready["workers"] == {}
    finally:
        node.stop()


# ------------------------------------------------------------------ two nodes on one PostgreSQL
#
# The clients' addresses are parameters (``Doors``): here each node's own listeners; behind a TCP proxy
# (HAProxy) the same checks run with the proxy's addresses for every door.

UNLIMITED = {"GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_USER": "0", "GATEWAY_SMTP_MESSAGES_PER_MINUTE_PER_IP": "0"}
Address = tuple[str, int]


@dataclass
class Doors:
    """Where clients connect: SMTP submissions (implicit TLS) and IMAPS, one address per node or proxy."""

    smtp: list[Address]
    imaps: list[Address]


@dataclass
class Cluster:
    a: GatewayProcess
    b: GatewayProcess
    shared: Path

    def doors(self, node: GatewayProcess) -> Doors:
        return Doors(smtp=[("localhost", node.ports["smtp_submissions_port"])],
                     imaps=[("localhost", node.ports["imaps_port"])])

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.a.ca_file)      # one PKI: the same CA on both nodes


def _node_env(url: str, shared: Path, name: str) -> dict[str, str]:
    return {**UNLIMITED, "GATEWAY_DATABASE_URL": url, "GATEWAY_CLUSTER_NODE_NAME": name,
            "GATEWAY_CLUSTER_BLOB_DIR": str(shared / "blobs"), "GATEWAY_SMTP_SPOOL_DIR": str(shared / "spool"),
            # short enough for a test: a dead node's claims are taken over after 5 s, looked for every second
            "GATEWAY_CLUSTER_CLAIM_LEASE_SECONDS": "5", "GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"}


@contextlib.contextmanager
def _two_nodes(tmp_path: Path, pg_cluster: PgCluster, *, a_roles: list[str] | None = None,
               env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Node A initialised on a fresh PostgreSQL database; node B's data directory a copy of A's (its key files,
    test PKI and demo accounts: docs/DEPLOYMENT.md "Several nodes"), both sharing the spool and the blobs."""
    url = asyncio.run(pg_cluster.create_database())
    shared = tmp_path / "shared"
    a = GatewayProcess(tmp_path / "a", extra_env={**_node_env(url, shared, "a"), **(env or {})},
                       serve_args=["--only", ",".join(a_roles)] if a_roles else [])
    a.init_demo()
    shutil.copytree(a.data_dir, tmp_path / "b", ignore=shutil.ignore_patterns("run", "serve.log"))
    b = GatewayProcess(tmp_path / "b", extra_env={**_node_env(url, shared, "b"), **(env or {})})
    b.ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    a.start()
    b.start()
    try:
        yield Cluster(a, b, shared)
    finally:
        b.stop()
        a.stop()
        asyncio.run(pg_cluster.drop_database(url))


@pytest.fixture
def cluster(tmp_path: Path, pg_cluster: PgCluster) -> Iterator[Cluster]:
    with _two_nodes(tmp_path, pg_cluster) as nodes:
        yield nodes


def _submit(door: Address, tls: ssl.SSLContext, sender: dict[str, Any], recipient: str, subject: str,
            body: str = "Bonjour.\r\n") -> None:
    message = (f"From: {sender['address']}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{subject}@multinode.test>\r\n\r\n{body}").encode()
    with smtplib.SMTP_SSL(*door, context=tls, timeout=60) as client:
        client.login(sender["address"], sender["password"])
        client.sendmail(sender["address"], [recipient], message)


def _idle_wakes_on_mail_from_another_node(doors_in: Doors, doors_out: Doors, tls: ssl.SSLContext,
                                          sender: dict[str, Any], reader_account: dict[str, Any],
                                          timeout: float = 30) -> float:
    """Submit through ``doors_in`` while an IMAP session through ``doors_out`` IDLEs; the seconds it waited
    (at most ``timeout``: the session's socket gives up then)."""
    reader = imaplib.IMAP4_SSL(*doors_out.imaps[0], ssl_context=tls, timeout=timeout)
    try:
        reader.login(reader_account["address"], reader_account["password"])
        _submit(doors_in.smtp[0], tls, sender, reader_account["address"], "first-contact")   # provisions the INBOX
        count = wait_until(lambda: _selected_count(reader), timeout=90,
                           what="the first message readable through the other node")
        tag = reader._new_tag().decode()
        reader.send(f"{tag} IDLE\r\n".encode())
        assert reader.readline().startswith(b"+ ")
        started = time.monotonic()
        _submit(doors_in.smtp[0], tls, sender, reader_account["address"], "while-idle")
        line = reader.readline()                                # bounded by the socket's timeout
        waited = time.monotonic() - started
        assert line.rstrip() == f"* {count + 1} EXISTS".encode(), line
        reader.send(b"DONE\r\n")
        while not reader.readline().startswith(tag.encode()):
            pass
        _, data = reader.fetch(str(count + 1), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert isinstance(data[0], tuple) and b"while-idle" in data[0][1]
        return waited
    finally:
        with contextlib.suppress(Exception):
            reader.logout()


def _selected_count(imap: imaplib.IMAP4) -> int | None:
    """SELECT INBOX: its message count, None while it does not exist or is empty."""
    typ, data = imap.select("INBOX")
    count = int(data[0] or 0) if typ == "OK" else 0
    return count or None


@pytest.mark.postgres
@pytest.mark.slow
def test_mail_submitted_to_one_node_wakes_idle_on_the_other(cluster: Cluster) -> None:
    doctor, pharmacist = cluster.a.account("PER", 0), cluster.a.account("PER", 1)
    waited = _idle_wakes_on_mail_from_another_node(cluster.doors(cluster.a), cluster.doors(cluster.b), cluster.tls(),
                                                   doctor, pharmacist)
    print(f"submitted to node A, IDLE on node B woken after {waited * 1000:.0f} ms")
    waited = _idle_wakes_on_mail_from_another_node(cluster.doors(cluster.b), cluster.doors(cluster.a), cluster.tls(),
                                                   pharmacist, doctor)
    print(f"submitted to node B, IDLE on node A woken after {waited * 1000:.0f} ms")


@pytest.mark.postgres
@pytest.mark.slow
def test_a_node_without_workers_has_its_mail_delivered_by_the_other_at_once(tmp_path: Path,
                                                                          pg_cluster: PgCluster) -> None:
    """``--only smtp,imap,https`` on node A: node B delivers what A accepted, told at once (NOTIFY), not at its
    next look for due work (here 30 s away: smtp.local_retry_seconds 60), while A's IDLE session waits 20 s."""
    with _two_nodes(tmp_path, pg_cluster, a_roles=["smtp", "imap", "https"],
                    env={"GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "60"}) as nodes:
        assert json.loads((nodes.a.data_dir / "run" / "ready.json").read_text())["workers"] == {}
        doctor, pharmacist = nodes.a.account("PER", 0), nodes.a.account("PER", 1)
        doors_a = nodes.doors(nodes.a)
        waited = _idle_wakes_on_mail_from_another_node(doors_a, doors_a, nodes.tls(), doctor, pharmacist,
                                                       timeout=20)
        print(f"accepted by node A (no workers), delivered by node B, IDLE on A woken after {waited * 1000:.0f} ms")


def _load(doors: list[Address], tls: ssl.SSLContext, senders: list[dict[str, Any]], recipients: list[str],
          total: int, threads: int, acknowledged: set[str], failed_over: list[str]) -> list[threading.Thread]:
    """``total`` submissions from ``threads`` clients spread over ``doors``; a client whose door fails goes on
    through the next one, without sending again the message whose 250 it did not get."""
    lock = threading.Lock()

    def client(number: int) -> None:
        door = number % len(doors)
        for index in range(number, total, threads):
            marker = f"load-{index:04d}"
            for _attempt in range(len(doors)):
                try:
                    _submit(doors[door], tls, senders[index % len(senders)], recipients[index % len(recipients)],
                            marker, _body(marker))
                except (smtplib.SMTPException, OSError):
                    door = (door + 1) % len(doors)             # this node is gone: the next one
                    with lock:
                        failed_over.append(marker)
                    break                                      # unacknowledged: not sent again (no duplicate)
                with lock:
                    acknowledged.add(marker)
                break

    workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    return workers


def _body(marker: str) -> str:
    return "".join(f"{marker} line {n}: compte rendu de consultation.\r\n" for n in range(40))


def _delivered(door: Address, tls: ssl.SSLContext, accounts: list[dict[str, Any]]) -> Counter[str]:
    """marker -> whole copies in the accounts' INBOXes (a torn copy counts as ``torn:<marker>``)."""
    counts: Counter[str] = Counter()
    for account in accounts:
        with imaplib.IMAP4_SSL(*door, ssl_context=tls, timeout=60) as imap:
            imap.login(account["address"], account["password"])
            if imap.select("INBOX", readonly=True)[0] != "OK":
                continue
            _, found = imap.uid("SEARCH", "ALL")
            for uid in found[0].split():
                _, data = imap.uid("FETCH", uid.decode(), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)] BODY.PEEK[TEXT])")
                parts = [part[1] for part in data if isinstance(part, tuple)]
                match = re.search(rb"<(load-\d{4})@multinode\.test>", parts[0])
                if match:
                    marker = match.group(1).decode()
                    whole = parts[1].rstrip(b"\r\n") == _body(marker).encode().rstrip(b"\r\n")
                    counts[marker if whole else f"torn:{marker}"] += 1
    return counts


def _load_survives_a_killed_node(cluster: Cluster, doors: Doors, read_through: Address, total: int = 200) -> None:
    """A load spread over ``doors``; node A SIGKILLed halfway, then restarted: every acknowledged message
    delivered exactly once, whole, read through ``read_through``."""
    tls = cluster.tls()
    senders = [cluster.a.account("PER", n) for n in range(3)]
    readers = [cluster.a.account("PER", (n + 1) % 3) for n in range(3)]     # each writes to the next
    acknowledged: set[str] = set()
    failed_over: list[str] = []
    workers = _load(doors.smtp, tls, senders, [r["address"] for r in readers], total, 8, acknowledged, failed_over)
    wait_until(lambda: True if len(acknowledged) >= total // 2 else None, timeout=600, what="half the load accepted")
    cluster.a.kill()                                          # SIGKILL: no cleanup, mid-delivery
    for worker in workers:
        worker.join(600)
    assert len(acknowledged) + len(failed_over) == total
    cluster.a.start()                                         # restarted: its recovery pass joins node B's work

    def everything_delivered() -> Counter[str] | None:
        counts = _delivered(read_through, tls, readers)
        return counts if all(counts[marker] for marker in acknowledged) else None

    counts = wait_until(everything_delivered, timeout=300, what="every acknowledged message delivered", interval=2)
    assert not [m for m in counts if m.startswith("torn:")], "a delivered message is not whole"
    assert {m: n for m, n in counts.items() if n > 1} == {}, "a message was delivered twice"
    assert set(counts) - acknowledged <= set(failed_over)     # nothing appears that was never sent
    assert list((cluster.shared / "spool" / "incoming" / "a").iterdir()) == []   # A's half-received files gone
    print(f"{len(acknowledged)} acknowledged, {len(failed_over)} cut by the kill "
          f"({len(set(counts) & set(failed_over))} of those delivered: committed before the 250 was lost)")


@pytest.mark.postgres
@pytest.mark.slow
def test_a_load_over_two_nodes_is_delivered_once_while_one_is_killed(cluster: Cluster) -> None:
    doors = Doors(smtp=[*cluster.doors(cluster.a).smtp, *cluster.doors(cluster.b).smtp],
                  imaps=[*cluster.doors(cluster.a).imaps, *cluster.doors(cluster.b).imaps])
    _load_survives_a_killed_node(cluster, doors, read_through=cluster.doors(cluster.b).imaps[0])


# ------------------------------------------------------------------ the same, behind HAProxy (PROXY protocol v2)

def _queued_on(node: GatewayProcess) -> int:
    """How many messages this node has accepted (its log's "queued <id> from" lines)."""
    return len(re.findall(r"\bqueued \S+ from ", (node.data_dir / "serve.log").read_text(errors="replace")))


def _node_of_login(cluster: Cluster, address: str) -> GatewayProcess:
    for node in (cluster.a, cluster.b):
        if f"user {address} logged in" in (node.data_dir / "serve.log").read_text(errors="replace"):
            return node
    raise AssertionError(f"no node logged {address} in")


@pytest.mark.postgres
@pytest.mark.slow
def test_behind_haproxy_mail_crosses_nodes_to_idle_and_a_killed_node_loses_nothing(tmp_path: Path,
                                                                                    pg_cluster: PgCluster) -> None:
    """Issue 13's test: two nodes on one PostgreSQL behind HAProxy (TCP, send-proxy-v2, health checks,
    round robin). A message submitted through the proxy that lands on the node the IDLE session is NOT on
    wakes it; then a load through the proxy is delivered exactly once while node A is SIGKILLed halfway."""
    from tests.haproxy import HAProxy, frontends_for, trusting
    with _two_nodes(tmp_path, pg_cluster, env=trusting("127.0.0.1")) as nodes:
        frontends = frontends_for([nodes.a, nodes.b], protocols=("smtp_submissions", "imaps"))
        with HAProxy(frontends, directory=tmp_path, proxy_protocol="v2", check=True) as proxy:
            doors = Doors(smtp=[proxy.address("smtp_submissions")], imaps=[proxy.address("imaps")])
            tls, doctor, pharmacist = nodes.tls(), nodes.a.account("PER", 0), nodes.a.account("PER", 1)
            reader = imaplib.IMAP4_SSL(*doors.imaps[0], ssl_context=tls, timeout=30)
            try:
                reader.login(pharmacist["address"], pharmacist["password"])
                reading_node = _node_of_login(nodes, pharmacist["address"])
                _submit(doors.smtp[0], tls, doctor, pharmacist["address"], "proxied-first")
                count = wait_until(lambda: _selected_count(reader), timeout=90, what="the first message readable")
                tag = reader._new_tag().decode()
                reader.send(f"{tag} IDLE\r\n".encode())
                assert reader.readline().startswith(b"+ ")
                crossed = None
                for attempt in range(4):          # round robin: within two submissions one lands on the other node
                    before = {node.data_dir: _queued_on(node) for node in (nodes.a, nodes.b)}
                    started = time.monotonic()
                    _submit(doors.smtp[0], tls, doctor, pharmacist["address"], f"proxied-idle-{attempt}")
                    line = reader.readline()                 # bounded by the socket's timeout
                    waited = time.monotonic() - started
                    count += 1
                    assert line.rstrip() == f"* {count} EXISTS".encode(), line
                    accepting = [n for n in (nodes.a, nodes.b) if _queued_on(n) > before[n.data_dir]]
                    if accepting and accepting[0] is not reading_node:
                        crossed = waited
                        break
                assert crossed is not None, "no submission through HAProxy reached the other node"
                print(f"through HAProxy: accepted by one node, IDLE on the other woken after {crossed * 1000:.0f} ms")
                reader.send(b"DONE\r\n")
                while not reader.readline().startswith(tag.encode()):
                    pass
            finally:
                with contextlib.suppress(Exception):
                    reader.logout()
            _load_survives_a_killed_node(nodes, doors, read_through=doors.imaps[0])


# ------------------------------------------------------------------ one sign-in limiter for every node

LIMITED = {"GATEWAY_AUTH_FAILURES_BEFORE_DELAY": "3", "GATEWAY_AUTH_FIRST_DELAY_SECONDS": "600",
           "GATEWAY_AUTH_MAX_DELAY_SECONDS": "600"}


@pytest.mark.postgres
@pytest.mark.slow
def test_a_guesser_alternating_between_nodes_is_locked_out_as_against_one(tmp_path: Path,
                                                                        pg_cluster: PgCluster) -> None:
    """Three free failures per login and source, then ten minutes: the guesser's attempts go to node A, B, A, B...
    The fourth waits, on either node, by every door, right password or not; the clinician elsewhere signs in on
    both; each failure and the one waiting period are audited once."""
    from tests.security.test_auth_doors import imap_login, smtp_auth

    guesser, hospital = "127.0.0.4", "127.0.0.3"
    with _two_nodes(tmp_path, pg_cluster, env=LIMITED) as nodes:
        doctor = nodes.a.account("PER", 0)
        answers = [imap_login(node, guesser, doctor["address"], f"guess-{attempt}")
                   for attempt, node in enumerate([nodes.a, nodes.b, nodes.a])]
        assert all("[AUTHENTICATIONFAILED]" in answer for answer in answers), answers
        assert "[UNAVAILABLE]" in imap_login(nodes.b, guesser, doctor["address"], "guess-3")
        assert "[UNAVAILABLE]" in imap_login(nodes.a, guesser, doctor["address"], doctor["password"])
        code, text = smtp_auth(nodes.b, guesser, doctor["address"], doctor["password"])
        assert code == 454 and text.startswith(b"4.7.0 Too many failed authentication attempts; try again in")
        assert imap_login(nodes.a, hospital, doctor["address"], doctor["password"]) == "OK"
        assert imap_login(nodes.b, hospital, doctor["address"], doctor["password"]) == "OK"
        listed = nodes.a.cli("audit", "list", "--event", "authentication_failed", "--actor", doctor["address"],
                             "--json", check=True)
        reasons = sorted(entry["outcome"]["reason"] for entry in json.loads(listed.stdout))
        assert len(reasons) == 4 and sum(reason.startswith("throttled") for reason in reasons) == 1, reasons

"""Outbound delivery end to end: a real gateway (submission, pipeline, queue) sends through the
outbound worker, routed by MX records from dnsmasq, to peer operators on loopback that require
TLS and verify our client certificate (aiosmtpd servers playing the other operators)."""

from __future__ import annotations

import datetime as dt
import email
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.config import DkimSettings
from gateway.queue.tables import QueuedMessage, QueuedRecipient
from gateway.queue.store import QueueStore
from gateway.security.dkim import DkimKeys, verify_dkim
from gateway.security.pki import TestPKI
from gateway.security.tls import server_context
from gateway.queue.outbound import OutboundWorker, outbound_tls_context
from gateway.queue.outbound_store import OutboundStore
from tests.dnsmasq import Dnsmasq, DnsZone, free_port
from tests.smtp.conftest import logged_in, message
from tests.smtp.gateway_thread import GatewayThread

OUR_DOMAIN = "demo.mssante.localhost"
PEERS = {"ok": "127.0.0.2", "plain": "127.0.0.3", "untrusted": "127.0.0.4", "wrongname": "127.0.0.5"}
DEAD_IP = "127.0.0.6"
TEST_DOMAINS = ["ok.test", "plain.test", "untrusted.test", "wrongname.test", "nullmx.test", "backup.test", "nomx.test"]


# --------------------------------------------------------------------------- the other operators

@dataclass
class PeerHandler:
    """An operator's MTA: "reject..." recipients get 550, "later..." recipients 451, others 250."""

    received: list[tuple[str, list[str], bytes, str | None]] = field(default_factory=list)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        local = address.split("@", 1)[0]
        if local.startswith("reject"):
            return "550 5.1.1 no such mailbox here"
        if local.startswith("later"):
            return "451 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        extra = session.ssl if isinstance(session.ssl, dict) else {}
        ssl_object = extra.get("ssl_object")
        client_names = [v for k, v in (ssl_object.getpeercert() or {}).get("subjectAltName", ())] if ssl_object else []
        version = f"{ssl_object.version()} client={','.join(client_names)}" if ssl_object is not None else None
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or b""), version))
        return "250 2.0.0 queued"


@dataclass
class Peer:
    controller: Controller
    handler: PeerHandler


def start_peer(ip: str, port: int, cert: tuple[Path, Path] | None, client_ca: Path | None) -> Peer:
    handler = PeerHandler()
    kwargs: dict[str, Any] = {}
    if cert is not None:
        kwargs = {"tls_context": server_context(cert[0], cert[1], client_ca=client_ca, require_client_cert=True),
                  "require_starttls": True}
    controller = Controller(handler, hostname=ip, port=port, server_hostname=f"peer-{ip}", decode_data=False,
                            data_size_limit=0, **kwargs)
    controller.start()
    return Peer(controller, handler)


# --------------------------------------------------------------------------- fixtures

@dataclass
class World:
    gw: GatewayThread
    worker: OutboundWorker
    peers: dict[str, Peer]
    dkim_settings: Any
    data_dir: Path

    def send(self, to: list[str], subject: str, *, rcpt_options: list[str] | None = None,
             mail_options: list[str] | None = None) -> str:
        account = self.gw.account("PER")
        client = logged_in(self.gw, account.address, account.password)
        try:
            client.ehlo()
            code, reply = client.docmd(f"MAIL FROM:<{account.address}>" + "".join(" " + o for o in mail_options or []))
            assert code == 250, reply
            for address in to:
                code, reply = client.docmd(f"RCPT TO:<{address}>" + "".join(" " + o for o in rcpt_options or []))
                assert code == 250, reply
            code, reply = client.data(message(account.address, ", ".join(to), subject,
                                              body="Bonjour,\r\n.ligne qui commence par un point\r\nFin.\r\n"))
            assert code == 250, reply
        finally:
            client.quit()
        return reply.decode().rsplit(" ", 1)[-1]

    def deliver(self) -> int:
        return self.gw.call(self.worker.run_once())

    def show(self, queue_id: str) -> dict[str, Any]:
        record = self.gw.call(OutboundStore(self.gw.db).show(queue_id))  # type: ignore[arg-type]
        assert record is not None
        return record

    def recipient(self, queue_id: str, address: str) -> dict[str, Any]:
        return next(r for r in self.show(queue_id)["recipients"] if r["address"] == address)

    def dsns_for(self, sender: str) -> list[bytes]:
        """Reports delivered into ``sender``'s INBOX by local delivery (the whole bounce path)."""
        self.gw.wait_delivered()
        return [body for body in self.gw.inbox(sender) if b"report-type=delivery-status" in body]

    def report_rows(self, sender: str) -> list[tuple[QueuedMessage, list[QueuedRecipient]]]:
        async def find() -> list[tuple[QueuedMessage, list[QueuedRecipient]]]:
            from sqlalchemy import select
            assert self.gw.db is not None
            async with self.gw.db.session() as s:
                rows = (await s.scalars(select(QueuedMessage).join(QueuedRecipient).where(
                    QueuedMessage.sender == "", QueuedRecipient.address == sender).order_by(QueuedMessage.id))).all()
            store = QueueStore(self.gw.db)
            return [(row, await store.recipients_of(row.id)) for row in rows]
        return self.gw.call(find())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("outbound")
    keys = DkimKeys(base / "dkim")
    key = keys.generate(OUR_DOMAIN, "mss1")
    zone = DnsZone(
        zones=["test", OUR_DOMAIN],
        mx=[("ok.test", "mx.ok.test", 10), ("plain.test", "mx.plain.test", 10),
            ("untrusted.test", "mx.untrusted.test", 10), ("wrongname.test", "mx.wrongname.test", 10),
            ("backup.test", "mx.dead.test", 10), ("backup.test", "mx.ok.test", 20)],
        null_mx=["nullmx.test"],
        hosts=[("mx.ok.test", PEERS["ok"]), ("mx.plain.test", PEERS["plain"]), ("mx.untrusted.test", PEERS["untrusted"]),
               ("mx.wrongname.test", PEERS["wrongname"]), ("mx.dead.test", DEAD_IP), ("nomx.test", PEERS["ok"])],
        txt=[(key.dns_name, key.txt_record)],
    )
    dns_server = Dnsmasq(base / "dns", zone).start()
    port = free_port()
    overrides = {"outbound": {"nameserver": "127.0.0.1", "nameserver_port": dns_server.port, "smtp_port": port,
                              "dns_timeout_seconds": 2, "connect_timeout_seconds": 5, "command_timeout_seconds": 30,
                              "poll_seconds": 0.2, "delay_warning_minutes": 0.001},
                 "dkim": {"key_dir": str(base / "dkim")}}
    gw = GatewayThread(base / "data", overrides=overrides).start()
    assert gw.pki is not None and gw.settings is not None and gw.directory is not None
    for domain in TEST_DOMAINS:
        gw.call(gw.directory.trust_domain(domain, operator="test peer"))
    ok_cert = gw.pki.issue_server("mx-ok", ["mx.ok.test", "nomx.test"])
    wrong_cert = gw.pki.issue_server("mx-wrongname", ["mx.somewhere-else.test"])
    stranger_pki = TestPKI(base / "stranger-pki", organisation="NOT-IGC-SANTE")
    stranger_pki.init()
    stranger_cert = stranger_pki.issue_server("mx-untrusted", ["mx.untrusted.test"])
    ca = gw.pki.ca_bundle_path
    peers = {
        "ok": start_peer(PEERS["ok"], port, (ok_cert.chain_path, ok_cert.key_path), ca),
        "plain": start_peer(PEERS["plain"], port, None, None),
        "untrusted": start_peer(PEERS["untrusted"], port, (stranger_cert.chain_path, stranger_cert.key_path), ca),
        "wrongname": start_peer(PEERS["wrongname"], port, (wrong_cert.chain_path, wrong_cert.key_path), ca),
    }

    async def make_worker() -> OutboundWorker:
        assert gw.settings is not None and gw.db is not None and gw.directory is not None and gw.pki is not None
        assert gw.queue is not None
        return OutboundWorker(gw.db, gw.settings, gw.queue.generated,
                              tls_context=outbound_tls_context(gw.pki, gw.settings))

    worker = gw.call(make_worker())
    yield World(gw, worker, peers, DkimSettings(key_dir=str(base / "dkim")), base / "data")
    gw.call(worker.stop())
    for peer in peers.values():
        peer.controller.stop()
    gw.stop()
    dns_server.stop()


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met before the deadline")


# --------------------------------------------------------------------------- tests

def test_delivered_over_verified_mutual_tls_with_dkim(world: World) -> None:
    before = len(world.peers["ok"].handler.received)
    queue_id = world.send(["alice@ok.test"], "livraison")
    world.deliver()
    recipient = world.recipient(queue_id, "alice@ok.test")
    assert recipient["state"] == "delivered"
    attempt = recipient["history"][-1]
    assert attempt["mx"] == "mx.ok.test" and attempt["ip"] == PEERS["ok"] and attempt["code"] == 250
    assert attempt["tls"] in ("TLSv1.2", "TLSv1.3")
    sender, rcpts, data, tls_version = world.peers["ok"].handler.received[before]
    assert rcpts == ["alice@ok.test"]
    assert tls_version is not None and tls_version.startswith("TLSv1.") and "localhost" in tls_version   # our client cert
    assert data.startswith(b"DKIM-Signature:")
    assert b"Return-Path:" not in data.split(b"\r\n\r\n", 1)[0]             # RFC 5321 4.4: final delivery adds it
    assert b"\r\n.ligne qui commence par un point\r\n" in data              # dot-stuffing undone by the peer
    outbound = world.gw.settings.outbound  # type: ignore[union-attr]
    result = world.gw.call(verify_dkim(data, settings=outbound))
    assert result.startswith(f"dkim=pass header.d={OUR_DOMAIN} header.s=mss1"), result
    assert world.show(queue_id)["state"] == "done"


def test_second_mx_used_when_first_is_down_and_implicit_mx(world: World) -> None:
    queue_id = world.send(["bob@backup.test", "carol@nomx.test"], "secours")
    world.deliver()
    backup = world.recipient(queue_id, "bob@backup.test")
    assert backup["state"] == "delivered" and backup["history"][-1]["mx"] == "mx.ok.test"
    implicit = world.recipient(queue_id, "carol@nomx.test")
    assert implicit["state"] == "delivered" and implicit["history"][-1]["mx"] == "nomx.test"   # RFC 5321 5.1


def test_peer_without_starttls_is_deferred_never_plaintext(world: World) -> None:
    queue_id = world.send(["dan@plain.test"], "pas de TLS")
    world.deliver()
    recipient = world.recipient(queue_id, "dan@plain.test")
    assert recipient["state"] == "deferred"
    assert "does not offer STARTTLS" in recipient["last_error"]
    assert world.peers["plain"].handler.received == []


def test_untrusted_certificate_is_deferred_and_named(world: World) -> None:
    queue_id = world.send(["erin@untrusted.test"], "mauvais certificat")
    world.deliver()
    recipient = world.recipient(queue_id, "erin@untrusted.test")
    assert recipient["state"] == "deferred"
    assert "not accepted" in recipient["last_error"]
    assert "mx.untrusted.test" in recipient["last_error"] and "NOT-IGC-SANTE" in recipient["last_error"]
    assert recipient["history"][-1]["enhanced"] == "4.7.5"
    assert world.peers["untrusted"].handler.received == []


def test_certificate_for_another_name_is_deferred(world: World) -> None:
    queue_id = world.send(["fay@wrongname.test"], "mauvais nom")
    world.deliver()
    recipient = world.recipient(queue_id, "fay@wrongname.test")
    assert recipient["state"] == "deferred" and "mx.somewhere-else.test" in recipient["last_error"]
    assert world.peers["wrongname"].handler.received == []


def test_temporary_failure_follows_the_backoff_table(world: World) -> None:
    queue_id = world.send(["later-gus@ok.test"], "plus tard")
    world.deliver()
    first = world.recipient(queue_id, "later-gus@ok.test")
    assert first["state"] == "deferred" and first["attempts"] == 1
    attempt = first["history"][0]
    assert attempt["code"] == 451 and attempt["enhanced"] == "4.2.1"
    assert attempt["next_attempt_at"] - attempt["at"] == dt.timedelta(minutes=7.5)
    assert first["next_attempt_at"] == attempt["next_attempt_at"]
    assert world.deliver() == 0 or world.recipient(queue_id, "later-gus@ok.test")["attempts"] == 1  # not due yet
    world.gw.call(OutboundStore(world.gw.db).retry([queue_id]))  # type: ignore[arg-type]
    world.deliver()
    second = world.recipient(queue_id, "later-gus@ok.test")
    assert second["attempts"] == 2
    assert second["history"][1]["next_attempt_at"] - second["history"][1]["at"] == dt.timedelta(minutes=15)


def test_delay_dsn_sent_once(world: World) -> None:
    account = world.gw.account("PER").address
    before = len(world.dsns_for(account))
    queue_id = world.send(["later-hal@ok.test"], "retard")
    world.deliver()
    world.gw.call(OutboundStore(world.gw.db).retry([queue_id]))  # type: ignore[arg-type]
    world.deliver()
    reports = world.dsns_for(account)[before:]
    assert len(reports) == 1                                            # one delay warning, not one per attempt
    parsed = email.message_from_bytes(reports[0], policy=policy.default)
    status = list(parsed.iter_parts())[1].get_payload()[1]
    assert status["Action"] == "delayed" and status["Status"] == "4.2.1" and status["Will-Retry-Until"]


def test_permanent_failure_bounces_with_rfc3464_fields(world: World) -> None:
    account = world.gw.account("PER").address
    queue_id = world.send(["reject-ivy@ok.test", "jo@ok.test"], "echec",
                          rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;Original+2BIvy@ok.test"],
                          mail_options=["RET=HDRS", "ENVID=env-42"])
    world.deliver()
    assert world.recipient(queue_id, "reject-ivy@ok.test")["state"] == "failed"
    assert world.recipient(queue_id, "jo@ok.test")["state"] == "delivered"
    data = next(d for d in world.dsns_for(account) if b"reject-ivy@ok.test" in d and b"env-42" in d)
    row, recipients = world.report_rows(account)[-1]
    assert row.door == "dsn" and row.state == "done"                          # delivered, spool file gone
    assert [(r.address, r.route, r.state) for r in recipients] == [(account, "local", "delivered")]
    parsed = email.message_from_bytes(data, policy=policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    per_message, per_recipient = parts[1].get_payload()[0], parts[1].get_payload()[1]
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert per_recipient["Final-Recipient"] == "rfc822; reject-ivy@ok.test"
    assert per_recipient["Original-Recipient"] == "rfc822; Original+Ivy@ok.test"
    assert per_recipient["Action"] == "failed" and per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.ok.test"
    assert "550 5.1.1 no such mailbox here" in per_recipient["Diagnostic-Code"]
    assert b"Bonjour" not in parts[2].get_payload(decode=True)                  # RET=HDRS: the header only


def test_null_mx_is_a_permanent_failure(world: World) -> None:
    queue_id = world.send(["kim@nullmx.test"], "null mx")
    world.deliver()
    recipient = world.recipient(queue_id, "kim@nullmx.test")
    assert recipient["state"] == "failed" and "null MX" in recipient["last_error"]
    assert recipient["history"][-1]["enhanced"] == "5.1.10"


def test_worker_loop_delivers_in_the_background(world: World) -> None:
    world.gw.call(world.worker.start())
    try:
        queue_id = world.send(["lou@ok.test"], "boucle")
        wait_for(lambda: world.recipient(queue_id, "lou@ok.test")["state"] == "delivered")
    finally:
        world.gw.call(world.worker.stop())


def gateway_cli(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--data-dir", str(world.data_dir), "queue", *args],
                          capture_output=True, text=True, timeout=120)


def test_queue_cli_list_show_hold_release_retry_delete(world: World) -> None:
    queue_id = world.send(["later-max@ok.test"], "cli")
    world.deliver()
    listed = json.loads(gateway_cli(world, "list", "--json", "--state", "deferred").stdout)
    assert queue_id in [row["id"] for row in listed]
    shown = gateway_cli(world, "show", queue_id, "--json")
    assert shown.returncode == 0
    history = json.loads(shown.stdout)["recipients"][0]["history"]
    assert history[0]["mx"] == "mx.ok.test" and history[0]["code"] == 451 and history[0]["next_attempt_at"]
    human = gateway_cli(world, "show", queue_id)
    assert "mx.ok.test[127.0.0.2]" in human.stdout and "451" in human.stdout

    assert gateway_cli(world, "hold", queue_id).returncode == 0
    assert queue_id in [r["id"] for r in json.loads(gateway_cli(world, "list", "--json", "--state", "held").stdout)]
    retried = gateway_cli(world, "retry", queue_id)
    assert retried.returncode == 0, retried.stderr
    world.deliver()
    assert world.recipient(queue_id, "later-max@ok.test")["attempts"] == 1        # held: not tried
    assert gateway_cli(world, "release", queue_id).returncode == 0
    world.deliver()
    assert world.recipient(queue_id, "later-max@ok.test")["attempts"] == 2

    account = world.gw.account("PER").address
    before = len(world.report_rows(account))
    deleted = gateway_cli(world, "delete", queue_id, "--bounce")
    assert deleted.returncode == 0, deleted.stderr
    assert gateway_cli(world, "show", queue_id).returncode == 1
    reports = world.report_rows(account)
    assert len(reports) == before + 1 and reports[-1][1][0].route == "local"    # queued for the sender's mailbox
    assert world.gw.queue is not None and not world.gw.queue.spool.path_of(queue_id).exists()
    assert gateway_cli(world, "retry").returncode == 2                           # usage: an id or --all
    assert gateway_cli(world, "hold", "nosuchid").returncode == 1

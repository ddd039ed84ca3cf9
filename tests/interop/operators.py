"""Several operators of the trust space on one machine, each a real ``gateway serve``.

How the operators find each other, as they would on the Internet:

- each operator has its own loopback address (127.0.0.2, 127.0.0.3, ...) and
  binds every listener there; the relay listener is on the **same port** for
  all of them (the "port 25" of this little Internet, ``outbound.smtp_port``);
- dnsmasq serves ``MX <domain> -> mx.<domain>`` and ``A mx.<domain> -> 127.0.0.N``,
  so an operator finds its peer exactly as in production: MX lookup, then
  the A record, then the standard relay port. No transport map.
- each operator has its own test PKI (``gateway init``), the way each would
  have its certificates; trusting another operator's CA is configuration
  (``pki.trust_anchors``: its CA chain and CRLs), trusting its domain is the
  trust list (``gateway domain trust add``).
- every operator's certificate names ``mx.<domain>``: it is the MX host name
  that sending operators verify (RFC 6125), and the name that speaks for the
  sender domain on the relay door.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

from tests.dnsmasq import Dnsmasq, DnsZone
from tests.harness import PORT_KEYS, GatewayProcess, free_ports, read_inbox

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def tls_client(ca_files: list[str], cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca_files[0])
    for extra in ca_files[1:]:
        context.load_verify_locations(cafile=extra)
    if cert:
        context.load_cert_chain(cert, key)
    return context


@dataclass
class Operator:
    """One operator: a domain, a loopback address and a gateway serving both."""

    name: str                       # "a"
    address: str                    # "127.0.0.2"
    workdir: Path
    ports: dict[str, int]
    extra_env: dict[str, str] = field(default_factory=dict)
    gateway: GatewayProcess | None = None

    @property
    def domain(self) -> str:
        return f"{self.name}.mssante.localhost"

    @property
    def mx(self) -> str:
        return f"mx.{self.domain}"

    @property
    def gw(self) -> GatewayProcess:
        assert self.gateway is not None
        return self.gateway

    @property
    def pki_dir(self) -> Path:
        return self.gw.data_dir / "pki"

    def anchor_files(self) -> list[str]:
        """What another operator lists in ``pki.trust_anchors`` to trust this operator's CA."""
        return [str(self.pki_dir / "ca" / "chain.pem"), str(self.pki_dir / "crl" / "intermediate.crl.pem"),
                str(self.pki_dir / "crl" / "root.crl.pem")]

    def init(self, dns_port: int) -> None:
        env = {
            "GATEWAY_HOSTNAME": self.mx,
            "GATEWAY_DIRECTORY_PROFESSIONAL_DOMAIN": self.domain,
            "GATEWAY_DIRECTORY_PATIENT_DOMAIN": f"patient.{self.domain}",
            "GATEWAY_LISTEN_HOST": self.address,
            "GATEWAY_PKI_SERVER_NAMES": "[]",                 # the certificate names mx.<domain> only
            "GATEWAY_PKI_SERVER_IPS": json.dumps([self.address]),
            "GATEWAY_OUTBOUND_NAMESERVER": "127.0.0.1",
            "GATEWAY_OUTBOUND_NAMESERVER_PORT": str(dns_port),
            "GATEWAY_OUTBOUND_SMTP_PORT": str(self.ports["smtp_relay_port"]),
            "GATEWAY_OUTBOUND_POLL_SECONDS": "0.5",
            "GATEWAY_OUTBOUND_CONNECT_TIMEOUT_SECONDS": "10",
            "GATEWAY_OUTBOUND_COMMAND_TIMEOUT_SECONDS": "30",
            **self.extra_env,
        }
        self.gateway = GatewayProcess(self.workdir / self.name, extra_env=env, ports=dict(self.ports))
        self.gateway.init_demo()

    def trust_domain(self, domain: str, operator: str) -> None:
        self.gw.cli("domain", "trust", "add", domain, "--operator", operator, check=True)

    def trust_ca_of(self, *others: "Operator | list[str]") -> None:
        files = [f for other in others for f in (other.anchor_files() if isinstance(other, Operator) else other)]
        self.gw.extra_env["GATEWAY_PKI_TRUST_ANCHORS"] = json.dumps(files)

    def start(self) -> None:
        self.gw.start()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()

    # ----------------------------------------------------------------- its users

    def clinician(self, index: int = 0) -> dict[str, Any]:
        return self.gw.account("PER", index)

    @property
    def ca_file(self) -> str:
        return self.gw.ca_file

    def client_tls(self) -> ssl.SSLContext:
        return tls_client([self.ca_file])

    def submit(self, account: dict[str, Any], recipients: list[str], subject: str, body: str = "Bonjour confrère.\n") -> None:
        import smtplib

        msg = EmailMessage()
        msg["From"] = account["address"]
        msg["To"] = ", ".join(recipients)
        msg["Subject"] = subject
        msg.set_content(body)
        with smtplib.SMTP(self.address, self.ports["smtp_submission_port"], timeout=30) as client:
            client.starttls(context=self.client_tls())
            client.login(account["address"], account["password"])
            refused = client.send_message(msg, from_addr=account["address"], to_addrs=recipients)
        assert refused == {}, refused

    def imap_messages(self, account: dict[str, Any]) -> list[email.message.EmailMessage]:
        """Every message in the account's INBOX, read over IMAP with STARTTLS as a mail client would."""
        with imaplib.IMAP4(self.address, self.ports["imap_port"], timeout=30) as imap:
            imap.starttls(ssl_context=self.client_tls())
            return read_inbox(imap, account)

    def wait_for_message(self, account: dict[str, Any], subject: str, timeout: float = 60.0) -> email.message.EmailMessage:
        def found() -> email.message.EmailMessage | None:
            return next((m for m in self.imap_messages(account) if m["Subject"] == subject), None)
        return wait_for(found, f"{subject!r} in {account['address']}'s INBOX at operator {self.name}", timeout)

    def queue(self, state: str | None = None) -> list[dict[str, Any]]:
        args = ["queue", "list", "--json"] + (["--state", state] if state else [])
        result = self.gw.cli(*args, check=True)
        return json.loads(result.stdout)

    def queue_show(self, queue_id: str) -> dict[str, Any]:
        return json.loads(self.gw.cli("queue", "show", queue_id, "--json", check=True).stdout)


class TrustSpace:
    """dnsmasq plus a set of operators sharing the relay port, each on its own loopback address."""

    def __init__(self, workdir: Path, names: list[str]) -> None:
        self.workdir = workdir
        ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
        self.operators = {name: Operator(name, f"127.0.0.{i + 2}", workdir, ports) for i, name in enumerate(names)}
        self.dns: Dnsmasq | None = None
        self.extra_zone = DnsZone()

    def __getitem__(self, name: str) -> Operator:
        return self.operators[name]

    @property
    def relay_port(self) -> int:
        return next(iter(self.operators.values())).ports["smtp_relay_port"]

    def start_dns(self) -> Dnsmasq:
        zone = DnsZone(zones=["mssante.localhost"])
        for op in self.operators.values():
            zone.mx.append((op.domain, op.mx, 10))
            zone.hosts.append((op.mx, op.address))
        zone.mx += self.extra_zone.mx
        zone.hosts += self.extra_zone.hosts
        self.dns = Dnsmasq(self.workdir / "dns", zone).start()
        return self.dns

    def init_all(self) -> None:
        assert self.dns is not None
        for op in self.operators.values():
            op.init(self.dns.port)

    def stop(self) -> None:
        for op in self.operators.values():
            op.stop()
        if self.dns is not None:
            self.dns.stop()

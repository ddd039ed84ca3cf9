"""A real DNS server for tests: dnsmasq on 127.0.0.1:<free port>, serving MX, A and TXT records.

``local=/zone/`` makes dnsmasq answer for the test zones itself: NXDOMAIN for
unknown names and an empty answer (NODATA) for known names without the asked
type, as an authoritative server would; nothing is forwarded anywhere.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.resolver
import pytest

DNSMASQ_PATHS = ("/usr/sbin/dnsmasq", "/usr/bin/dnsmasq")


def dnsmasq_binary() -> str | None:
    return shutil.which("dnsmasq") or next((p for p in DNSMASQ_PATHS if Path(p).is_file()), None)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port for dnsmasq")


@dataclass
class DnsZone:
    """What dnsmasq serves."""

    zones: list[str] = field(default_factory=list)                   # answered locally (local=/zone/)
    mx: list[tuple[str, str, int]] = field(default_factory=list)     # (domain, exchange, preference)
    null_mx: list[str] = field(default_factory=list)                 # RFC 7505 "0 ."
    hosts: list[tuple[str, str]] = field(default_factory=list)       # (name, IPv4/IPv6 address)
    txt: list[tuple[str, str]] = field(default_factory=list)         # (name, value); split into 255-octet strings

    def config_lines(self) -> list[str]:
        lines = [f"local=/{zone}/" for zone in self.zones]
        lines += [f"mx-host={domain},{exchange},{preference}" for domain, exchange, preference in self.mx]
        # A null MX: an MX RR (type 15) whose RDATA is preference 0 and the root name.
        lines += [f"dns-rr={domain},15,000000" for domain in self.null_mx]
        lines += [f"host-record={name},{address}" for name, address in self.hosts]
        for name, value in self.txt:
            chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
            lines.append(f"txt-record={name}," + ",".join(f'"{chunk}"' for chunk in chunks))
        return lines


class Dnsmasq:
    def __init__(self, workdir: Path, zone: DnsZone) -> None:
        self.workdir = workdir
        self.zone = zone
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> "Dnsmasq":
        binary = dnsmasq_binary()
        if binary is None:
            pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join([
            f"port={self.port}", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv", "no-hosts",
            "keep-in-foreground", "no-daemon", "pid-file=", "log-facility=-", "cache-size=0",
            *self.zone.config_lines(),
        ]) + "\n")
        log = (self.workdir / "dnsmasq.log").open("wb")
        self.process = subprocess.Popen([binary, f"--conf-file={conf}"], stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        resolver = self.resolver()
        deadline = time.monotonic() + timeout
        probe = self.zone.zones[0] if self.zone.zones else "localhost"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {(self.workdir / 'dnsmasq.log').read_text()}")
            try:
                resolver.resolve(probe, "SOA")
                return
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return                                   # it answered
            except dns.exception.DNSException:
                time.sleep(0.05)
        raise RuntimeError("dnsmasq did not answer in time")

    def resolver(self) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 2.0
        return resolver

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

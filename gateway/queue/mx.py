"""Where mail for a domain goes: the static transport map, else MX records (dnspython).

RFC 5321 5.1 in short: look up MX records; sort them by preference, lowest
first, in random order among equal preferences; when the domain has no MX
record but has an address record, that host is the implicit MX (preference
0); a domain that does not exist is a permanent failure. RFC 7505 adds the
null MX (``0 .``): the domain accepts no mail, a permanent failure too. Any
other DNS trouble (timeout, SERVFAIL) is temporary: the queue tries again.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from gateway.config import OutboundSettings

DEFAULT_SMTP_PORT = 25


@dataclass(frozen=True)
class MxHost:
    """One host to try, with the addresses it resolved to (tried in order)."""

    name: str
    preference: int
    port: int
    addresses: tuple[str, ...] = ()


class RouteFailure(Exception):
    """No host to try. ``permanent`` failures fail the recipients; the others defer them.
    ``enhanced`` is the RFC 3463 code reported in the DSN."""

    def __init__(self, text: str, *, permanent: bool, enhanced: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.enhanced = enhanced


@dataclass(frozen=True)
class TransportRoute:
    host: str
    port: int


def parse_transport_map(entries: Sequence[str]) -> dict[str, TransportRoute]:
    """``["domain=host:port", "domain=host"]`` (validated by the settings) -> routes by lower-case domain."""
    routes: dict[str, TransportRoute] = {}
    for entry in entries:
        domain, _, target = entry.partition("=")
        host, port = target.strip(), DEFAULT_SMTP_PORT
        if ":" in host and not host.endswith("]"):
            host, _, port_text = host.rpartition(":")
            port = int(port_text)
        routes[domain.strip().lower().rstrip(".")] = TransportRoute(host.strip("[]"), port)
    return routes


def make_resolver(settings: OutboundSettings) -> dns.asyncresolver.Resolver:
    """The configured nameserver (tests: dnsmasq on loopback), else the system's resolv.conf."""
    if settings.nameserver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [settings.nameserver]
        resolver.port = settings.nameserver_port
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = settings.dns_timeout_seconds
    resolver.timeout = settings.dns_timeout_seconds
    return resolver


class MxResolver:
    def __init__(self, settings: OutboundSettings, *, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        self.resolver = resolver or make_resolver(settings)
        self.port = settings.smtp_port
        self.transport = parse_transport_map(settings.transport_map)

    async def hosts_for(self, domain: str) -> list[MxHost]:
        """The hosts to try for ``domain``, in order, each with its addresses. Raises RouteFailure."""
        domain = domain.lower().rstrip(".")
        static = self.transport.get(domain)
        if static is not None:
            return [MxHost(static.host, 0, static.port, await self.addresses_of(static.host))]
        hosts = await self._mx_hosts(domain)
        resolved: list[MxHost] = []
        for host in hosts:
            try:
                resolved.append(MxHost(host.name, host.preference, host.port, await self.addresses_of(host.name)))
            except RouteFailure:
                continue                            # RFC 5321 5.1: an unusable MX is skipped, the next is tried
        if not resolved:
            raise RouteFailure(f"no address for any MX host of {domain} ({', '.join(h.name for h in hosts)})",
                               permanent=False, enhanced="4.4.4")
        return resolved

    async def _mx_hosts(self, domain: str) -> list[MxHost]:
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise RouteFailure(f"domain {domain} does not exist (DNS NXDOMAIN)", permanent=True, enhanced="5.1.2") from None
        except dns.resolver.NoAnswer:
            # RFC 5321 5.1: no MX records: the domain itself is the implicit MX, preference 0.
            return [MxHost(domain, 0, self.port)]
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            raise RouteFailure(f"MX lookup for {domain} failed: {exc}", permanent=False, enhanced="4.4.3") from None
        records = [(int(r.preference), r.exchange.to_text(omit_final_dot=True)) for r in answer]
        if any(name in ("", ".") for _, name in records):
            # RFC 7505 3: a null MX ("0 .") says the domain accepts no mail at all.
            raise RouteFailure(f"{domain} publishes a null MX: it accepts no mail (RFC 7505)",
                               permanent=True, enhanced="5.1.10")
        return order_by_preference([MxHost(name.lower(), preference, self.port) for preference, name in records])

    async def addresses_of(self, host: str) -> tuple[str, ...]:
        """IPv6 then IPv4 addresses of ``host`` (an IP literal stands for itself)."""
        try:
            return (str(ipaddress.ip_address(host)),)
        except ValueError:
            pass
        found: list[str] = []
        failures: list[str] = []
        for rdtype in ("AAAA", "A"):
            try:
                found += [record.to_text() for record in await self.resolver.resolve(host, rdtype)]
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                failures.append(f"{rdtype}: {exc}")
        if not found:
            detail = "; ".join(failures) or "no A/AAAA record"
            raise RouteFailure(f"cannot resolve {host}: {detail}", permanent=False, enhanced="4.4.4")
        return tuple(found)


def order_by_preference(hosts: list[MxHost]) -> list[MxHost]:
    """RFC 5321 5.1: ascending preference; hosts of equal preference in random order (load spreading)."""
    shuffled = list(hosts)
    random.shuffle(shuffled)
    return sorted(shuffled, key=lambda host: host.preference)   # sorted() is stable: the shuffle survives within a level

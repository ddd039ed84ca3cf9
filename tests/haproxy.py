"""HAProxy (Debian's package) in front of gateway nodes, for tests: TCP mode, the PROXY protocol.

``HAProxy(frontends, directory=...)`` writes a haproxy.cfg with one TCP frontend per protocol on a free
loopback port and one backend per frontend listing its servers (several nodes: round robin), starts
``haproxy -db`` in the foreground as a subprocess, waits until every frontend listens, and stops it::

    with HAProxy({"smtp_submission": [("127.0.0.1", 2587), ("127.0.0.1", 3587)]},
                 directory=tmp_path, proxy_protocol="v2") as proxy:
        host, port = proxy.address("smtp_submission")

``frontends_for(nodes)`` builds that mapping from running ``GatewayProcess`` nodes (every protocol, each
node's ports). HAProxy connects to the nodes from ``source`` (127.0.0.1 by default): that is the address
the gateways must list in ``listen.proxy_protocol_from``; a client connecting to HAProxy from another
loopback address (127.0.0.2) is then seen by the gateway as 127.0.0.2.
"""

from __future__ import annotations

import imaplib
import json
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from tests.harness import GatewayProcess, free_ports

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
Server = tuple[str, int]
# Each protocol and the GatewayProcess port key of its listener.
PROTOCOL_PORTS = {"smtp_relay": "smtp_relay_port", "smtp_submission": "smtp_submission_port",
                  "smtp_submissions": "smtp_submissions_port", "imap": "imap_port", "imaps": "imaps_port",
                  "https": "http_port"}


def trusting(source: str = "127.0.0.1") -> dict[str, str]:
    """The environment a GatewayProcess node needs behind this HAProxy: believe headers from ``source``.
    Then a direct connection to the node from ``source`` without a header is refused: connect directly
    from another loopback address (``SourcedIMAP``, ``smtp_from``), or through HAProxy."""
    return {"GATEWAY_LISTEN_PROXY_PROTOCOL_FROM": json.dumps([f"{source}/32"])}


def smtp_from(address: Server, source: str, timeout: float = 30) -> smtplib.SMTP:
    """An SMTP client connecting from ``source`` (say EHLO client.example, not smtplib's guess)."""
    return smtplib.SMTP(*address, timeout=timeout, source_address=(source, 0), local_hostname="client.example")


class SourcedIMAP(imaplib.IMAP4):
    """imaplib's client connecting from ``source`` (imaplib has no source_address)."""

    def __init__(self, address: Server, source: str, timeout: float = 30) -> None:
        self._source = source
        super().__init__(*address, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class SourcedIMAPS(imaplib.IMAP4_SSL):
    def __init__(self, address: Server, source: str, context: ssl.SSLContext, timeout: float = 30) -> None:
        self._source = source
        super().__init__(*address, ssl_context=context, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))
        context: ssl.SSLContext = self.ssl_context
        return context.wrap_socket(sock, server_hostname=self.host)


def frontends_for(nodes: Sequence[GatewayProcess], protocols: Iterable[str] = PROTOCOL_PORTS,
                  host: str = "127.0.0.1") -> dict[str, list[Server]]:
    """One frontend per protocol whose backend lists every node's listener for it."""
    return {protocol: [(host, node.ports[PROTOCOL_PORTS[protocol]]) for node in nodes] for protocol in protocols}


class HAProxy:
    def __init__(self, frontends: Mapping[str, Sequence[Server]], *, directory: Path,
                 proxy_protocol: Literal["v1", "v2"] | None = "v2", bind_host: str = "127.0.0.1",
                 source: str = "127.0.0.1", check: bool = False, stats_socket: bool = False,
                 balance: str = "roundrobin") -> None:
        if not frontends or any(not servers for servers in frontends.values()):
            raise ValueError("every frontend needs at least one server")
        self.frontends = {name: list(servers) for name, servers in frontends.items()}
        self.directory = directory
        self.proxy_protocol = proxy_protocol
        self.bind_host = bind_host
        self.source = source
        self.check = check
        self.stats_socket = directory / "haproxy.sock" if stats_socket else None
        self.balance = balance
        self.ports: dict[str, int] = dict(zip(self.frontends, free_ports(len(self.frontends))))
        self.config_path = directory / "haproxy.cfg"
        self.log_path = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def address(self, frontend: str) -> Server:
        return self.bind_host, self.ports[frontend]

    def config(self) -> str:
        """The haproxy.cfg: TCP mode, each server with send-proxy / send-proxy-v2, connecting from ``source``."""
        send = {"v1": " send-proxy", "v2": " send-proxy-v2", None: ""}[self.proxy_protocol]
        check = " check inter 1s fall 2 rise 1" if self.check else ""
        lines = ["global", "    maxconn 1024"]
        if self.stats_socket is not None:
            lines.append(f"    stats socket {self.stats_socket} mode 600 level admin")
        lines += ["", "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 120s",
                  "    timeout server 120s", "    retries 2", "    option redispatch", ""]
        for name, servers in self.frontends.items():
            lines += [f"frontend {name}", f"    bind {self.bind_host}:{self.ports[name]}",
                      f"    default_backend {name}_nodes", "",
                      f"backend {name}_nodes", f"    balance {self.balance}"]
            lines += [f"    server node{index} {host}:{port}{send} source {self.source}{check}"
                      for index, (host, port) in enumerate(servers)]
            lines.append("")
        return "\n".join(lines)

    def start(self, timeout: float = 30.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        checked = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        if checked.returncode != 0:
            raise AssertionError(f"haproxy refused its configuration:\n{checked.stdout}{checked.stderr}")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)], stdout=log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not all(_listening(self.bind_host, port) for port in self.ports.values()):
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy not listening after {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def server_states(self) -> dict[str, str]:
        """``backend/server`` -> UP, DOWN, MAINT... from the stats socket (``stats_socket=True``)."""
        assert self.stats_socket is not None, "HAProxy(..., stats_socket=True)"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        lines = answer.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        columns = lines[0][2:].split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(columns, line.split(",")))
            if row.get("svname") not in (None, "FRONTEND", "BACKEND"):
                states[f"{row['pxname']}/{row['svname']}"] = row.get("status", "")
        return states

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(host: str, port: int) -> bool:
    """Is something listening on host:port? Read from /proc/net/tcp (no connection made: a probe through
    HAProxy would reach a gateway node)."""
    wanted_port = f"{port:04X}"
    wanted_host = "".join(f"{int(part):02X}" for part in reversed(host.split(".")))
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        address, _, local_port = local.partition(":")
        if state == "0A" and local_port == wanted_port and address in (wanted_host, "00000000"):
            return True
    return False

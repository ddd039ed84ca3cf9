"""Postfix as a third operator of the trust space, on its own loopback address, TLS both ways.

A standalone instance (the approach of shared/bench-tools/setup-reference.sh):
its own config directory, queue and data directories, no chroot, nothing on
port 25. The Debian package is installed when missing, with debconf's
"No configuration" so that no system instance is set up.

What it is configured to do, as an MSSanté operator would:

- smtpd on ``<address>:<relay port>``: STARTTLS mandatory (``encrypt``), a client
  certificate required and verified against the CA file (``smtpd_tls_req_ccert``),
  TLS 1.2+, its own certificate issued under the operator PKI; mail for its
  own domain only (``reject_unauth_destination``), delivered by virtual(8) into
  maildirs under ``mail/<domain>/<user>/``;
- a second smtpd on ``<address>:<submission port>`` for its users (swaks in the
  tests): relaying allowed from loopback only;
- smtp client: a static route per peer domain (``transport_maps``, Postfix cannot
  use a DNS server on a custom port) and the TLS policy ``secure`` with
  ``match=<peer MX name>``: the peer's certificate must chain to the CA file and
  name the MX host; our certificate is presented (``smtp_tls_chain_files``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CONFIG_ROOT = Path("/var/tmp/gateway-interop-postfix")    # listed once in the default main.cf (see _allow_config_dir)
DEFAULT_MAIN_CF = Path("/etc/postfix/main.cf")


def ensure_postfix_installed() -> None:
    """Install the Debian package when missing (root only), as scripts/install-deps.sh does; else skip."""
    if shutil.which("postfix") or Path("/usr/sbin/postfix").exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Postfix is not installed (Debian package postfix; scripts/install-deps.sh installs it)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    selections = ("postfix postfix/main_mailer_type select No configuration\n"
                  "postfix postfix/mailname string localhost\n")
    subprocess.run(["debconf-set-selections"], input=selections, text=True, check=True, env=env)
    result = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"],
                            capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"cannot install Postfix: {result.stderr[-500:]}")


def _allow_config_dir(config_dir: Path) -> None:
    """``postfix -c DIR`` refuses a directory the default instance's main.cf does not list."""
    if not DEFAULT_MAIN_CF.exists():
        DEFAULT_MAIN_CF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_MAIN_CF.write_text(
            "# Minimal default-instance main.cf (written by the gateway's interop tests); this instance is not\n"
            "# started. Standalone test instances live in the alternate_config_directories below.\n"
            "compatibility_level = 3.6\ninet_interfaces = loopback-only\nmydestination =\n"
            f"alternate_config_directories = {config_dir}\n")
        return
    current = subprocess.run(["postconf", "-h", "alternate_config_directories"], capture_output=True, text=True).stdout
    if str(config_dir) not in current.replace(",", " ").split():
        value = f"{current.strip()} {config_dir}".strip()
        subprocess.run(["postconf", "-e", f"alternate_config_directories = {value}"], check=True)


@dataclass
class PostfixOperator:
    domain: str                          # p.mssante.localhost
    address: str                         # 127.0.0.5
    relay_port: int                      # the same "port 25" as every operator
    submission_port: int
    cert_chain: Path                     # leaf + intermediate, issued to mx.<domain>
    key: Path
    ca_file: Path                        # the anchors peers' certificates must chain to (CAs and CRLs)
    routes: dict[str, tuple[str, str]] = field(default_factory=dict)   # peer domain -> (IP, MX name)
    users: list[str] = field(default_factory=lambda: ["dr.paul"])
    root: Path = CONFIG_ROOT

    @property
    def mx(self) -> str:
        return f"mx.{self.domain}"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "postfix.log"

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / self.domain / user

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"postfix {' '.join(args)}: {result.stdout}{result.stderr}\n{self.log_text()[-3000:]}")
        return result

    def configure(self) -> None:
        ensure_postfix_installed()
        if self.etc.exists():
            self.postfix("stop", check=False)        # a leftover from an interrupted run
        shutil.rmtree(self.root, ignore_errors=True)
        for sub in ("etc", "spool", "data", "log", "mail"):
            (self.root / sub).mkdir(parents=True)
        self.root.chmod(0o755)
        shutil.chown(self.root / "data", "postfix")
        for user in self.users:                      # virtual(8) delivers as nobody into mail/<domain>/<user>/
            self.maildir(user).parent.mkdir(parents=True, exist_ok=True)
        for path in (self.root / "mail", self.root / "mail" / self.domain):
            shutil.chown(path, "nobody", "nogroup")
        tls_dir = self.etc / "tls"
        tls_dir.mkdir()
        shutil.copy(self.cert_chain, tls_dir / "chain.pem")
        shutil.copy(self.key, tls_dir / "key.pem")
        shutil.copy(self.ca_file, tls_dir / "ca.pem")
        (tls_dir / "key.pem").chmod(0o600)

        (self.etc / "vmailbox").write_text("".join(f"{u}@{self.domain} {self.domain}/{u}/\n" for u in self.users))
        (self.etc / "transport").write_text(
            "".join(f"{domain} smtp:[{ip}]:{self.relay_port}\n" for domain, (ip, _) in self.routes.items()))
        (self.etc / "tls_policy").write_text(
            "".join(f"[{ip}]:{self.relay_port} secure match={mx}\n" for _, (ip, mx) in self.routes.items()))
        main = f"""# Postfix as a third MSSanté operator (written by tests/interop/postfix.py).
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {self.root}/spool
data_directory = {self.root}/data
multi_instance_name = postfix-interop
maillog_file = {self.log_file}
myhostname = {self.mx}
mydomain = {self.domain}
myorigin = $mydomain
# 127.0.0.5 is not an interface address (lo has 127.0.0.1/8): listeners bind to it in master.cf
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_transport = error:local delivery disabled
alias_maps =
alias_database =
relay_domains =
relayhost =
smtp_dns_support_level = disabled
default_transport = error:no route to this domain outside the trust space
transport_maps = texthash:{self.etc}/transport
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.root}/mail
virtual_mailbox_maps = texthash:{self.etc}/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
smtpd_banner = $myhostname ESMTP
biff = no
append_dot_mydomain = no
# the relay door: TLS, a verified client certificate, mail for our domain only
smtpd_relay_restrictions = reject_unauth_destination
smtpd_tls_security_level = encrypt
smtpd_tls_ask_ccert = yes
smtpd_tls_req_ccert = yes
smtpd_tls_chain_files = {tls_dir}/key.pem, {tls_dir}/chain.pem
smtpd_tls_CAfile = {tls_dir}/ca.pem
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
# the client side: verified TLS to the peer's MX name, our certificate presented
smtp_tls_security_level = secure
smtp_tls_policy_maps = texthash:{self.etc}/tls_policy
smtp_tls_chain_files = {tls_dir}/key.pem, {tls_dir}/chain.pem
smtp_tls_CAfile = {tls_dir}/ca.pem
smtp_tls_mandatory_protocols = >=TLSv1.2
smtp_tls_protocols = >=TLSv1.2
smtp_tls_loglevel = 1
"""
        (self.etc / "main.cf").write_text(main)
        stock = Path("/usr/share/postfix/master.cf.dist").read_text()
        stock_smtp = "smtp      inet  n       -       y       -       -       smtpd"
        assert stock_smtp in stock, "unexpected master.cf.dist"
        relay = f"{self.address}:{self.relay_port} inet n - n - - smtpd"
        submission = (f"{self.address}:{self.submission_port} inet n - n - - smtpd\n"
                      "  -o smtpd_tls_security_level=may\n  -o smtpd_tls_req_ccert=no\n  -o smtpd_tls_ask_ccert=no\n"
                      "  -o smtpd_relay_restrictions=permit_mynetworks,reject\n")
        (self.etc / "master.cf").write_text(stock.replace(stock_smtp, relay + "\n" + submission.rstrip("\n")))
        subprocess.run(["postconf", "-c", str(self.etc), "-F", "*/*/chroot = n"], check=True)
        _allow_config_dir(self.etc)
        self.postfix("set-permissions", check=False)
        self.postfix("check")

    def start(self, timeout: float = 60.0) -> None:
        self.postfix("start")
        import socket
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.address, self.relay_port), timeout=2) as sock:
                    if sock.recv(100).startswith(b"220"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Postfix not answering on {self.address}:{self.relay_port}\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.etc.exists():
            self.postfix("stop", check=False)

    def delivered(self, user: str) -> list[bytes]:
        new = self.maildir(user) / "new"
        return [path.read_bytes() for path in sorted(new.iterdir())] if new.is_dir() else []

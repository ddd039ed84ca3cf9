"""A PostgreSQL cluster set up as docs/DEPLOYMENT.md says: deploy/postgresql/gateway.conf included, the pg_hba.conf
lines of deploy/postgresql/pg_hba.conf (the nodes' network being loopback here), TLS with a certificate from a
throwaway CA, and deploy/postgresql/create-role.sql run as the superuser. The gateway connects as the role
``gateway`` over TLS (PGSSLMODE=verify-full, PGSSLROOTCERT), as gateway.env.example shows.

Used by tests/ops/test_postgresql_deployment.py and by bench/capacity.py (durability on: fsync and
synchronous_commit as in production, unlike tests/pg.py's cluster, which turns them off for speed).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.pg import _pg_bindir, free_port

DEPLOY_PG = Path(__file__).resolve().parents[2] / "deploy" / "postgresql"
GATEWAY_PASSWORD = "Deploy-Test-Password-7319"
# What the test changes in the shipped files, and only that: loopback for the nodes' network, trust for the local
# superuser (the tests may not run as the postgres OS user), a smaller shared_buffers on a shared test machine.
NODES_NETWORK = "127.0.0.1/32"
TEST_OVERRIDES = {"shared_buffers": "256MB", "effective_cache_size": "1GB", "max_wal_size": "1GB",
                  "min_wal_size": "256MB", "wal_keep_size": "0"}


def _certificate(name: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
                 signer: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1: (ca.crt, server.crt, server.key)."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deploy test database CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    ca = _certificate(ca_name, ca_name, ca_key, ca_key, ca=True)
    server = _certificate(server_name, ca_name, server_key, ca_key, ca=False)
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)   # PostgreSQL refuses a key others can read
    return paths


def hba_lines() -> str:
    """deploy/postgresql/pg_hba.conf with the nodes' network and the local superuser method of this test."""
    shipped = (DEPLOY_PG / "pg_hba.conf").read_text()
    assert "10.0.0.0/24" in shipped, "the shipped pg_hba.conf names the nodes' network this test replaces"
    lines = shipped.replace("10.0.0.0/24", NODES_NETWORK)
    return lines.replace("local      all                     postgres                 peer",
                         "local      all                     postgres                 trust")


@dataclass
class DeployedPostgres:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gw-pgdeploy-")))
    port: int = field(default_factory=free_port)
    as_user: list[str] = field(default_factory=list)
    ca_file: Path | None = None

    @property
    def bindir(self) -> Path:
        found = _pg_bindir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/install-deps.sh installs it)")
        return found

    def _run(self, *command: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.as_user + list(command), capture_output=True, text=True, check=True, input=input)

    def start(self, overrides: dict[str, str] | None = None) -> None:
        data, sockets, tls = self.workdir / "data", self.workdir / "sock", self.workdir / "tls"
        sockets.mkdir()
        tls.mkdir()
        self.ca_file, server_crt, server_key = write_tls(tls)
        if os.geteuid() == 0:   # PostgreSQL refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            for path in (self.workdir, sockets, tls, server_crt, server_key):
                shutil.chown(path, "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--data-checksums")
        shutil.copyfile(DEPLOY_PG / "gateway.conf", data / "gateway.conf")
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\ninclude 'gateway.conf'\n")
        (data / "pg_hba.conf").write_text(hba_lines())
        if self.as_user:
            shutil.chown(data / "gateway.conf", "postgres")
            shutil.chown(data / "pg_hba.conf", "postgres")
        settings = {"port": str(self.port), "listen_addresses": "127.0.0.1", "unix_socket_directories": str(sockets),
                    "ssl_cert_file": str(server_crt), "ssl_key_file": str(server_key), **TEST_OVERRIDES,
                    **(overrides or {})}
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.workdir / "log"),
                  "-w", "start")
        self.psql("-v", f"gateway_password='{GATEWAY_PASSWORD}'", "-f", "-",
                  input=(DEPLOY_PG / "create-role.sql").read_text())   # on stdin: the postgres user need not read it

    def psql(self, *arguments: str, database: str = "postgres", input: str | None = None) -> str:
        return self._run(str(self.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(self.workdir / "sock"),
                         "-p", str(self.port), "-U", "postgres", "-d", database, "-qAt", *arguments,
                         input=input).stdout

    def gateway_url(self, database: str = "gateway") -> str:
        return f"postgresql+asyncpg://gateway:{GATEWAY_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def gateway_env(self, database: str = "gateway") -> dict[str, str]:
        """What /etc/gateway/gateway.env holds for this database: URL, and TLS verified against its CA."""
        assert self.ca_file is not None
        return {"GATEWAY_DATABASE_URL": self.gateway_url(database), "PGSSLMODE": "verify-full",
                "PGSSLROOTCERT": str(self.ca_file)}

    def stop(self) -> None:
        subprocess.run(self.as_user + [str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "data"), "-m", "fast",
                                       "stop"], capture_output=True, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

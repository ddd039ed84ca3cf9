"""A throwaway PostgreSQL cluster for the test run.

Uses ``GATEWAY_TEST_PG_URL`` (an asyncpg URL to a server where the user may
CREATE DATABASE) when set; otherwise runs ``initdb`` + ``pg_ctl`` from the
Debian postgresql package in a temporary directory, on a free loopback port,
as the ``postgres`` system user when the tests run as root (PostgreSQL refuses
to run as root). Each test gets a fresh database in that cluster.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@dataclass
class PgCluster:
    base_url: str  # postgresql+asyncpg://user@host:port  (no database)
    _stop: list[str] | None = None
    _workdir: Path | None = None

    async def create_database(self) -> str:
        name = f"gw_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.base_url.replace("postgresql+asyncpg", "postgresql") + "/postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"{self.base_url}/{name}"

    async def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.base_url.replace("postgresql+asyncpg", "postgresql") + "/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self._stop:
            subprocess.run(self._stop, check=False, capture_output=True)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)


def start_cluster() -> PgCluster:
    url = os.environ.get("GATEWAY_TEST_PG_URL")
    if url:
        return PgCluster(base_url=url.rstrip("/").rsplit("/", 1)[0] if url.count("/") > 2 else url)
    bindir = _pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: run ./scripts/test.sh (it installs the postgresql package) or set GATEWAY_TEST_PG_URL")
    workdir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
    datadir, sockdir = workdir / "data", workdir / "sock"
    sockdir.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sockdir, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    port = free_port()
    options = f"-h 127.0.0.1 -p {port} -k {sockdir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(datadir), "-o", options, "-l", str(workdir / "log"), "-w", "start"],
                   check=True, capture_output=True)
    stop = as_user + [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"]
    return PgCluster(base_url=f"postgresql+asyncpg://postgres@127.0.0.1:{port}", _stop=stop, _workdir=workdir)

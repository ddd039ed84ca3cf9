"""deploy/postgresql/: a cluster started with gateway.conf, the pg_hba.conf lines and create-role.sql (through
tests/ops/pg_deployment.py) serves the gateway as a role that is no superuser: ``gateway init`` migrates the schema
and seeds the directory over TLS, ``gateway serve`` delivers a message, ``gateway backup create`` (pg_dump) and
``gateway backup restore`` (pg_restore into another database the role owns) work with the role's privileges alone;
durability settings are the ones a 250 relies on; a connection without TLS, or as another role, is refused."""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import asyncpg
import pytest

from gateway.storage.db import head_revision
from tests.harness import GatewayProcess, read_inbox, run_cli, wait_until
from tests.ops.pg_deployment import GATEWAY_PASSWORD, DeployedPostgres
from tests.pg import _pg_bindir

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(_pg_bindir() is None, reason="PostgreSQL is not installed")]


@pytest.fixture(scope="module")
def deployed() -> Iterator[DeployedPostgres]:
    cluster = DeployedPostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _connect(cluster: DeployedPostgres, **options: object) -> asyncpg.Connection:
    assert cluster.ca_file is not None
    context = ssl.create_default_context(cafile=str(cluster.ca_file))
    arguments: dict[str, object] = {"host": "127.0.0.1", "port": cluster.port, "user": "gateway",
                                    "password": GATEWAY_PASSWORD, "database": "gateway", "ssl": context}
    arguments.update(options)
    return asyncio.run(asyncpg.connect(**arguments))  # type: ignore[arg-type]


def _fetch(cluster: DeployedPostgres, query: str) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        assert cluster.ca_file is not None
        connection = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="gateway",
                                           password=GATEWAY_PASSWORD, database="gateway",
                                           ssl=ssl.create_default_context(cafile=str(cluster.ca_file)))
        try:
            return list(await connection.fetch(query))
        finally:
            await connection.close()
    return asyncio.run(go())


def test_durability_and_the_role_without_privileges(deployed: DeployedPostgres) -> None:
    (row,) = _fetch(deployed, "SELECT current_setting('synchronous_commit') AS sync, current_setting('fsync') AS fsync,"
                              " current_setting('full_page_writes') AS fpw, current_setting('wal_level') AS wal,"
                              " (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) AS tls,"
                              " rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
                              " FROM pg_roles WHERE rolname = current_user")
    assert (row["sync"], row["fsync"], row["fpw"], row["wal"], row["tls"]) == ("on", "on", "on", "replica", True)
    assert not any(row[name] for name in ("rolsuper", "rolcreatedb", "rolcreaterole", "rolreplication",
                                          "rolbypassrls"))
    assert int(deployed.psql("-c", "SHOW max_connections")) >= 4 * (10 + 10 + 2)   # 4 nodes: pool + overflow + 2


def test_no_tls_or_another_role_is_refused(deployed: DeployedPostgres) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption|reject"):
        _connect(deployed, ssl=False)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        _connect(deployed, user="postgres", password="")
    with pytest.raises(asyncpg.InvalidPasswordError):
        _connect(deployed, password="not-the-password")


def test_init_serve_backup_and_restore_as_the_gateway_role(deployed: DeployedPostgres, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw", extra_env=deployed.gateway_env())
    gateway.start()
    try:
        current = gateway.cli("db", "current", check=True).stdout
        assert f"database: {head_revision()};" in current, current
        tables = {row["tablename"] for row in _fetch(deployed, "SELECT tablename FROM pg_tables "
                                                               "WHERE tableowner = 'gateway'")}
        assert {"mailboxes", "audit_entries", "queue_messages"} <= tables, tables

        sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
        context = ssl.create_default_context(cafile=gateway.ca_file)
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = sender["address"], recipient["address"], "on postgres"
        message.set_content("Delivered through a PostgreSQL the gateway reaches as a plain role over TLS.")
        with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=60) as smtp:
            smtp.starttls(context=context)
            smtp.login(sender["address"], sender["password"])
            smtp.send_message(message)

        def delivered() -> bool | None:
            with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=context, timeout=60) as imap:
                return True if any(m["Subject"] == "on postgres" for m in read_inbox(imap, recipient)) else None
        wait_until(delivered, timeout=120, what="the message read back over IMAPS", interval=0.5)

        backup = tmp_path / "backup"
        created = gateway.cli("backup", "create", str(backup))
        assert created.returncode == 0, created.stdout + created.stderr
    finally:
        gateway.stop()

    # The superuser creates the empty database, as create-role.sql does; the restore itself runs as the role.
    deployed.psql("-c", "CREATE DATABASE gateway_drill OWNER gateway TEMPLATE template0")
    deployed.psql("-c", "REVOKE ALL ON SCHEMA public FROM PUBLIC", "-c", "ALTER SCHEMA public OWNER TO gateway",
                  database="gateway_drill")
    restored = GatewayProcess(tmp_path / "restored", ports=dict(gateway.ports),
                              extra_env=deployed.gateway_env("gateway_drill"))
    result = run_cli("backup", "restore", str(backup), "--keys", str(gateway.data_dir / "keys"),
                     data_dir=restored.data_dir, env=restored.env)
    assert result.returncode == 0, result.stdout + result.stderr
    audit = run_cli("audit", "verify", data_dir=restored.data_dir, env=restored.env)
    assert audit.returncode == 0, audit.stdout + audit.stderr

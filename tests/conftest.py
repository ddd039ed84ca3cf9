"""Shared fixtures: settings in a temporary data directory, and a migrated
database on SQLite and on PostgreSQL (the same tests run on both)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from gateway.app import Services, open_services
from gateway.config import Settings, load_settings
from gateway.storage.db import Database
from tests.harness import GatewayProcess
from tests.pg import PgCluster, start_cluster

# CI runs property tests derandomized: the same examples every run, so a red build is
# reproducible and a green one stays green; developers' runs keep exploring new examples.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", environ={})


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A freshly migrated database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
        await db.migrate()
        yield db
        await db.dispose()
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    url = await cluster.create_database()
    db = Database(url)
    await db.migrate()
    yield db
    await db.dispose()
    await cluster.drop_database(url)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A real ``gateway serve`` with the demo directory, on free loopback ports (one per test)."""
    process = GatewayProcess(tmp_path / "gateway")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Like ``gateway`` but shared by the tests of one module (for read-mostly tests)."""
    process = GatewayProcess(tmp_path_factory.mktemp("gateway") / "data")
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def services(served: GatewayProcess) -> AsyncIterator[Services]:
    """The services of the module's running gateway (its ``served`` fixture), opened beside it on its data
    directory, as the CLI and the webmail open them."""
    opened_settings = load_settings(data_dir=served.data_dir, environ=served.env)
    async with open_services(opened_settings, migrate=False) as opened:
        yield opened

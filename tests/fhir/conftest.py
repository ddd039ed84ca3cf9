"""Fixtures of the FHIR API tests: a record filed from the CI-SIS samples, served over HTTPS on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage.db import Database
from tests.dmp_bridge.filing_world import SAMPLES
from tests.fhir.world import FhirWorld, running_fhir


@pytest.fixture
async def fhir(database: Database, tmp_path: Path) -> AsyncIterator[FhirWorld]:
    if not SAMPLES.is_dir():
        pytest.skip(f"sample documents not found in {SAMPLES}")
    async with running_fhir(database, tmp_path) as world:
        yield world

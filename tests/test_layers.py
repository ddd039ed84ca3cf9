"""The folders show the design: lower floors import only downwards (every import, function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"
BELOW_THE_FRONT_ENDS = ("queue", "pipeline", "security", "mailstore", "storage", "directory", "dmp_bridge", "mail")


def imports_of(package: str) -> dict[str, set[str]]:
    """Every ``gateway.*`` module imported by each file of ``gateway/<package>``."""
    found: dict[str, set[str]] = {}
    for path in sorted((GATEWAY / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(GATEWAY.parent))] = {name for name in names if name.startswith("gateway")}
    return found


def importing(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{path}: {name}" for path, names in imports_of(package).items() for name in names
                  if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden))


@pytest.mark.parametrize("package", BELOW_THE_FRONT_ENDS)
def test_no_lower_layer_imports_the_smtp_server(package: str) -> None:
    assert importing(package, ("gateway.smtp",)) == []


def test_the_queue_does_not_import_the_pipeline_that_feeds_it() -> None:
    assert importing("queue", ("gateway.pipeline",)) == []


def test_storage_imports_no_area_table() -> None:
    areas = ("gateway.queue", "gateway.pipeline", "gateway.mailstore", "gateway.audit", "gateway.dmp_bridge",
             "gateway.webmail", "gateway.smtp", "gateway.imap", "gateway.app", "gateway.schema")
    assert importing("storage", areas) == []


def test_security_does_not_import_the_record() -> None:
    """Crypto-shredding joins keys and patients in gateway.retention, above both."""
    assert importing("security", ("gateway.dmp_bridge",)) == []

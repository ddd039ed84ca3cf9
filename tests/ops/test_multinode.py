"""Several gateway nodes on one PostgreSQL database (issue 13): roles split with ``gateway serve --only``,
work claimed with row locks, one spool and one blob store shared by the nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import GatewayProcess, run_cli


def test_serve_only_names_the_unknown_role(tmp_path: Path) -> None:
    result = run_cli("serve", "--only", "smtp,pop3", data_dir=tmp_path / "data")
    assert result.returncode != 0
    assert "'pop3'" in result.stderr and "--only" in result.stderr
    assert "smtp, imap, https, workers" in result.stderr


def test_serve_only_refuses_an_empty_list(tmp_path: Path) -> None:
    result = run_cli("serve", "--only", ",", data_dir=tmp_path / "data")
    assert result.returncode != 0 and "--only" in result.stderr


@pytest.mark.slow
def test_serve_only_imap_opens_imap_and_runs_no_worker(tmp_path: Path) -> None:
    node = GatewayProcess(tmp_path / "data", serve_args=["--only", "imap"])
    node.start()
    try:
        ready = json.loads((node.data_dir / "run" / "ready.json").read_text())
        assert set(ready["listeners"]) == {"imap", "imaps"}
        assert ready["workers"] == {}
    finally:
        node.stop()

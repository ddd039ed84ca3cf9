"""scripts/venv.sh (used by demo.sh and test.sh): installs once, quietly, and starts at once afterwards.

Run in a copy of the repository's scripts with a stand-in .venv/bin/python that records each pip
call (no network, no real install), so what is checked is the script's own logic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/../calls"
echo "SetuptoolsDeprecationWarning: pages of it"
exit "${FAKE_PIP_EXIT:-0}"
"""


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "venv.sh", root / "scripts" / "venv.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def _venv(root: Path, mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(root / "scripts" / "venv.sh"), mode], capture_output=True, text=True,
                          env=os.environ | env, timeout=60)


def _calls(root: Path) -> list[str]:
    path = root / ".venv" / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_installs_once_quietly_then_starts_at_once(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    first = _venv(root, "run")
    assert first.returncode == 0, first.stderr
    assert [c for c in _calls(root) if "-e" in c] == ["-m pip install -q --no-warn-script-location -e ."]
    assert first.stdout == "" and "setuptools" not in first.stderr.lower()  # pip's output went to the log
    assert first.stderr.count("\n") == 1 and "install.log" in first.stderr
    assert "SetuptoolsDeprecationWarning" in (root / ".venv" / "install.log").read_text()

    calls = len(_calls(root))
    second = _venv(root, "run")
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert len(_calls(root)) == calls  # nothing installed again

    assert _venv(root, "test").returncode == 0  # the test extras are another install...
    assert _calls(root)[-1].endswith("-e .[test]")
    calls = len(_calls(root))
    assert _venv(root, "run").stderr == "" and len(_calls(root)) == calls  # ...which a run needs nothing more than

    with (root / "pyproject.toml").open("a") as stream:
        stream.write("\n# a dependency changed\n")
    assert _venv(root, "run").returncode == 0 and len(_calls(root)) > calls  # a new pyproject installs again


def test_a_failed_install_shows_its_log_and_is_tried_again(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    failed = _venv(root, "run", FAKE_PIP_EXIT="1")
    assert failed.returncode == 1
    assert "SetuptoolsDeprecationWarning" in failed.stderr and "the install failed" in failed.stderr
    assert not list((root / ".venv").glob(".installed-*"))
    assert _venv(root, "run").returncode == 0 and list((root / ".venv").glob(".installed-run-*"))


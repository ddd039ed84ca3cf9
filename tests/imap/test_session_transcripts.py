"""The transcripts of tests/imap/scripts, each against the real server with a fresh account."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.imap.imap_server import HOST, STORES, RunningImap, imap  # noqa: F401 (fixture)
from tests.imap.transcript import all_scripts, load, run_script

pytestmark = STORES     # every transcript against SqlMailStore and MemoryMailStore


@pytest.mark.parametrize("path", all_scripts(), ids=lambda path: path.stem)
def test_transcript(imap: RunningImap, path: Path) -> None:  # noqa: F811
    script = load(path)
    delegate = imap.account("ORG").address
    account = imap.new_account(delegated_from=delegate)
    variables = {"user": account.address, "password": account.password, "delegate": delegate,
                 "other": imap.account("PER", 1).address,
                 "plain": base64.b64encode(f"\0{account.address}\0{account.password}".encode()).decode()}
    port = imap.starttls_port if script.plain else imap.imaps_port
    run_script(script, HOST, port, imap.client_context(), variables, tls_port=imap.imaps_port)

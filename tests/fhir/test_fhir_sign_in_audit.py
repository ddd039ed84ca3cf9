"""FHIR sign-in failures are audited once, by the sign-in limiter, through a running ``gateway serve``.

A wrong password is the limiter's ``authentication_failed`` entry and no
``access_refused`` beside it; retries while throttled (429) add one limiter
entry per waiting period, not one boundary entry per request. A request with no
credentials at all is still the boundary's ``access_refused`` (unauthenticated).
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any

from tests.harness import GatewayProcess
from tests.security.test_auth_doors import fhir_get

GUESSER = "127.0.0.41"
ANONYMOUS = "127.0.0.42"


def audited(gateway: GatewayProcess, source: str) -> list[tuple[str, str]]:
    listed = gateway.cli("audit", "list", "--json", "--limit", "1000", check=True)
    entries: list[dict[str, Any]] = json.loads(listed.stdout)
    return [(e["event_name"], e["outcome"]["reason"]) for e in reversed(entries)
            if e["source"]["ip"] == source and e["source"]["door"] == "fhir"]


def test_wrong_passwords_and_throttled_retries_are_the_limiters_entries_only(shared_gateway: GatewayProcess) -> None:
    doctor = shared_gateway.account("PER")
    statuses = [fhir_get(shared_gateway, GUESSER, doctor["address"], f"wrong-{attempt}")[0] for attempt in range(12)]
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    entries = audited(shared_gateway, GUESSER)
    failures = statuses.count(401)
    assert entries[:failures] == [("authentication_failed", "wrong credentials")] * failures, entries
    assert all(event == "authentication_failed" for event, _reason in entries), entries
    assert len(entries) < len(statuses), "throttled retries are folded by the limiter, not written one by one"


def test_no_credentials_is_still_the_boundarys_entry(shared_gateway: GatewayProcess) -> None:
    context = ssl.create_default_context(cafile=shared_gateway.ca_file)
    context.check_hostname = False      # 127.0.0.1; the chain is still verified
    connection = http.client.HTTPSConnection("127.0.0.1", shared_gateway.ports["http_port"], context=context,
                                             source_address=(ANONYMOUS, 0), timeout=30)
    try:
        connection.request("GET", "/fhir/DocumentReference?patient=unknown")
        assert connection.getresponse().status == 401
    finally:
        connection.close()
    assert audited(shared_gateway, ANONYMOUS) == [("access_refused", "unauthenticated")]

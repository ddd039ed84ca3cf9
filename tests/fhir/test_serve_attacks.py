"""The FHIR API of a running ``gateway serve``, from the attacker's side, over its HTTPS listener.

A document mailed with a hostile declared type, malformed ids, headers and
bodies, bodies too large or too deep, bad search parameters, unsupported
methods, then a hypothesis fuzz of paths, parameters, headers and bodies: no
answer is a 500, every error is an OperationOutcome, and every request leaves
its entry in the audit log (read straight from the gateway's database). Then
emergency access: refused to a profession the configuration does not name,
and refused to a physician when the patient refused it.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import smtplib
import sqlite3
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.app import Services
from gateway.audit.chain import Actor, Door, Source
from gateway.audit.events import AuditEvent
from gateway.directory.identifiers import add_nir_key
from gateway.dmp_bridge.patient_choices import PatientChoicesService
from tests.dmp_bridge.filing_world import SAMPLES, TEST_INS, message_with, sample
from tests.harness import GatewayProcess, run_cli

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
PATIENCE = 60.0  # seconds before a wait gives up (a bound on a hang, not a timing assertion)
PATIENT_QUERY = f"urn:oid:1.2.250.1.213.1.4.10|{TEST_INS}"
EMERGENCY = "X-Emergency-Access-Reason"
FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("fhir-attacks") / "data",
                             extra_env={"GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"})
    process.start()
    yield process
    process.stop()


# --------------------------------------------------------------------------- helpers


def client(served: GatewayProcess, who: str | None = "PER", index: int = 0) -> httpx.Client:
    """A real HTTPS client of the FHIR API: Basic with the demo account ``who``, or anonymous."""
    auth = None
    if who is not None:
        account = served.account(who, index)
        auth = (account["address"], account["password"])
    return httpx.Client(base_url=f"https://localhost:{served.ports['http_port']}/fhir", auth=auth, timeout=60,
                        verify=ssl.create_default_context(cafile=served.ca_file))


def professional(served: GatewayProcess, surname: str) -> dict[str, Any]:
    return next(a for a in served.demo["accounts"] if a["type"] == "PER" and surname in a["address"])


def as_professional(served: GatewayProcess, surname: str) -> httpx.Client:
    account = professional(served, surname)
    return httpx.Client(base_url=f"https://localhost:{served.ports['http_port']}/fhir",
                        auth=(account["address"], account["password"]), timeout=60,
                        verify=ssl.create_default_context(cafile=served.ca_file))


@dataclass(frozen=True)
class Entry:
    seq: int
    event: int
    actor: str
    outcome: str
    reason: str | None
    door: str
    subject: str | None
    details: dict[str, Any]


class AuditTail:
    """The gateway's audit log read straight from its SQLite file (read-only, beside the running gateway)."""

    def __init__(self, served: GatewayProcess) -> None:
        self.path = served.data_dir / "gateway.db"

    def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30) as connection:
            return connection.execute(sql, args).fetchall()

    def head(self) -> int:
        return int(self._rows("SELECT coalesce(max(seq), 0) FROM audit_entries")[0][0])

    def fhir_since(self, seq: int) -> list[Entry]:
        rows = self._rows("SELECT seq, event, actor_id, outcome, reason, door, subject_id, details FROM audit_entries "
                          "WHERE seq > ? AND door = 'fhir' ORDER BY seq", seq)
        return [Entry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows]


def outcome_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith(FHIR_JSON), response.text
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body


def submit(served: GatewayProcess, raw_message: Any, recipient: str) -> None:
    lab = served.account("APP")
    with smtplib.SMTP("127.0.0.1", served.ports["smtp_submission_port"], local_hostname="labo.test", timeout=30) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=served.ca_file))
        smtp.login(lab["address"], lab["password"])
        smtp.send_message(raw_message, from_addr=lab["address"], to_addrs=[recipient])


def filed(served: GatewayProcess, unique_id: str) -> tuple[int, str]:
    """(FHIR id, stored MIME type) of a document once the gateway's own worker has filed it."""
    deadline = time.monotonic() + PATIENCE
    while True:
        with sqlite3.connect(f"file:{served.data_dir / 'gateway.db'}?mode=ro", uri=True, timeout=30) as connection:
            row = connection.execute("SELECT id, mime_type FROM record_documents WHERE unique_id = ?",
                                     (unique_id,)).fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        assert time.monotonic() < deadline, f"{unique_id} was not filed"
        time.sleep(0.2)


def hostile_cda() -> tuple[bytes, str]:
    """The vaccination note with its own id, a script in its narrative block."""
    number = int(secrets.token_hex(6), 16)
    cda = sample("VAC-NOTE_2023.01.xml")
    cda = cda.replace(b'<id root="1.2.250.1.213.1.1.1.46.2023.1.1"/>', f'<id root="1.2.250.1.999.{number}.1"/>'.encode())
    cda = cda.replace(b'<setId root="1.2.250.1.213.1.1.1.46.2023.1"/>', f'<setId root="1.2.250.1.999.{number}"/>'.encode())
    script = b'<text><paragraph><script xmlns="http://www.w3.org/1999/xhtml">alert(document.cookie)</script></paragraph>'
    cda = cda.replace(b"<text>", script, 1)
    return cda, f"1.2.250.1.999.{number}.1"


@pytest.fixture(scope="module")
def document_id(served: GatewayProcess) -> str:
    """The FHIR id of a document in the demo patient's record (filed over SMTP)."""
    cda, unique_id = hostile_cda()
    patient = served.account("PAT")
    submit(served, message_with(("note.xml", cda, "text/html"), sender=served.account("APP")["address"],
                                to=patient["address"], subject="XDM/1.0/DDM+Note PAT-TROIS DOMINIQUE 28/03/1979"),
           patient["address"])
    return str(filed(served, unique_id)[0])


# --------------------------------------------------------------------------- item 5: Binary served safely


def test_a_document_declared_html_with_a_script_is_served_as_the_filing_decided(served: GatewayProcess,
                                                                                 document_id: str) -> None:
    with client(served) as doctor:
        content = doctor.get(f"/Binary/{document_id}")
        reference = doctor.get(f"/DocumentReference/{document_id}")
    assert content.status_code == 200, content.text
    assert b"<script" in content.content  # the bytes as filed...
    assert content.headers["Content-Type"].split(";")[0] == "text/xml"  # ...never as the text/html declared
    assert content.headers["X-Content-Type-Options"] == "nosniff"
    assert content.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert content.headers["Content-Disposition"].startswith("attachment")
    assert reference.json()["content"][0]["attachment"]["contentType"] == "text/xml"


# --------------------------------------------------------------------------- item 12: bad input, always audited


def test_a_nul_in_the_binary_id_is_400_and_audited(served: GatewayProcess) -> None:
    audit = AuditTail(served)
    before = audit.head()
    with client(served) as doctor:
        response = doctor.get("/Binary/2%00")
    assert response.status_code == 400
    assert outcome_of(response)["issue"][0]["code"] == "invalid"
    [entry] = audit.fhir_since(before)
    assert (entry.outcome, entry.reason, entry.details["status"]) == ("refused", "bad-request", 400)
    assert entry.actor == professional(served, "medecin")["owner"]


@pytest.mark.parametrize("reason", [b"\xff\xfe urgence", b"urgence %FF%FE", b"urgence %00 vitale", b"%0A%0D"])
def test_an_emergency_reason_that_is_not_utf8_text_is_400_and_audited(served: GatewayProcess, document_id: str,
                                                                      reason: bytes) -> None:
    audit = AuditTail(served)
    before = audit.head()
    with client(served) as doctor:
        response = doctor.get(f"/DocumentReference/{document_id}", headers={EMERGENCY.encode(): reason})
    assert response.status_code == 400, response.text
    assert EMERGENCY in outcome_of(response)["issue"][0]["diagnostics"]
    [entry] = audit.fhir_since(before)
    assert (entry.outcome, entry.reason) == ("refused", "bad-request")


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
def test_a_json_body_nested_100000_deep_is_400_and_audited(served: GatewayProcess, document_id: str,
                                                           method: str) -> None:
    audit = AuditTail(served)
    before = audit.head()
    body = b"[" * 100_000 + b"]" * 100_000
    with client(served) as doctor:
        response = doctor.request(method, f"/DocumentReference/{document_id}", content=body,
                                  headers={"Content-Type": "application/json-patch+json" if method == "PATCH"
                                           else FHIR_JSON})
    assert response.status_code == 400, response.text
    assert "deep" in outcome_of(response)["issue"][0]["diagnostics"]
    assert [(e.outcome, e.reason) for e in audit.fhir_since(before)] == [("refused", "bad-request")]
    with client(served) as doctor:
        assert doctor.get(f"/DocumentReference/{document_id}").status_code == 200  # still serving


def test_oversized_bodies_are_refused_and_audited(served: GatewayProcess, document_id: str) -> None:
    audit = AuditTail(served)
    before = audit.head()
    big = b'{"resourceType": "DocumentReference", "x": "' + b"a" * (1024 * 1024) + b'"}'

    def chunks() -> Iterator[bytes]:
        yield big  # no Content-Length: the size is only known while reading

    with client(served) as doctor:
        declared = doctor.put(f"/DocumentReference/{document_id}", content=big)
        streamed = doctor.put(f"/DocumentReference/{document_id}", content=chunks())
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert outcome_of(response)["issue"][0]["code"] == "too-costly"
    assert [(e.reason, e.details["status"]) for e in audit.fhir_since(before)] == [("body-too-large", 413)] * 2


@pytest.mark.parametrize("params", [
    {"patient.identifier": PATIENT_QUERY, "_count": "abc"},
    {"patient.identifier": PATIENT_QUERY, "_count": "-1"},
    {"patient.identifier": PATIENT_QUERY, "date": "yesterday"},
    {"patient.identifier": PATIENT_QUERY + "\x00"},
    {"patient.identifier": "urn:oid:1.2.250.1.213.1.4.10|\udcff"},
    {"patient.identifier": PATIENT_QUERY, "type": "\x00|\x01"},
    {"patient.identifier": PATIENT_QUERY, "status": "current\x00"},
    {},
])
def test_bad_search_parameters_are_400_and_audited(served: GatewayProcess, params: dict[str, str]) -> None:
    audit = AuditTail(served)
    before = audit.head()
    query = urllib.parse.urlencode(params, errors="surrogateescape")
    with client(served) as doctor:
        response = doctor.get(f"/DocumentReference?{query}")
    assert response.status_code == 400, response.text
    assert outcome_of(response)["issue"][0]["code"] in ("invalid", "required")
    assert [(e.outcome, e.details["status"]) for e in audit.fhir_since(before)] == [("refused", 400)]


@pytest.mark.parametrize(("method", "path", "status", "reason"), [
    ("DELETE", "/DocumentReference/1", 405, "method-not-allowed"),
    ("POST", "/Binary/1", 405, "method-not-allowed"),
    ("GET", "/Patient", 404, "not-found"),
    ("GET", "/DocumentReference/999999999", 404, "not-found"),
])
def test_unsupported_methods_and_unknown_paths_are_audited(served: GatewayProcess, method: str, path: str,
                                                           status: int, reason: str) -> None:
    audit = AuditTail(served)
    before = audit.head()
    with client(served) as doctor:
        response = doctor.request(method, path)
    assert response.status_code == status
    outcome_of(response)
    assert [(e.outcome, e.reason) for e in audit.fhir_since(before)] == [("refused", reason)]


def damage_blob(served: GatewayProcess, blob_id: str) -> None:
    """Flip one octet in the middle of a blob's ciphertext, where it is: its row (an inline blob, as a small
    filed document is) or its file."""
    if blob_id.startswith("i"):
        with sqlite3.connect(served.data_dir / "gateway.db", timeout=30) as connection:
            [sealed] = connection.execute("SELECT sealed FROM inline_blobs WHERE blob_id = ?", (blob_id,)).fetchone()
            stored = bytearray(sealed)
            stored[len(stored) // 2] ^= 0xFF
            connection.execute("UPDATE inline_blobs SET sealed = ? WHERE blob_id = ?", (bytes(stored), blob_id))
        return
    blob = served.data_dir / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id
    stored = bytearray(blob.read_bytes())
    stored[len(stored) // 2] ^= 0xFF
    blob.write_bytes(bytes(stored))


def test_a_server_error_is_audited_as_an_error_not_a_refusal(served: GatewayProcess) -> None:
    """A real failure inside the server (the document's encrypted blob damaged on disk: AES-GCM refuses it):
    a 500 OperationOutcome that tells nothing of the internals, and one ``command_failed`` entry whose outcome
    is ``error``, so an auditor tells it from the refusals (``refused``); the chain still verifies."""
    cda, unique_id = hostile_cda()
    patient = served.account("PAT")
    submit(served, message_with(("note.xml", cda, "text/xml"), sender=served.account("APP")["address"],
                                to=patient["address"], subject="XDM/1.0/DDM+Note PAT-TROIS DOMINIQUE 28/03/1979"),
           patient["address"])
    damaged_id = filed(served, unique_id)[0]
    with sqlite3.connect(f"file:{served.data_dir / 'gateway.db'}?mode=ro", uri=True) as connection:
        [blob_id] = connection.execute("SELECT blob_id FROM record_documents WHERE id = ?", (damaged_id,)).fetchone()
    damage_blob(served, blob_id)

    audit = AuditTail(served)
    before = audit.head()
    with client(served) as doctor:
        response = doctor.get(f"/Binary/{damaged_id}")
        served_still = doctor.get("/metadata")
    assert response.status_code == 500, response.text
    assert outcome_of(response)["issue"][0]["code"] == "exception"
    assert blob_id not in response.text and "Invalid" not in response.text
    assert served_still.status_code == 200
    [entry] = audit.fhir_since(before)
    assert (entry.event, entry.outcome, entry.reason) == (AuditEvent.COMMAND_FAILED, "error", "server-error")
    assert (entry.details["operation"], entry.details["status"]) == ("GET", 500)
    assert entry.details["path"] == f"/fhir/Binary/{damaged_id}"
    assert entry.actor == professional(served, "medecin")["owner"]
    listed = served.cli("audit", "list", "--event", "command_failed", "--json", "--limit", "1000", check=True)
    assert any(item["seq"] == entry.seq and item["outcome"]["status"] == "error"
               for item in json.loads(listed.stdout))
    served.cli("audit", "verify", check=True)


def test_an_unauthenticated_error_is_audited_once(served: GatewayProcess) -> None:
    audit = AuditTail(served)
    before = audit.head()
    with client(served, None) as anonymous:
        response = anonymous.get("/Binary/2%00")
    assert response.status_code == 401
    assert [(e.reason, e.details["status"]) for e in audit.fhir_since(before)] == [("unauthenticated", 401)]


# --------------------------------------------------------------------------- item 12: the fuzz

SEGMENTS = st.one_of(st.sampled_from(["DocumentReference", "Binary", "metadata", "Patient", "_history", "%00",
                                      "%FF", "%C0%AE", "1", "0", "-1", "1e3", "9" * 30]),
                     st.text(max_size=24).filter(lambda s: s not in (".", "..")).map(
                         lambda s: urllib.parse.quote(s, safe="", errors="surrogateescape")))
IDS = st.one_of(st.just("{document}"), st.sampled_from(["0", "-1", "1e3", "9" * 30, "%00", "2%00", "%FF", "a.b-c",
                                                       "x" * 65, "%2F", "1%0A"]),
                st.text(max_size=20).map(lambda s: urllib.parse.quote(s, safe="", errors="surrogateescape")))
PATHS = st.one_of(st.sampled_from(["DocumentReference", "metadata"]),
                  st.builds("{}/{}".format, st.sampled_from(["DocumentReference", "Binary"]), IDS),
                  st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join))
PARAM_KEYS = st.sampled_from(["patient.identifier", "patient", "type", "category", "date", "status", "_count",
                              "_offset", "_format", "_sort", "_id"]) | st.text(max_size=12)
PARAM_VALUES = st.one_of(st.sampled_from([PATIENT_QUERY, "current", "ge2020-01-01", "20", "json", ""]),
                         st.text(max_size=40), st.binary(max_size=24).map(lambda b: b.decode("latin-1")))
# RFC 9110 5.5: a field value is visible characters, SP, HTAB and obs-text; anything else is not HTTP, and the
# HTTP parser answers it before any application code (aiohttp's 400, logged), so it is not fuzzed here.
HEADER_BYTES = st.binary(max_size=60).map(
    lambda b: b.translate(None, bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])).strip(b" \t"))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=20)
BODIES = st.one_of(st.none(), st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                   st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
                   st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n))


@dataclass(frozen=True)
class Probe:
    method: str
    path: str
    params: list[tuple[str, str]]
    headers: dict[str, bytes]
    body: bytes | None
    authenticated: bool


PROBES = st.builds(
    Probe,
    method=st.sampled_from(["GET", "GET", "GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "OPTIONS"]),
    path=PATHS,
    params=st.lists(st.tuples(PARAM_KEYS, PARAM_VALUES), max_size=4).flatmap(
        lambda pairs: st.sampled_from([pairs, [("patient.identifier", PATIENT_QUERY), *pairs]])),
    headers=st.dictionaries(st.sampled_from(["Accept", EMERGENCY, "Content-Type", "Authorization", "Prefer",
                                             "If-Match"]), HEADER_BYTES, max_size=3),
    body=BODIES,
    authenticated=st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(probe=PROBES)
def test_fuzzed_requests_never_get_a_500_and_are_always_audited(served: GatewayProcess, document_id: str,
                                                                probe: Probe) -> None:
    audit = AuditTail(served)
    before = audit.head()
    path = probe.path.replace("{document}", document_id)
    query = urllib.parse.urlencode(probe.params, errors="surrogateescape")
    headers = {name.encode(): value for name, value in probe.headers.items()}
    if probe.authenticated:
        headers.pop(b"Authorization", None)  # a well-formed wrong password is the limiter's business, not fuzzed here
    with client(served, "PER" if probe.authenticated else None) as caller:
        # An absolute URL: a fuzzed path starting with "/" would make "//x/y" a network-path reference that
        # httpx resolves against the base URL as host "x", path "/y" (so "//DocumentReference/metadata"
        # was sent as /fhir/metadata).
        url = f"{str(caller.base_url).rstrip('/')}/{path}" + (f"?{query}" if query else "")
        response = caller.request(probe.method, url, headers=headers, content=probe.body)
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and probe.method != "HEAD":
        outcome_of(response)
    if not (response.status_code < 400 and path.split("?")[0] == "metadata"):
        assert audit.fhir_since(before), f"{probe.method} /{path} {response.status_code} left no audit entry"


# --------------------------------------------------------------------------- item 15: emergency access


def test_a_pharmacists_emergency_access_is_refused_and_audited(served: GatewayProcess, document_id: str) -> None:
    audit = AuditTail(served)
    before = audit.head()
    with as_professional(served, "pharmacien") as pharmacist:
        response = pharmacist.get(f"/Binary/{document_id}", headers={EMERGENCY: "urgence%20vitale"})
        search = pharmacist.get("/DocumentReference", params={"patient.identifier": PATIENT_QUERY},
                                headers={EMERGENCY: "urgence%20vitale"})
    for refused in (response, search):
        assert refused.status_code == 403, refused.text
        assert outcome_of(refused)["issue"][0]["details"]["coding"][0]["code"] == "emergency-access-not-allowed"
    entries = audit.fhir_since(before)
    assert [(e.outcome, e.reason) for e in entries] == [("refused", "emergency-access-not-allowed")] * 2
    assert all(e.details["justification"] == "urgence vitale" and e.details["emergency"] for e in entries)
    assert {e.actor for e in entries} == {professional(served, "pharmacien")["owner"]}


async def test_a_physicians_emergency_access_is_refused_when_the_patient_refused(
        served: GatewayProcess, services: Services, document_id: str) -> None:
    choices = PatientChoicesService(services.db, services.audit)
    patient = Actor.patient(TEST_INS, "DOMINIQUE PAT-TROIS")
    audit = AuditTail(served)
    before = audit.head()
    await choices.set_emergency_access(TEST_INS, False, actor=patient, source=Source(Door.WEBMAIL, "127.0.0.1"))
    try:
        assert not await choices.emergency_access_allowed(TEST_INS)
        with client(served) as doctor:
            response = doctor.get(f"/Binary/{document_id}", headers={EMERGENCY: "patient%20inconscient"})
        assert response.status_code == 403
        assert outcome_of(response)["issue"][0]["details"]["coding"][0]["code"] == "emergency-access-opposed"
        [entry] = audit.fhir_since(before)
        assert (entry.outcome, entry.reason, entry.details["justification"]) == (
            "refused", "emergency-access-opposed", "patient inconscient")
    finally:
        await choices.set_emergency_access(TEST_INS, True, actor=patient, source=Source(Door.WEBMAIL, "127.0.0.1"))
    assert await choices.emergency_access_allowed(TEST_INS)
    with client(served) as doctor:
        allowed = doctor.get(f"/Binary/{document_id}", headers={EMERGENCY: "patient%20inconscient"})
    assert allowed.status_code == 200


# --------------------------------------------------------------------------- item 14: administrators are audited


def operating_system_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def admin_entries(audit: AuditTail, before: int) -> list[tuple[int, str, str, str | None, str | None, dict[str, Any]]]:
    rows = audit._rows("SELECT event, actor_kind, actor_id, patient_ins, subject_id, details, outcome, reason "
                       "FROM audit_entries WHERE seq > ? AND door = 'cli' ORDER BY seq", before)
    return [(r[0], r[1], r[2], r[3], r[4], {**json.loads(r[5]), "outcome": r[6], "reason": r[7]}) for r in rows]


def test_record_list_and_show_are_audited_under_the_operating_system_user(served: GatewayProcess,
                                                                          document_id: str) -> None:
    audit = AuditTail(served)
    before = audit.head()
    spoofed = {**served.env, "USER": "mallory", "LOGNAME": "mallory"}  # the environment names nobody
    listed = json.loads(run_cli("record", "list", "--patient", TEST_INS, "--json", data_dir=served.data_dir,
                                env=spoofed, check=True).stdout)
    unique_id = next(d["id"] for d in listed if d["id"].startswith("1.2.250.1.999."))
    served.cli("record", "show", unique_id, "--json", check=True)
    missing = served.cli("record", "show", "1.2.3.4.404")
    nobody = add_nir_key("1990175056999")  # a well-formed INS of no patient here
    unknown = served.cli("record", "list", "--patient", nobody)
    assert missing.returncode == 1 and unknown.returncode == 1
    entries = admin_entries(audit, before)
    assert [(e[0], e[1], e[2]) for e in entries] == [
        (int(AuditEvent.RECORD_SEARCHED), "admin", operating_system_user()),
        (int(AuditEvent.DOCUMENT_READ), "admin", operating_system_user()),
        (int(AuditEvent.ACCESS_REFUSED), "admin", operating_system_user()),
        (int(AuditEvent.ACCESS_REFUSED), "admin", operating_system_user()),
    ]
    listing, shown, no_document, no_patient = entries
    assert listing[3] == TEST_INS and unique_id in listing[5]["listed"] and listing[5]["operation"] == "record list"
    assert (shown[3], shown[4], shown[5]["operation"]) == (TEST_INS, unique_id, "record show")
    assert (no_document[4], no_document[5]["outcome"]) == ("1.2.3.4.404", "refused")
    assert no_patient[3] == nobody and nobody in (no_patient[5]["reason"] or "")


def test_refile_and_quarantine_are_audited(served: GatewayProcess, document_id: str) -> None:
    audit = AuditTail(served)
    with sqlite3.connect(f"file:{served.data_dir / 'gateway.db'}?mode=ro", uri=True, timeout=30) as connection:
        delivery_id = connection.execute("SELECT delivery_id FROM filing_jobs ORDER BY id LIMIT 1").fetchone()[0]
    before = audit.head()
    served.cli("record", "quarantine", "--json", check=True)
    refiled = served.cli("record", "refile", str(delivery_id), "--json")
    assert refiled.returncode == 0, refiled.stdout + refiled.stderr
    assert served.cli("record", "refile", "999999").returncode == 1
    entries = admin_entries(audit, before)
    assert [(e[0], e[2]) for e in entries] == [
        (int(AuditEvent.RECORD_SEARCHED), operating_system_user()),
        (int(AuditEvent.ADMIN_MAILBOX_ACCESS), operating_system_user()),
        (int(AuditEvent.ACCESS_REFUSED), operating_system_user()),
    ]
    quarantine, refile, refused = entries
    assert quarantine[5]["operation"] == "record quarantine"
    assert (refile[3], refile[4], refile[5]["action"]) == (TEST_INS, served.account("PAT")["address"], "refile")
    assert refused[4] == "999999"


def test_mailbox_and_audit_exports_name_the_operating_system_user(served: GatewayProcess,
                                                                  tmp_path: Path) -> None:
    audit = AuditTail(served)
    before = audit.head()
    patient = served.account("PAT")
    spoofed = {**served.env, "USER": "mallory", "LOGNAME": "mallory"}
    run_cli("mailbox", "export", patient["address"], str(tmp_path / "box.mbox"),
            data_dir=served.data_dir, env=spoofed, check=True)
    run_cli("audit", "export", str(tmp_path / "audit.jsonl"), "--patient", TEST_INS,
            data_dir=served.data_dir, env=spoofed, check=True)
    entries = admin_entries(audit, before)
    assert [(e[0], e[1], e[2], e[3]) for e in entries] == [
        (int(AuditEvent.ADMIN_MAILBOX_ACCESS), "admin", operating_system_user(), TEST_INS),
        (int(AuditEvent.AUDIT_EXPORTED), "admin", operating_system_user(), TEST_INS),
    ]

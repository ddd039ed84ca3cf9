"""Metrics and logs of a real ``gateway serve`` run with mail and a medical document: the Prometheus counters
move, /health and /ready answer on the metrics port, and the JSON logs (one object per line) carry no message
body, subject, document, document title or password."""

from __future__ import annotations

import imaplib
import json
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dmp_bridge.filing_world import SAMPLES, message_with, sample
from tests.harness import GatewayProcess, free_ports, wait_until

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")

DOCUMENT = "BIO-CR-BIO_2021.01_Microbiologie_V1.xml"
DOCUMENT_TITLE = "Compte rendu d'examens biologiques"
BODY_SECRET = "Suspicion de tuberculose pulmonaire chez ce patient, isolement respiratoire"
SUBJECT_SECRET = "Resultats serologie VIH confidentiels"
WRONG_PASSWORD = "Wrong-Password-Zebra-42!"


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    (port,) = free_ports(1)
    process = GatewayProcess(tmp_path_factory.mktemp("observed") / "data", extra_env={
        "GATEWAY_METRICS_ENABLED": "true", "GATEWAY_METRICS_PORT": str(port), "GATEWAY_LOG_FORMAT": "json",
        "GATEWAY_SMTP_LOCAL_RETRY_SECONDS": "1"})
    process.start()
    yield process
    process.stop()


def _get(gateway: GatewayProcess, path: str) -> tuple[int, bytes]:
    port = gateway.env["GATEWAY_METRICS_PORT"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _samples(gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(gateway, "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample_ in family.samples:
            values[(sample_.name, tuple(sorted(sample_.labels.items())))] = sample_.value
    return values


def _value(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def _total(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (metric, _), value in values.items() if metric == name)


def _tls(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def _send(gateway: GatewayProcess, account: dict[str, str], recipients: list[str], message: bytes | object) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=30) as client:
        client.starttls(context=_tls(gateway))
        client.login(account["address"], account["password"])
        if isinstance(message, bytes):
            client.sendmail(account["address"], recipients, message)
        else:
            client.send_message(message, from_addr=account["address"], to_addrs=recipients)  # type: ignore[arg-type]


def test_health_and_ready_answer_on_the_metrics_port(observed: GatewayProcess) -> None:
    assert _get(observed, "/health") == (200, b'{"status": "ok"}')
    status, body = _get(observed, "/ready")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    ready = json.loads((observed.data_dir / "run" / "ready.json").read_text())
    assert ready["listeners"]["metrics"]["port"] == int(observed.env["GATEWAY_METRICS_PORT"])


def test_counters_move_and_logs_carry_no_content(observed: GatewayProcess) -> None:
    doctor, pharmacist, lab, patient = (observed.account("PER", 0), observed.account("PER", 1),
                                        observed.account("APP"), observed.account("PAT"))
    before = _samples(observed)

    _send(observed, doctor, [pharmacist["address"]],
          (f"From: {doctor['address']}\r\nTo: {pharmacist['address']}\r\nSubject: {SUBJECT_SECRET}\r\n\r\n"
           f"{BODY_SECRET}\r\n").encode())
    document = message_with(("CR.xml", sample(DOCUMENT), "text/xml"), sender=lab["address"], to=patient["address"],
                            subject=f"{DOCUMENT_TITLE} - {SUBJECT_SECRET}")
    del document["Return-Path"]
    _send(observed, lab, [patient["address"]], document)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        with smtplib.SMTP("127.0.0.1", observed.ports["smtp_submission_port"], timeout=30) as client:
            client.starttls(context=_tls(observed))
            client.login(doctor["address"], WRONG_PASSWORD)
    with imaplib.IMAP4_SSL("127.0.0.1", observed.ports["imaps_port"], ssl_context=_tls(observed)) as imap:
        imap.login(pharmacist["address"], pharmacist["password"])
        imap.select("INBOX")

    def moved() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        now = _samples(observed)
        delivered = (_value(now, "gateway_local_deliveries_total", outcome="delivered")
                     - _value(before, "gateway_local_deliveries_total", outcome="delivered"))
        filed = _value(now, "gateway_filing_jobs", state="filed")
        return now if delivered >= 2 and filed >= 1 and _total(now, "gateway_filing_outcomes") >= 1 else None

    after = wait_until(moved, timeout=120, what="both messages delivered and the document's filing finished",
                       interval=0.5)
    assert (_value(after, "gateway_messages_accepted_total", door="submission")
            - _value(before, "gateway_messages_accepted_total", door="submission")) == 2
    assert (_value(after, "gateway_authentication_failures_total", door="smtp")
            - _value(before, "gateway_authentication_failures_total", door="smtp")) >= 1
    assert _value(after, "gateway_connections_total", listener="smtp_submission") >= 3
    assert _value(after, "gateway_connections_total", listener="imap") >= 1
    assert _value(after, "gateway_command_seconds_count", protocol="smtp", command="DATA") >= 2
    assert _value(after, "gateway_command_seconds_count", protocol="imap", command="SELECT") >= 1
    assert ("gateway_queue_depth", (("route", "local"),)) in after
    assert ("gateway_queue_oldest_age_seconds", ()) in after

    log = (observed.data_dir / "serve.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), "a log line is not one JSON object"
    secrets = [BODY_SECRET, SUBJECT_SECRET, DOCUMENT_TITLE, WRONG_PASSWORD, doctor["password"], lab["password"],
               pharmacist["password"]]
    document_text = sample(DOCUMENT).decode("utf-8", "replace")
    secrets += [line.strip() for line in document_text.splitlines() if len(line.strip()) > 40][:50]
    leaked = [secret for secret in secrets if secret in log]
    assert not leaked, f"the log carries content: {leaked[:3]}"


def test_gateway_status_shows_listeners_queue_workers_certificates_and_crls(observed: GatewayProcess) -> None:
    result = observed.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gateway"]["state"] == "serving"
    listeners = {listener["name"]: listener for listener in report["gateway"]["listeners"]}
    assert listeners["smtp_submission"]["port"] == observed.ports["smtp_submission_port"]
    assert all(listener["accepting"] for listener in listeners.values())
    assert report["gateway"]["workers"]["local_delivery"] >= 1
    assert report["queue"]["waiting_total"] is not None and report["queue"]["filing_jobs_open"] is not None
    certificates = {c["certificate"]: c for c in report["certificates"]}
    assert certificates["gateway server"]["days_left"] > 0 and certificates["root CA"]["days_left"] > 0
    assert report["crls"] and all(crl["refreshed"] and crl["next_update"] for crl in report["crls"])
    assert "listeners" in observed.cli("status").stdout            # the table for people


def test_gateway_status_of_a_stopped_gateway_exits_1(tmp_path: Path) -> None:
    from tests.harness import run_cli
    result = run_cli("status", data_dir=tmp_path / "nothing-here")
    assert result.returncode == 1
    assert "not running" in result.stdout

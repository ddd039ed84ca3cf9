"""``gateway status``: is the gateway serving, and what an operator checks first.

Listeners (from ``run/ready.json``, each tried with a TCP connect), the queue (recipients waiting by route,
age of the oldest), filing jobs still open, the workers ``gateway serve`` runs, certificate expiry (the
gateway's own, the CAs') and when each CRL was last refreshed. Exit code 0 when the gateway is serving,
1 when it is not (the rest is still shown), so a monitoring script can use it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from gateway.cli.common import emit_json, emit_record, emit_rows, json_option, run, settings, user_errors
from gateway.config import Settings


@click.command()
@json_option
@user_errors
def status(as_json: bool) -> None:
    """Listeners, queue, workers, certificate expiry and CRL refreshes of this data directory's gateway."""
    config = settings()
    report: dict[str, Any] = {"gateway": _process(config.data_path), "queue": run(_queue_or_why(config)),
              "certificates": _certificates(config), "crls": _crls(config)}
    if as_json:
        emit_json(report)
    else:
        _print(report)
    if report["gateway"]["state"] != "serving":
        raise SystemExit(1)


def _process(data_path: Path) -> dict[str, Any]:
    ready = data_path / "run" / "ready.json"
    try:
        payload = json.loads(ready.read_text())
    except (OSError, ValueError):
        return {"state": "not running", "pid": None, "listeners": [], "workers": {}}
    pid = int(payload.get("pid", 0))
    alive = _pid_alive(pid)
    listeners = [{"name": name, "host": spec["host"], "port": spec["port"],
                  "accepting": alive and _accepts(spec["host"], spec["port"])}
                 for name, spec in payload.get("listeners", {}).items()]
    state = "serving" if alive and all(listener["accepting"] for listener in listeners) else (
        "degraded" if alive else "not running (stale ready.json)")
    # smtp.acceptor_processes: the SMTP acceptor processes, each checked alive (a dead one is being started again).
    acceptors = [{"name": acceptor["name"], "pid": acceptor["pid"], "alive": alive and _pid_alive(int(acceptor["pid"]))}
                 for acceptor in payload.get("acceptors", [])]
    if acceptors and state == "serving" and not all(acceptor["alive"] for acceptor in acceptors):
        state = "degraded"
    return {"state": state, "pid": pid, "started_at": payload.get("started_at"), "listeners": listeners,
            "workers": payload.get("workers", {}), "acceptors": acceptors}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


async def _queue_or_why(config: Settings) -> dict[str, Any]:
    try:
        return await _queue(config)
    except Exception as error:  # noqa: BLE001  (status shows what it can: the database may be missing or down)
        return {"error": f"database unavailable: {type(error).__name__}: {str(error)[:200]}", "waiting": {},
                "waiting_total": None, "oldest_waiting_seconds": None, "filing_jobs_open": None}


async def _queue(config: Settings) -> dict[str, Any]:
    from sqlalchemy import func, select

    from gateway.dmp_bridge.tables import OPEN_JOB_STATES, FilingJob
    from gateway.queue.store import QueueStore
    from gateway.storage.db import Database

    database = Database(config.database_url)
    try:
        backlog = await QueueStore(database).backlog()
        async with database.session() as session:
            filing_open = (await session.execute(select(func.count()).select_from(FilingJob)
                                                 .where(FilingJob.state.in_(OPEN_JOB_STATES)))).scalar()
    finally:
        await database.dispose()
    by_route: dict[str, dict[str, int]] = {}
    for (route, state), count in backlog.counts.items():
        by_route.setdefault(route, {})[state] = count
    age = None if backlog.oldest_seconds is None else round(backlog.oldest_seconds)
    return {"waiting": by_route, "waiting_total": sum(sum(states.values()) for states in by_route.values()),
            "oldest_waiting_seconds": age, "filing_jobs_open": int(filing_open or 0)}


def _certificates(config: Settings) -> list[dict[str, Any]]:
    from gateway.security.pki import GATEWAY_CERT_NAME, TestPKI

    pki = TestPKI.from_settings(config)
    served = (Path(config.tls.server_certificate_file).expanduser() if config.tls.server_certificate_file
              else pki.root / "issued" / f"{GATEWAY_CERT_NAME}.pem")      # tls.*: the operator's (IGC-Santé) one
    files = [("gateway server", served),
             ("intermediate CA", pki.intermediate_cert_path), ("root CA", pki.root_cert_path)]
    now = dt.datetime.now(dt.timezone.utc)
    found: list[dict[str, Any]] = []
    for role, path in files:
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            found.append({"certificate": role, "path": str(path), "not_after": None, "days_left": None})
            continue
        expires = certificate.not_valid_after_utc
        found.append({"certificate": role, "path": str(path), "not_after": expires.isoformat(),
                      "days_left": (expires - now).days})
    return found


def _crls(config: Settings) -> list[dict[str, Any]]:
    """Each CRL the gateway reads: issued when (thisUpdate), due when (nextUpdate), file last refreshed when."""
    from gateway.security.pki import TestPKI

    pki = TestPKI.from_settings(config)
    paths = [*pki.crl_paths, *(Path(path).expanduser() for path in config.pki.trust_anchors)]
    found: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = path.read_bytes()
            refreshed = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
        except OSError:
            found.append({"crl": str(path), "this_update": None, "next_update": None, "refreshed": None})
            continue
        for block in data.split(b"-----END X509 CRL-----")[:-1]:
            start = block.find(b"-----BEGIN X509 CRL-----")
            if start < 0:
                continue
            crl = x509.load_pem_x509_crl(block[start:] + b"-----END X509 CRL-----\n")
            next_update = crl.next_update_utc
            found.append({"crl": str(path), "issuer": crl.issuer.rfc4514_string(),
                          "this_update": crl.last_update_utc.isoformat(),
                          "next_update": next_update.isoformat() if next_update else None, "refreshed": refreshed})
    return found


def _print(report: dict[str, Any]) -> None:
    process = report["gateway"]
    emit_record({"gateway": process["state"], "pid": process["pid"], "started_at": process.get("started_at")},
                as_json=False)
    click.echo("\nlisteners")
    emit_rows(process["listeners"], ["name", "host", "port", "accepting"], as_json=False)
    click.echo("\nworkers")
    emit_rows([{"worker": name, "count": count} for name, count in process["workers"].items()],
              ["worker", "count"], as_json=False)
    if process.get("acceptors"):
        click.echo("\nSMTP acceptor processes")
        emit_rows(process["acceptors"], ["name", "pid", "alive"], as_json=False)
    queue = report["queue"]
    click.echo("\nqueue")
    emit_record({"waiting": queue["waiting_total"], "oldest waiting (s)": queue["oldest_waiting_seconds"],
                 "filing jobs open": queue["filing_jobs_open"],
                 **{f"  {route} {state}": count for route, states in queue["waiting"].items()
                    for state, count in states.items()}}, as_json=False)
    click.echo("\ncertificates")
    emit_rows(report["certificates"], ["certificate", "not_after", "days_left"], as_json=False)
    click.echo("\nCRLs")
    emit_rows(report["crls"], ["crl", "this_update", "next_update", "refreshed"], as_json=False)

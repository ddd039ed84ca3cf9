"""Audit entries of the webmail's account events (sign-in, refusals, sign-out, second factor)."""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web

from gateway.audit import AuditEvent
from gateway.audit.chain import Actor, Door, Outcome, Source, Subject
from gateway.webmail.auth import PatientIdentity
from gateway.webmail.web import client_ip, context


async def audit_patient(request: web.Request, event: AuditEvent, patient: PatientIdentity | tuple[str, str, str],
                        *, refused: str | None = None, details: dict[str, Any] | None = None) -> None:
    """An entry about a known patient: ``patient`` is the identity, or (INS, display name, address)."""
    ins, name, address = ((patient.ins, patient.display_name, patient.address) if isinstance(patient, PatientIdentity)
                          else patient)
    await context(request).services.audit.append(
        event, actor=Actor.patient(ins, name), patient=ins, source=Source(Door.WEBMAIL, client_ip(request)),
        subject=Subject.mailbox(address), outcome=Outcome.refused(refused) if refused else Outcome.success(),
        details=details or {})


async def audit_unknown_login(request: web.Request, login: str, reason: str) -> None:
    """A refused sign-in for a login that names no patient: only a digest of what was typed is kept."""
    digest = hashlib.sha256(login.strip().lower().encode()).hexdigest()[:16]
    await context(request).services.audit.append(
        AuditEvent.WEBMAIL_SIGN_IN_REFUSED, actor=Actor.system("webmail"), patient=None,
        source=Source(Door.WEBMAIL, client_ip(request)), outcome=Outcome.refused(reason),
        details={"login_sha256_16": digest})

"""Who is signed in: ``require_patient(request)`` for every page showing patient data.

Identity rests on the server-side session only; the mailbox and the patient
are read again on every request, so a mailbox disabled or a space closed since
sign-in ends access at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy import select

from gateway.storage.models import Mailbox, Patient, PatientState, State
from gateway.webmail.sessions import ActiveSession, Stage
from gateway.webmail.web import PATIENT_KEY, SESSION_COOKIE, SESSION_KEY, context, refusal

SIGN_IN_PATH = "/connexion"


@dataclass(frozen=True)
class PatientIdentity:
    """The signed-in patient: their mailbox, their INS, and the session that proves it."""

    mailbox_id: int
    address: str
    ins: str
    patient_id: int
    display_name: str
    session: ActiveSession


async def current_session(request: web.Request) -> ActiveSession | None:
    """The session named by the cookie, whatever its stage (None: no live session)."""
    if SESSION_KEY not in request:
        token = request.cookies.get(SESSION_COOKIE)
        request[SESSION_KEY] = await context(request).sessions.lookup(token) if token else None
    return request[SESSION_KEY]


async def identity_for(request: web.Request, session: ActiveSession) -> PatientIdentity | None:
    """The patient owning the session's mailbox, if the mailbox and the space are still active."""
    db = context(request).services.db
    async with db.session() as s:
        row = (await s.execute(select(Mailbox, Patient).join(Patient, Patient.id == Mailbox.patient_id)
                               .where(Mailbox.id == session.mailbox_id))).first()
    if row is None:
        return None
    box, patient = row
    if box.type != "PAT" or box.state != State.ACTIVE.value or patient.state != PatientState.ACTIVE.value:
        return None
    name = " ".join(part for part in (patient.first_given_name, patient.used_family_name or patient.birth_family_name) if part)
    return PatientIdentity(box.id, box.address, patient.ins, patient.id, box.display_name or name, session)


async def require_patient(request: web.Request) -> PatientIdentity:
    """The signed-in patient, or a redirect (303) to the sign-in page.

    No session cookie at all is the ordinary way in (a bookmark, a new browser): only redirected. A cookie
    naming no live session (made up, signed out, expired), a sign-in still waiting for its second factor, or
    a mailbox or space closed since sign-in are refusals the door audits."""
    cached = request.get(PATIENT_KEY)
    if isinstance(cached, PatientIdentity):
        return cached
    session = await current_session(request)
    if session is None:
        if request.cookies.get(SESSION_COOKIE):
            raise refusal(request, web.HTTPSeeOther(SIGN_IN_PATH), "invalid-session")
        raise web.HTTPSeeOther(SIGN_IN_PATH)
    if session.stage is not Stage.SIGNED_IN:
        raise refusal(request, web.HTTPSeeOther(SIGN_IN_PATH), "second-factor-missing")
    identity = await identity_for(request, session)
    if identity is None:
        await context(request).sessions.close(session)
        raise refusal(request, web.HTTPSeeOther(SIGN_IN_PATH), "account-closed")
    request[PATIENT_KEY] = identity
    return identity

"""The webmail door's boundary: its refusals and its failures, into the audit log (``services.door_audit``).

``door_boundary`` is a middleware of the webmail pages (not of the FHIR API
mounted beside them, whose own boundary audits every request). It sees each
request's answer before ``error_pages`` turns it into a page:

- an answer whose request a handler marked with ``web.refused`` (a message id
  not in the patient's mailbox, a forged CSRF token, a made-up or expired
  session cookie, a reply the mail policy refuses) is written as
  ``door_refused``, naming the signed-in mailbox when there is one, the client
  address, the reason and the request line (folded per minute like every
  door's refusals: ``security/door_audit.py``);
- an exception that will be answered with a 500 is written as
  ``command_failed``.

What is not marked is not a door refusal: a page that does not exist, a form
filled in wrongly (400), the sign-in page for a visitor without a cookie.
Refusals already audited where they are decided are not marked, so not
doubled: reading another patient's document (the record's ``access_refused``),
sign-in failures (the sign-in limiter and ``webmail_sign_in_refused``).
"""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.dmp_bridge.fhir.boundary import printable
from gateway.webmail.auth import PatientIdentity, current_session, identity_for
from gateway.webmail.sessions import Stage
from gateway.webmail.web import PATIENT_KEY, REFUSAL_KEY, Handler, client_ip, context, is_webmail_path

log = logging.getLogger("gateway.webmail")
DOOR = "webmail"


@web.middleware
async def door_boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not is_webmail_path(request):
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as answer:
        await _audit_refusal(request, answer.status, answer.reason)
        raise
    except Exception as error:
        await _audit_failure(request, error)
        raise
    await _audit_refusal(request, response.status, response.reason)
    return response


async def _audit_refusal(request: web.Request, status: int, status_text: str) -> None:
    marked = request.get(REFUSAL_KEY)
    door_audit = getattr(context(request).services, "door_audit", None)
    if marked is None or door_audit is None:
        return
    reason, reply = marked
    await door_audit.refused(DOOR, client_ip(request), await _signed_in(request), reply or f"{status} {status_text}",
                             _request_line(request), reason=reason, command=request.method)


async def _audit_failure(request: web.Request, error: Exception) -> None:
    door_audit = getattr(context(request).services, "door_audit", None)
    if door_audit is not None:
        await door_audit.failed(DOOR, client_ip(request), await _signed_in(request), _request_line(request),
                                error.__class__.__name__)


async def _signed_in(request: web.Request) -> str | None:
    """The address of the patient signed in on this request's session, if any (the audit's actor)."""
    identity = request.get(PATIENT_KEY)
    if isinstance(identity, PatientIdentity):
        return identity.address
    try:
        session = await current_session(request)
        if session is None or session.stage is not Stage.SIGNED_IN:
            return None
        found = await identity_for(request, session)
    except Exception:   # naming the actor must not hide the refusal itself
        log.exception("webmail: could not tell who was signed in for the audit")
        return None
    return found.address if found is not None else None


def _request_line(request: web.Request) -> str:
    return f"{printable(request.method, 16)} {printable(request.path, 256)}"   # the attacker's text: made safe

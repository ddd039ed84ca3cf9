"""The second step of sign-in: enrol TOTP by QR code (then see the recovery codes once), or give a code."""

from __future__ import annotations

from aiohttp import web

from gateway.audit import AuditEvent
from gateway.webmail import throttle
from gateway.webmail.audit_events import audit_patient
from gateway.webmail.auth import SIGN_IN_PATH, current_session
from gateway.webmail.sessions import ActiveSession, Stage
from gateway.webmail.signin import audit_signed_in, patient_of_mailbox, promote
from gateway.webmail.totp import TotpService
from gateway.webmail.web import N_, client_ip, context, render, set_session_cookie, translate

CODE_PATH = "/connexion/code"
ENROL_PATH = "/connexion/activer"
WRONG_CODE = N_("This code is not valid. Check the time on your phone and type the code currently shown.")


def install(app: web.Application) -> None:
    app.router.add_get(CODE_PATH, code_page)
    app.router.add_post(CODE_PATH, check_code)
    app.router.add_get(ENROL_PATH, enrol_page)
    app.router.add_post(ENROL_PATH, confirm_enrolment)


async def _session_at(request: web.Request, stage: Stage) -> ActiveSession:
    session = await current_session(request)
    if session is None or session.stage is not stage:
        raise web.HTTPSeeOther(SIGN_IN_PATH)
    return session


async def code_page(request: web.Request) -> web.StreamResponse:
    await _session_at(request, Stage.SECOND_FACTOR)
    return render(request, "code.html", {"error": None})


async def check_code(request: web.Request) -> web.StreamResponse:
    session = await _session_at(request, Stage.SECOND_FACTOR)
    ctx = context(request)
    code = str((await request.post()).get("code", ""))
    key = f"second-factor:{session.mailbox_id}"
    try:
        await throttle.check(ctx.limiter, key, client_ip(request))
    except throttle.Throttled as exc:
        minutes = max(1, (exc.retry_after + 59) // 60)
        response = render(request, "code.html", {"error": translate(
            request, N_("Too many failed attempts. Try again in %(minutes)s minute(s)."), minutes=minutes)}, status=429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    totp = TotpService.of(request)
    if await totp.verify(session.mailbox_id, code):
        await throttle.succeeded(ctx.limiter, key, client_ip(request))
        return await promote(request, session, "password+totp")
    if len(code.strip()) > 8 and await totp.use_recovery_code(session.mailbox_id, code):
        await throttle.succeeded(ctx.limiter, key, client_ip(request))
        who = await patient_of_mailbox(request, session.mailbox_id)
        if who is not None:
            await audit_patient(request, AuditEvent.WEBMAIL_RECOVERY_CODE_USED, who,
                                details={"left": await totp.recovery_codes_left(session.mailbox_id)})
        return await promote(request, session, "password+recovery")
    await throttle.failed(ctx.limiter, key, client_ip(request))
    who = await patient_of_mailbox(request, session.mailbox_id)
    if who is not None:
        await audit_patient(request, AuditEvent.WEBMAIL_SIGN_IN_REFUSED, who, refused="wrong second-factor code")
    return render(request, "code.html", {"error": translate(request, WRONG_CODE)}, status=401)


async def enrol_page(request: web.Request) -> web.StreamResponse:
    session = await _session_at(request, Stage.ENROL)
    return render(request, "enrol.html", {"enrolment": await _enrolment(request, session), "error": None})


async def _enrolment(request: web.Request, session: ActiveSession) -> object:
    who = await patient_of_mailbox(request, session.mailbox_id)
    account = who[2] if who else str(session.mailbox_id)
    totp = TotpService.of(request)
    return await totp.pending(session.mailbox_id, account) or await totp.begin(session.mailbox_id, account)


async def confirm_enrolment(request: web.Request) -> web.StreamResponse:
    session = await _session_at(request, Stage.ENROL)
    code = str((await request.post()).get("code", ""))
    codes = await TotpService.of(request).confirm(session.mailbox_id, code)
    if codes is None:
        return render(request, "enrol.html", {"enrolment": await _enrolment(request, session),
                                              "error": translate(request, WRONG_CODE)}, status=400)
    who = await patient_of_mailbox(request, session.mailbox_id)
    if who is not None:
        await audit_patient(request, AuditEvent.WEBMAIL_SECOND_FACTOR_ENROLLED, who)
    ctx = context(request)
    token = await ctx.sessions.advance(session, Stage.SIGNED_IN, "password+totp", client_ip(request))
    await audit_signed_in(request, session.mailbox_id, "password+totp")
    response = render(request, "recovery_codes.html", {"codes": codes})
    set_session_cookie(response, token)
    return response

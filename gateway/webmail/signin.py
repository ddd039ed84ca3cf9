"""Sign-in with the patient mailbox's password, the second factor, and sign-out (here or everywhere).

Every attempt goes through the gateway's authentication limiter (throttle.py)
before the password is checked, and every outcome is audited. The session id
is rotated at each step (password accepted, second factor accepted).
"""

from __future__ import annotations

from aiohttp import web
from sqlalchemy import select

from gateway.audit import AuditEvent
from gateway.errors import UserError
from gateway.directory.addresses import normalise_address
from gateway.storage.models import Mailbox, Patient
from gateway.webmail import throttle
from gateway.webmail.audit_events import audit_patient, audit_unknown_login
from gateway.webmail.auth import SIGN_IN_PATH, current_session, require_patient
from gateway.webmail.sessions import ActiveSession, Stage
from gateway.webmail.totp import TotpService
from gateway.webmail.web import N_, clear_session_cookie, client_ip, context, render, set_session_cookie, translate

HOME = "/"
STAGE_PAGES = {Stage.SECOND_FACTOR: "/connexion/code", Stage.ENROL: "/connexion/activer", Stage.SIGNED_IN: HOME}
WRONG_CREDENTIALS = N_("The address or the password is wrong.")


def install(app: web.Application) -> None:
    app.router.add_get(SIGN_IN_PATH, sign_in_page)
    app.router.add_post(SIGN_IN_PATH, sign_in)
    app.router.add_post("/deconnexion", sign_out)
    app.router.add_post("/deconnexion/partout", sign_out_everywhere)


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    session = await current_session(request)
    if session is not None:
        raise web.HTTPSeeOther(STAGE_PAGES[session.stage])
    return render(request, "signin.html", {"login": "", "error": None, "oidc": bool(context(request).settings.webmail.oidc_issuer),
                                           "signed_out": "sortie" in request.query})


async def sign_in(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    login = str(form.get("login", "")).strip()
    password = str(form.get("password", ""))
    ctx = context(request)
    source = client_ip(request)
    try:
        await throttle.check(ctx.limiter, login.lower(), source)
    except throttle.Throttled as exc:
        return await _throttled(request, login, exc.retry_after)
    account = await ctx.services.directory.authenticate(login, password) if login and password else None
    if account is None or account.type != "PAT":
        await throttle.failed(ctx.limiter, login.lower(), source)
        await _audit_refusal(request, login, "wrong address or password" if account is None else "not a patient mailbox")
        return render(request, "signin.html", {"login": login, "error": translate(request, WRONG_CREDENTIALS),
                                               "oidc": bool(ctx.settings.webmail.oidc_issuer), "signed_out": False},
                      status=401)
    await throttle.succeeded(ctx.limiter, login.lower(), source)
    return await start_session(request, account.mailbox_id, method="password")


async def start_session(request: web.Request, mailbox_id: int, *, method: str) -> web.StreamResponse:
    """A first factor was accepted: a new session (any previous one of this browser ends) at the next stage."""
    ctx = context(request)
    previous = await current_session(request)
    if previous is not None:
        await ctx.sessions.close(previous)
    stage = Stage.SIGNED_IN
    if method == "password" and ctx.settings.webmail.require_second_factor:
        stage = Stage.SECOND_FACTOR if await TotpService.of(request).enrolled(mailbox_id) else Stage.ENROL
    token = await ctx.sessions.open(mailbox_id, stage, method, client_ip(request))
    if stage is Stage.SIGNED_IN:
        await audit_signed_in(request, mailbox_id, method)
    response = web.HTTPSeeOther(STAGE_PAGES[stage])
    set_session_cookie(response, token)
    raise response


async def promote(request: web.Request, session: ActiveSession, method: str) -> web.StreamResponse:
    """The second factor was accepted: rotate the session id and enter the signed-in stage."""
    ctx = context(request)
    token = await ctx.sessions.advance(session, Stage.SIGNED_IN, method, client_ip(request))
    await audit_signed_in(request, session.mailbox_id, method)
    response = web.HTTPSeeOther(HOME)
    set_session_cookie(response, token)
    raise response


async def audit_signed_in(request: web.Request, mailbox_id: int, method: str) -> None:
    who = await patient_of_mailbox(request, mailbox_id)
    if who is not None:
        await audit_patient(request, AuditEvent.WEBMAIL_SIGNED_IN, who, details={"method": method})


async def patient_of_mailbox(request: web.Request, mailbox_id: int) -> tuple[str, str, str] | None:
    """(INS, display name, address) of a patient mailbox."""
    async with context(request).services.db.session() as s:
        row = (await s.execute(select(Patient.ins, Patient.first_given_name, Patient.birth_family_name, Mailbox.address)
                               .join(Mailbox, Mailbox.patient_id == Patient.id).where(Mailbox.id == mailbox_id))).first()
    return (row[0], f"{row[1]} {row[2]}", row[3]) if row is not None else None


async def _audit_refusal(request: web.Request, login: str, reason: str) -> None:
    try:
        address = normalise_address(login)
    except UserError:
        address = None
    mailbox_id = None
    if address is not None:
        async with context(request).services.db.session() as s:
            mailbox_id = await s.scalar(select(Mailbox.id).where(Mailbox.address == address, Mailbox.type == "PAT"))
    who = await patient_of_mailbox(request, mailbox_id) if mailbox_id is not None else None
    if who is not None:
        await audit_patient(request, AuditEvent.WEBMAIL_SIGN_IN_REFUSED, who, refused=reason)
    else:
        await audit_unknown_login(request, login, reason)


async def _throttled(request: web.Request, login: str, retry_after: int) -> web.StreamResponse:
    await _audit_refusal(request, login, f"throttled: too many failed sign-ins, retry in {retry_after} s")
    minutes = max(1, (retry_after + 59) // 60)
    response = render(request, "signin.html", {
        "login": login, "oidc": bool(context(request).settings.webmail.oidc_issuer), "signed_out": False,
        "error": translate(request, N_("Too many failed attempts. Try again in %(minutes)s minute(s)."), minutes=minutes)},
        status=429)
    response.headers["Retry-After"] = str(retry_after)  # RFC 6585 4
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    session = await current_session(request)
    if session is not None:
        who = await patient_of_mailbox(request, session.mailbox_id)
        await context(request).sessions.close(session)
        if who is not None and session.stage is Stage.SIGNED_IN:
            await audit_patient(request, AuditEvent.WEBMAIL_SIGNED_OUT, who)
    response = web.HTTPSeeOther(SIGN_IN_PATH + "?sortie=1")
    clear_session_cookie(response)
    raise response


async def sign_out_everywhere(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    ended = await context(request).sessions.close_all(patient.mailbox_id)
    await audit_patient(request, AuditEvent.WEBMAIL_SIGNED_OUT_EVERYWHERE, patient, details={"sessions": ended})
    response = web.HTTPSeeOther(SIGN_IN_PATH + "?sortie=1")
    clear_session_cookie(response)
    raise response

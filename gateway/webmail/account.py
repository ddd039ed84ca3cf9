"""The account's security page: how the patient signs in, recovery codes left, signing out everywhere."""

from __future__ import annotations

from aiohttp import web

from gateway.webmail.auth import require_patient
from gateway.webmail.totp import TotpService
from gateway.webmail.web import N_, add_nav, context, render, translate

PATH = "/compte/securite"


def install(app: web.Application) -> None:
    app.router.add_get(PATH, security_page)
    add_nav(app, PATH, N_("Account security"))


async def security_page(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    totp = TotpService.of(request)
    return render(request, "account_security.html", {
        "title": translate(request, N_("Account security")),
        "second_factor": await totp.enrolled(patient.mailbox_id),
        "codes_left": await totp.recovery_codes_left(patient.mailbox_id),
        "sessions": await context(request).sessions.count(patient.mailbox_id),
        "method": patient.session.method,
    })

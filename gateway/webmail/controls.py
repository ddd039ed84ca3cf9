"""My settings: who may see the record (blocks, emergency access), how the patient hears of accesses, leaving.

Every change is a POST with the CSRF token (web.csrf_protection), acts on the
signed-in patient only (``PatientCaller`` from the session), is audited by the
service it calls, and answers with a redirect to the page saying what changed
(or the page again with the reason it was refused). Closing the space states
its consequences first, asks the patient to confirm in words (a checkbox they
tick), then closes every session of the mailbox.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from gateway.dmp_bridge.access_history import PARIS
from gateway.dmp_bridge.notice_tables import NoticeFrequency
from gateway.errors import NotFound, UserError
from gateway.webmail.auth import require_patient
from gateway.webmail.documents import caller_of, record_pages
from gateway.webmail.web import N_, PATIENT_KEY, add_nav, clear_session_cookie, context, render, translate

CONTROLS_PATH = "/reglages"
DONE = {
    "urgence-refusee": N_("Emergency access to your record is now refused."),
    "urgence-autorisee": N_("Emergency access to your record is allowed again."),
    "bloque": N_("This professional can no longer see your record."),
    "debloque": N_("This professional can see your record again, as their profession allows."),
    "notifications": N_("Your notification preferences are saved."),
}
FREQUENCIES = [
    (NoticeFrequency.DEFAULT.value, N_("At most once a day")),
    (NoticeFrequency.EACH.value, N_("At each access")),
    (NoticeFrequency.WEEKLY.value, N_("At most once a week")),
]


def install(app: web.Application) -> None:
    app.router.add_get(CONTROLS_PATH, controls_page)
    app.router.add_post(CONTROLS_PATH + "/urgence", emergency_access)
    app.router.add_post(CONTROLS_PATH + "/bloquer", block)
    app.router.add_post(CONTROLS_PATH + "/debloquer", unblock)
    app.router.add_post(CONTROLS_PATH + "/notifications", notifications)
    app.router.add_get(CONTROLS_PATH + "/fermer", close_page)
    app.router.add_post(CONTROLS_PATH + "/fermer", close_space)
    add_nav(app, CONTROLS_PATH, N_("My settings"))


async def controls_page(request: web.Request, *, error: str | None = None, status: int = 200,
                        address: str | None = None) -> web.StreamResponse:
    patient = await require_patient(request)
    state = await record_pages(request).controls.state(caller_of(request, patient))
    done = DONE.get(request.query.get("fait", ""))
    return render(request, "controls.html", {
        "state": state, "done": translate(request, done) if done else None, "error": error,
        "frequencies": FREQUENCIES, "address": state.notifications.address or "" if address is None else address,
        "own_address": patient.address}, status=status)


async def _form(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {key: value for key, value in data.items() if isinstance(value, str)}


async def emergency_access(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    choice = (await _form(request)).get("acces")
    if choice not in ("refuser", "autoriser"):
        raise web.HTTPBadRequest(text=translate(request, "Choose to refuse or to allow emergency access."))
    await record_pages(request).controls.set_emergency_access(caller_of(request, patient), allowed=choice == "autoriser")
    raise web.HTTPSeeOther(f"{CONTROLS_PATH}?fait=urgence-{'autorisee' if choice == 'autoriser' else 'refusee'}")


async def block(request: web.Request) -> web.StreamResponse:
    return await _set_block(request, blocked=True)


async def unblock(request: web.Request) -> web.StreamResponse:
    return await _set_block(request, blocked=False)


async def _set_block(request: web.Request, *, blocked: bool) -> web.StreamResponse:
    patient = await require_patient(request)
    idnps = (await _form(request)).get("professionnel", "").strip()[:32]
    controls = record_pages(request).controls
    caller = caller_of(request, patient)
    if blocked:
        allowed = {person.id for person in (await controls.state(caller)).blockable}
        if idnps not in allowed:  # only professionals met in this record; the médecin traitant is never listed
            return await controls_page(request, status=400,
                                       error=translate(request, "Choose a professional from the list."))
    try:
        if blocked:
            await controls.block(caller, idnps)
        else:
            await controls.unblock(caller, idnps)
    except (NotFound, UserError) as exc:
        return await controls_page(request, status=409 if not isinstance(exc, NotFound) else 400, error=str(exc))
    raise web.HTTPSeeOther(f"{CONTROLS_PATH}?fait={'bloque' if blocked else 'debloque'}#professionnels")


async def notifications(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    form = await _form(request)
    address = form.get("adresse", "").strip()[:320]
    own = form.get("destination", "espace") == "espace"
    try:
        await record_pages(request).controls.set_notifications(
            caller_of(request, patient), address=None if own else address, frequency=form.get("frequence", ""))
    except UserError as exc:
        message = (translate(request, "This address cannot receive our messages. Give a secure health messaging "
                                      "address, or choose your space.") if exc.field == "address"
                   else translate(request, "Choose how often you want to be told."))
        return await controls_page(request, status=400, error=message, address=address)
    raise web.HTTPSeeOther(f"{CONTROLS_PATH}?fait=notifications#notifications")


async def close_page(request: web.Request) -> web.StreamResponse:
    await require_patient(request)
    days = context(request).settings.retention.closed_patient_days
    return render(request, "close.html", {"days": days, "error": None})


async def close_space(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    form = await _form(request)
    days = context(request).settings.retention.closed_patient_days
    if form.get("je-comprends") != "oui":
        return render(request, "close.html", {"days": days, "error": translate(
            request, "Tick the box to confirm that you understand what closing your space means.")}, status=400)
    shred_at = await record_pages(request).controls.close_space(caller_of(request, patient))
    await context(request).sessions.close_all(patient.mailbox_id)
    del request[PATIENT_KEY]  # signed out: the page shows no menu
    response = render(request, "closed.html", _closed_values(shred_at))
    clear_session_cookie(response)
    return response


def _closed_values(shred_at: dt.datetime) -> dict[str, Any]:
    return {"shred_day": shred_at.astimezone(PARIS).date()}

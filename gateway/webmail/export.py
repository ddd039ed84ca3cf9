"""Export everything: the patient's messages (.eml), documents and access history in one zip, streamed.

A POST with the CSRF token (an export carries health data: no link can start
one from another site), for the signed-in patient's own mailbox only. The
export is audited before the first byte leaves (``PatientExport``); the zip
is written as it is read, so its size does not matter.
"""

from __future__ import annotations

from aiohttp import web

from gateway.dmp_bridge.access_history import PARIS
from gateway.storage.models import utcnow
from gateway.webmail.auth import require_patient
from gateway.webmail.documents import caller_of, record_pages
from gateway.webmail.history import sentence

EXPORT_PATH = "/reglages/export"


def install(app: web.Application) -> None:
    app.router.add_post(EXPORT_PATH, export)


async def export(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    chunks = await record_pages(request).export.stream(caller_of(request, patient), [patient.mailbox_id],
                                                       lambda item: sentence(request, item))
    name = f"mon-espace-sante-{utcnow().astimezone(PARIS).date().isoformat()}.zip"
    response = web.StreamResponse(headers={
        "Content-Type": "application/zip", "Content-Disposition": f'attachment; filename="{name}"',
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})
    await response.prepare(request)
    async for chunk in chunks:
        if chunk:
            await response.write(chunk)
    await response.write_eof()
    return response

"""Messages: the inbox, conversations with professionals, reading, attachments, replies."""

from __future__ import annotations

from aiohttp import web

from gateway.mailstore.errors import FolderNotFound
from gateway.mailstore.interface import INBOX, All, FolderRef, UidSet
from gateway.webmail.auth import require_patient
from gateway.webmail.web import N_, add_nav, context, render

PAGE_SIZE = 50


def install(app: web.Application) -> None:
    app.router.add_get("/", inbox)
    add_nav(app, "/", N_("Messages"))


async def inbox(request: web.Request) -> web.StreamResponse:
    patient = await require_patient(request)
    store = context(request).services.mailstore
    folder = FolderRef(patient.mailbox_id, INBOX)
    try:
        uids = await store.search(folder, All(()))
    except FolderNotFound:
        uids = []   # nothing delivered yet: the folders are provisioned by the first delivery
    newest = sorted(uids, reverse=True)[:PAGE_SIZE]
    metas = await store.fetch(folder, UidSet.from_uids(newest)) if newest else []
    metas.sort(key=lambda meta: meta.uid, reverse=True)
    return render(request, "inbox.html", {"messages": metas, "total": len(uids)})

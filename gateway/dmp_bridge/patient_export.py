"""Everything of a patient's, in one zip, streamed: their messages as .eml, their documents, their access history.

The zip is produced piece by piece (``zipfile`` writes to an unseekable
stream with data descriptors), so memory stays bounded whatever the mailbox's
size: each message is read from the mail store in chunks (the same path IMAP
and ``gateway mailbox export`` read, decrypting each blob with the mailbox's
key), each document from the record store (decrypted with the patient's key),
and every piece of zip output is handed to the caller as soon as it exists.

Layout::

    LISEZMOI.txt                      what is inside, in French
    messages/<folder>/<uid>.eml       every message of every folder, as stored
    documents/<date>_<id>.<xml|pdf>   every document the patient may see, as filed
    documents/index.csv               title, type, date, status, author of each
    historique.txt                    the access history, one French sentence a line

The export is audited (RECORD_EXPORTED) before the first byte leaves, with
what it holds; the documents it contains are not audited one by one.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gateway.audit.events import AuditEvent
from gateway.dmp_bridge.access_history import AccessHistory, HistoryItem, french_moment
from gateway.dmp_bridge.fhir.service import RecordAccessService, facts
from gateway.dmp_bridge.patient_space import PatientCaller, document_day
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import RecordDocument
from gateway.errors import NotFound
from gateway.mailstore.interface import FolderRef, MailStore
from gateway.mailstore.mbox import ALL_UIDS

MAX_LISTED = 100
HISTORY_PAGE = 500
README = """Export de votre espace santé
============================

messages/     vos messages, dossier par dossier, au format .eml (lisible par toute messagerie)
documents/    les documents de votre dossier, tels que les professionnels les ont déposés
              (.xml : document médical structuré CDA ; .pdf : document PDF) ;
              index.csv en donne le titre, le type, la date et l'auteur
historique.txt  l'historique des accès à votre dossier

Ces fichiers contiennent des données de santé : conservez-les en lieu sûr.
"""


class _Sink(io.RawIOBase):
    """What zipfile writes into: collected until the exporter hands it on."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


@dataclass(frozen=True)
class ExportPlan:
    mailbox_ids: list[int]
    documents: list[RecordDocument]


class PatientExport:
    def __init__(self, access: RecordAccessService, store: RecordStore, mailstore: MailStore,
                 history: AccessHistory) -> None:
        self.access = access
        self.store = store
        self.mailstore = mailstore
        self.history = history

    async def stream(self, caller: PatientCaller, mailbox_ids: list[int],
                     describe: Callable[[HistoryItem], str]) -> AsyncIterator[bytes]:
        """Audit the export, then yield the zip's bytes. ``mailbox_ids``: the patient's own mailboxes (session);
        ``describe``: an access history entry as a sentence (the webmail's catalogue)."""
        documents = await self._visible_documents(caller)
        folders = {mailbox_id: [info.name for info in await self.mailstore.list_folders(mailbox_id)]
                   for mailbox_id in mailbox_ids}
        await self.access.audit.append(
            AuditEvent.RECORD_EXPORTED, actor=caller.actor, patient=caller.ins, source=caller.source,
            details={"documents": len(documents), "document_ids": [d.unique_id for d in documents][:MAX_LISTED],
                     "folders": sum(len(names) for names in folders.values())})
        return self._zip(caller, folders, documents, describe)

    async def _zip(self, caller: PatientCaller, folders: dict[int, list[str]], documents: list[RecordDocument],
                   describe: Callable[[HistoryItem], str]) -> AsyncIterator[bytes]:
        sink = _Sink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("LISEZMOI.txt", README)
            for mailbox_id, names in folders.items():
                for name in names:
                    async for piece in self._folder(archive, sink, FolderRef(mailbox_id, name), len(folders) > 1):
                        yield piece
            for document in documents:
                archive.writestr(_document_name(document), await self.store.read_content(document))
                yield sink.take()
            archive.writestr("documents/index.csv", _index(documents))
            archive.writestr("historique.txt", await self._history_text(caller, describe))
        yield sink.take()

    async def _folder(self, archive: zipfile.ZipFile, sink: _Sink, folder: FolderRef,
                      several: bool) -> AsyncIterator[bytes]:
        prefix = f"messages/{folder.mailbox_id}/" if several else "messages/"
        for meta in await self.mailstore.fetch(folder, ALL_UIDS):
            info = zipfile.ZipInfo(f"{prefix}{_safe_folder(folder.name)}/{meta.uid}.eml",
                                   date_time=meta.internaldate.timetuple()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            async with await self.mailstore.open_message(folder, meta.uid) as body:
                with archive.open(info, "w") as entry:
                    async for chunk in body.chunks():
                        entry.write(chunk)
                        if len(sink.buffer) >= 64 * 1024:
                            yield sink.take()
            yield sink.take()

    async def _visible_documents(self, caller: PatientCaller) -> list[RecordDocument]:
        try:
            rows = await self.store.list_for_patient(caller.ins)
        except NotFound:
            return []
        choices = await self.access.choices.choices(caller.ins)
        shown, _withheld = self.access.policy.visible(caller.call.requester, [facts(row) for row in rows], choices)
        visible = {document.unique_id for document in shown}
        return [row for row in rows if row.unique_id in visible and row.patient_ins == caller.ins]

    async def _history_text(self, caller: PatientCaller, describe: Callable[[HistoryItem], str]) -> str:
        lines: list[str] = []
        before: int | None = None
        while True:
            page = await self.history.page(caller.ins, limit=HISTORY_PAGE, before=before)
            lines += [describe(item) for item in page.items]
            if page.next_before is None:
                break
            before = page.next_before
        return "\n".join(lines) + "\n"


def _safe_folder(name: str) -> str:
    """A folder name as a path part: no traversal, no separator."""
    cleaned = "".join(ch if ch.isalnum() or ch in " -_." else "_" for ch in name).strip(" .")
    return cleaned or "dossier"


def _document_name(document: RecordDocument) -> str:
    extension = "pdf" if document.mime_type == "application/pdf" else "xml"
    return f"documents/{document_day(document).isoformat()}_{document.id}.{extension}"


def _index(documents: list[RecordDocument]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";")
    writer.writerow(["fichier", "titre", "type", "date", "statut", "auteur", "déposé le"])
    for document in documents:
        writer.writerow([_document_name(document).removeprefix("documents/"), document.title or "",
                         document.type_display or document.type_code or "", document_day(document).isoformat(),
                         "remplacé par une version plus récente" if document.status == "superseded" else "en vigueur",
                         document.author_name or "", french_moment(document.filed_at)])
    return out.getvalue()

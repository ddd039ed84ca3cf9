"""Who deposited a document into the record, as the gateway itself established it (IHE XDS source, CI-SIS 901).

A document's author (CDA ``author``, XDS ``authorPerson``) is what the document
claims; anyone can write any name there. The depositor is who actually handed
it to the gateway, known from the session that accepted the message and never
from the message itself:

- on submission (SMTP submission, submissions, webmail) the envelope sender
  (MAIL FROM), which the pipeline accepted only because the authenticated
  account owns that mailbox or holds a delegation on it
  (``pipeline/policy.py``); the depositor is that mailbox's owner, so a
  delegate deposits for the delegating owner, and the login is kept as
  ``submitted_by``;
- on the relay door, the envelope sender of the authenticated peer operator,
  as the national directory lists it (a remote, not hosted, mailbox entry);
- mail the gateway writes itself, a null sender, an unknown sender or a
  patient's mailbox deposit nothing.

The owner is the IDNPS for PER/CAB mailboxes, the IDNST for ORG/APP ones; the
organisations are the IDNST the owner belongs to (the professional's
activities, or the organisation itself). Replacing a document, and updating its
status or security labels, is allowed only to its depositor or to someone of
the depositor's organisation (``may_amend``); an absent depositor or
organisation never matches.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.directory.addresses import normalise_address
from gateway.dmp_bridge.access import Requester, RequesterKind
from gateway.errors import UserError
from gateway.queue.tables import QueuedMessage
from gateway.storage.models import Mailbox, Organisation, Professional, ProfessionalOrganisation

SUBMISSION_DOORS = frozenset({"submission", "submissions", "webmail"})
RELAY_DOOR = "relay"


class DepositorKind(enum.StrEnum):
    PROFESSIONAL = "professional"   # a PER or CAB mailbox: IDNPS
    ORGANISATION = "organisation"   # an ORG or APP mailbox: IDNST


@dataclass(frozen=True)
class Depositor:
    """The owner of the mailbox a document was deposited from."""

    kind: DepositorKind
    id: str                              # IDNPS or IDNST
    organisations: tuple[str, ...]       # IDNST of the organisation(s) the owner belongs to
    address: str | None = None           # the mailbox sent as (the envelope sender)
    submitted_by: str | None = None      # the authenticated login, when it is not ``address`` (a delegate)
    door: str | None = None

    def may_amend(self, kind: str | None, depositor_id: str | None, organisations: Sequence[str] | None) -> bool:
        """True when this depositor may replace or update a document deposited by (kind, id, organisations):
        the same owner, or a shared organisation. Nothing missing ever matches."""
        if kind is not None and depositor_id and kind == self.kind.value and depositor_id == self.id:
            return True
        theirs = {idnst for idnst in organisations or () if idnst}
        return bool(theirs & {idnst for idnst in self.organisations if idnst})


async def depositor_of_queued_message(session: AsyncSession, queue_id: str) -> Depositor | None:
    """The depositor of the message accepted as ``queue_id``, from what its door recorded at acceptance."""
    return await depositor_of_message(session, await session.get(QueuedMessage, queue_id))


def accepted_as(message: QueuedMessage | None) -> tuple[str | None, str, str | None] | None:
    """What the depositor of ``message`` depends on, and only that: (door, sender, authenticated login).
    Two messages with the same key have the same depositor (the filing worker resolves it once per batch)."""
    return None if message is None else (message.door, message.sender, message.authenticated_as)


async def depositor_of_message(session: AsyncSession, message: QueuedMessage | None) -> Depositor | None:
    """The depositor of a queue row, from what its door recorded at acceptance (``accepted_as``)."""
    if message is None or not message.sender:
        return None
    if message.door in SUBMISSION_DOORS:
        if not message.authenticated_as:
            return None
        mailbox = await _mailbox(session, message.sender)
        if mailbox is None or not mailbox.hosted:
            return None
    elif message.door == RELAY_DOOR:
        mailbox = await _mailbox(session, message.sender)
        if mailbox is None or mailbox.hosted:
            return None  # a peer never deposits as one of our own mailboxes, nor as someone the directory lacks
    else:
        return None  # generated mail (reports, notices): the gateway deposits nothing
    depositor = await depositor_of_mailbox(session, mailbox)
    if depositor is None:
        return None
    submitted_by = message.authenticated_as if message.authenticated_as != mailbox.address else None
    return Depositor(depositor.kind, depositor.id, depositor.organisations, mailbox.address, submitted_by, message.door)


async def depositor_of_mailbox(session: AsyncSession, mailbox: Mailbox) -> Depositor | None:
    """The owner of a professional or organisation mailbox (None for a patient's)."""
    if mailbox.type in ("PER", "CAB") and mailbox.professional_id is not None:
        professional = await session.get(Professional, mailbox.professional_id)
        if professional is None:
            return None
        return await professional_depositor(session, professional.idnps, address=mailbox.address)
    if mailbox.type in ("ORG", "APP") and mailbox.organisation_id is not None:
        organisation = await session.get(Organisation, mailbox.organisation_id)
        if organisation is None:
            return None
        return Depositor(DepositorKind.ORGANISATION, organisation.idnst, (organisation.idnst,), mailbox.address)
    return None


async def professional_depositor(session: AsyncSession, idnps: str, *, address: str | None = None) -> Depositor | None:
    """A professional as a depositor, with the organisations they practise in."""
    professional = await session.scalar(select(Professional).where(Professional.idnps == idnps))
    if professional is None:
        return None
    organisations = (await session.scalars(
        select(Organisation.idnst).join(ProfessionalOrganisation, ProfessionalOrganisation.organisation_id == Organisation.id)
        .where(ProfessionalOrganisation.professional_id == professional.id).order_by(Organisation.idnst))).all()
    return Depositor(DepositorKind.PROFESSIONAL, professional.idnps, tuple(organisations), address)


async def requester_depositor(session: AsyncSession, requester: Requester) -> Depositor | None:
    """An API caller as a depositor: a professional (IDNPS), an organisation's application (IDNST); a patient
    deposits nothing."""
    if requester.kind == RequesterKind.PROFESSIONAL:
        return await professional_depositor(session, requester.id)
    if requester.kind == RequesterKind.APPLICATION:
        return Depositor(DepositorKind.ORGANISATION, requester.id, (requester.id,))
    return None


async def _mailbox(session: AsyncSession, address: str) -> Mailbox | None:
    try:
        canonical = normalise_address(address)
    except UserError:
        return None
    return await session.scalar(select(Mailbox).where(Mailbox.address == canonical))

"""Policy step: the trust-space rules, written once for every door.

Each check raises ``MailRefusal`` with the reply that names the rule:

- never an open relay: source routes, percent hacks, bang paths, quoted local
  parts and address literals are refused outright (RFC 5321 3.6.2, 4.1.1.3);
  only our domains and trusted domains exist (DESIGN: rules of the trust space);
- an authenticated user sends only as a mailbox it owns or is delegated;
- the relay door accepts mail for our mailboxes only, from a trusted domain
  the client certificate speaks for (rule below, ``certificate_speaks_for``);
- a patient writes only to a professional who wrote first (or to a configured
  first-contact address such as a pharmacy), never to another patient;
- opposed and closed patient spaces receive nothing;
- the header From is who is sending (``check_author``): on submission every From mailbox is the login's
  own or delegated to it, a delegate's ``Sender:`` names the login (added when absent); on the relay door
  the From domain is never ours and lies in the same trust-list organisation as MAIL FROM (for a bounce:
  one the client certificate speaks for). DKIM is verified on the relay door and recorded in
  Authentication-Results; ``dkim=none``/``fail`` is recorded, not a refusal (RFC 6376 6.3: a failed
  signature is as none), because the peer is already authenticated by its verified certificate and the
  From alignment above refuses our own domains whatever a signature says;
- ``<Postmaster>`` (no domain) is the postmaster of the primary domain, and
  ``postmaster@`` every local domain exists (RFC 5321 4.5.1): an address with a
  mailbox of its own gets it, any other goes to the ``[smtp] postmaster``
  mailbox; without that setting it is refused with a reply that names it.
  Anyone may write to the postmaster, a patient too (it is how mail problems
  are reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formataddr

from gateway.directory.addresses import AddressError, normalise_address, normalise_domain
from gateway.directory.generation import AnswerCache
from gateway.directory.service import DirectoryService, LocalRoute, RefusedRoute, RemoteRoute, Route, RouteRefusal
from gateway.errors import UserError
from gateway.pipeline.conversations import ConversationBook, ConversationChange, ends_conversation
from gateway.pipeline.origin import Origin, TlsInfo
from gateway.pipeline.parse import MessageFacts, parse_mailbox_list
from gateway.mail import codes
from gateway.mail.codes import MailRefusal
from gateway.mail.paths import POSTMASTER, SmtpPath
from gateway.queue.local_failures import ROUTE_REFUSALS

# Routes that follow from the directory's rows alone (no clock): kept in the acceptance cache until the
# directory's generation moves. Remote routes and untrusted domains depend on trust-list validity windows.
GENERATION_BOUND_REFUSALS = frozenset({RouteRefusal.UNKNOWN_MAILBOX, RouteRefusal.MAILBOX_DISABLED,
                                       RouteRefusal.PATIENT_OPPOSED, RouteRefusal.PATIENT_CLOSED})


@dataclass(frozen=True)
class AcceptedRecipient:
    address: str                     # canonical form
    route: LocalRoute | RemoteRoute


def check_address_form(path: SmtpPath) -> None:
    """Refuse the classic relay tricks before any lookup (RFC 5321 3.6.2: no open relay)."""
    if path.source_route:
        raise MailRefusal(codes.SOURCE_ROUTE_REFUSED)          # RFC 5321 4.1.1.3 / appendix C
    if path.quoted:
        raise MailRefusal(codes.QUOTED_LOCAL_PART_REFUSED)     # "a@b"@ours hides another address
    if path.has_percent_hack:
        raise MailRefusal(codes.PERCENT_HACK_REFUSED)          # a%b@ours -> a@b
    if path.has_bang_path:
        raise MailRefusal(codes.BANG_PATH_REFUSED)             # b!a@ours -> UUCP a at b
    if path.address_literal:
        raise MailRefusal(codes.DOMAIN_NOT_TRUSTED.format(domain=path.domain))


def canonical(path: SmtpPath) -> str:
    try:
        return normalise_address(path.address)
    except UserError as exc:
        raise MailRefusal(codes.MALFORMED_ADDRESS.format(detail=str(exc))) from None


def certificate_speaks_for(tls: TlsInfo | None, domain: str) -> bool:
    """The relay rule: a DNS name of the verified client certificate (SAN, else CN) is the sender's
    domain, a host inside it (``mx.ch-a.mssante.fr`` speaks for ``ch-a.mssante.fr``), or a
    wildcard ``*.domain`` over it. Operators' certificates name their MX hosts, which live in
    their mail domain in the MSSanté space."""
    for name in server_names(tls):
        bare = name[2:] if name.startswith("*.") else name
        if bare == domain or bare.endswith("." + domain):
            return True
    return False


def server_names(tls: TlsInfo | None) -> tuple[str, ...]:
    """The host names (SAN dNSName, else CN; RFC 6125 6.4.4) of a verified client certificate, in A-label
    form; a name that is no host name (a mailbox certificate's address, RFC 8550) names no mail server."""
    if tls is None or tls.peer_certificate_sha256 is None:
        return ()
    names = []
    for name in tls.peer_names:
        wildcard = name.startswith("*.")
        try:
            host = normalise_domain(name[2:] if wildcard else name)
        except AddressError:
            continue
        names.append("*." + host if wildcard else host)
    return tuple(names)


class Policy:
    def __init__(self, directory: DirectoryService, conversations: ConversationBook,
                 patient_first_contact: Sequence[str], *, postmaster: str = "", primary_domain: str = "") -> None:
        self.directory = directory
        self.conversations = conversations
        self.first_contact = {entry.strip().lower() for entry in patient_first_contact if entry.strip()}
        self.postmaster = postmaster.strip()              # the hosted mailbox that reads postmaster mail
        self.primary_domain = primary_domain.strip().lower()

    # ----------------------------------------------------------------- MAIL FROM

    async def check_sender(self, origin: Origin, path: SmtpPath | None) -> str:
        """The canonical sender ("" for the null path) if this origin may use it."""
        if origin.door.is_submission:
            return self._check_submitter(origin, path)
        return await self._check_relay_sender(origin, path)

    def _check_submitter(self, origin: Origin, path: SmtpPath | None) -> str:
        if origin.account is None:
            raise MailRefusal(codes.AUTH_REQUIRED)                 # RFC 6409 4.3, never unauthenticated
        if path is None:
            raise MailRefusal(codes.NULL_SENDER_REFUSED)
        check_address_form(path)
        sender = canonical(path)
        if not origin.account.may_send_as(sender):
            raise MailRefusal(codes.NOT_OWNER.format(address=sender, login=origin.account.address))
        return sender

    async def _check_relay_sender(self, origin: Origin, path: SmtpPath | None) -> str:
        if path is None:
            # A bounce (RFC 5321 4.5.5): the certificate must still belong to a trusted operator's mail server.
            if not server_names(origin.tls):
                raise MailRefusal(codes.CERTIFICATE_NAMES_NO_SERVER.format(names=_names(origin.tls)))
            if not await self._certificate_is_trusted_operator(origin.tls):
                raise MailRefusal(codes.CERTIFICATE_DOMAIN_MISMATCH.format(
                    names=_names(origin.tls), domain="any trusted domain"))
            return ""
        check_address_form(path)
        sender = canonical(path)
        domain = sender.split("@", 1)[1]
        if await self.directory.is_local_domain(domain):
            raise MailRefusal(codes.SENDER_DOMAIN_IS_LOCAL.format(domain=domain))
        if not await self.directory.is_trusted_domain(domain):
            raise MailRefusal(codes.DOMAIN_NOT_TRUSTED.format(domain=domain))
        if not certificate_speaks_for(origin.tls, domain):
            raise MailRefusal(codes.CERTIFICATE_DOMAIN_MISMATCH.format(names=_names(origin.tls), domain=domain))
        return sender

    async def _certificate_is_trusted_operator(self, tls: TlsInfo | None) -> bool:
        for name in server_names(tls):
            labels = name.removeprefix("*.").split(".")
            for start in range(len(labels) - 1):
                if await self.directory.is_trusted_domain(".".join(labels[start:])):
                    return True
        return False

    # ----------------------------------------------------------------- RCPT TO

    async def check_recipient(self, origin: Origin, sender: str, path: SmtpPath,
                              answers: AnswerCache | None = None) -> AcceptedRecipient:
        check_address_form(path)
        address = f"{POSTMASTER}@{self.primary_domain}" if path.is_bare_postmaster else canonical(path)
        route = await self._route(address, answers)
        postmaster = False
        if isinstance(route, RefusedRoute) and await self._is_local_postmaster(route):
            route, postmaster = await self._postmaster_route(address), True
        if isinstance(route, RefusedRoute):
            raise _refusal(route)
        if isinstance(route, RemoteRoute) and not origin.door.is_submission:
            raise MailRefusal(codes.RELAY_DENIED.format(address=address))   # peers relay to us, not through us
        if origin.is_patient and not postmaster:
            await self._check_patient_may_write(origin, route)
        return AcceptedRecipient(route.address, route)

    async def _route(self, address: str, answers: AnswerCache | None) -> Route:
        """The directory's route, from the acceptance cache when it holds one that the clock cannot change."""
        if answers is None:
            return await self.directory.route_recipient(address)
        fresh: list[Route] = []

        async def generation_bound() -> Route | None:
            route = await self.directory.route_recipient(address)
            fresh.append(route)
            bound = isinstance(route, LocalRoute) or (isinstance(route, RefusedRoute)
                                                      and route.reason in GENERATION_BOUND_REFUSALS)
            return route if bound else None

        cached = await answers.get("route", address, generation_bound)
        if cached is not None:
            return cached
        return fresh[0] if fresh else await self.directory.route_recipient(address)

    async def _is_local_postmaster(self, route: RefusedRoute) -> bool:
        """``postmaster@`` one of our domains without a mailbox of its own (RFC 5321 4.5.1: it must exist)."""
        local, _, domain = route.address.rpartition("@")
        return (route.reason is RouteRefusal.UNKNOWN_MAILBOX and local == POSTMASTER
                and await self.directory.is_local_domain(domain))

    async def _postmaster_route(self, address: str) -> LocalRoute:
        """The configured postmaster mailbox, which must be hosted here and active."""
        if not self.postmaster:
            raise MailRefusal(codes.POSTMASTER_NOT_CONFIGURED.format(address=address),
                              detail="[smtp] postmaster is empty")
        route = await self.directory.route_recipient(self.postmaster)
        if not isinstance(route, LocalRoute):                   # a misconfiguration, told as such
            raise MailRefusal(codes.POSTMASTER_NOT_CONFIGURED.format(address=address),
                              detail=f"[smtp] postmaster {self.postmaster} is not an active mailbox here: "
                                     f"{getattr(route, 'text', 'hosted by another operator')}")
        return route

    async def _check_patient_may_write(self, origin: Origin, route: LocalRoute | RemoteRoute) -> None:
        assert origin.account is not None
        if isinstance(route, LocalRoute) and route.type == "PAT":
            raise MailRefusal(codes.PATIENT_TO_PATIENT)
        address = route.address
        if address in self.first_contact or "@" + address.split("@", 1)[1] in self.first_contact:
            return                                                      # the pharmacy exception (mssante.md 2.1)
        if not await self.conversations.is_open(address, origin.account.mailbox_id):
            raise MailRefusal(codes.PATIENT_CANNOT_INITIATE.format(address=address))

    # ----------------------------------------------------------------- the author (header From)

    async def check_author(self, origin: Origin, sender: str, facts: MessageFacts) -> list[str]:
        """The header From must be who is sending (RFC 5322 3.6.2); the fields to add (a delegate's Sender).

        Submission: every From mailbox is owned by or delegated to the login; when the From is not the
        login's own mailbox (a delegate writing as the delegator, or several authors), ``Sender:`` names
        the login, added when absent, refused when it names anyone else.
        Relay door: every From domain is a trusted domain, not ours, in the same organisation (the
        trust-list domain it is or is under) as MAIL FROM, or, for a bounce, one the certificate speaks for.
        """
        authors = _authors(facts)
        if origin.door.is_submission:
            return self._check_submitted_author(origin, authors, facts)
        await self._check_relayed_author(origin, sender, authors)
        return []

    def _check_submitted_author(self, origin: Origin, authors: list[str], facts: MessageFacts) -> list[str]:
        account = origin.account
        assert account is not None, "submission is authenticated before DATA"
        for address in authors:
            if not account.may_send_as(address):
                raise MailRefusal(codes.FROM_NOT_OWNED.format(address=address, login=account.address))
        senders = facts.all("Sender")
        if len(senders) > 1:
            raise MailRefusal(codes.SENDER_REPEATED.format(count=len(senders)))
        if senders:
            agent = _single_mailbox(senders[0], "Sender")
            if agent != account.address:
                raise MailRefusal(codes.SENDER_NOT_LOGIN.format(address=agent, login=account.address))
            return []
        if authors == [account.address]:
            return []
        # RFC 5322 3.6.2: the agent responsible for the transmission, when it is not the sole author.
        return ["Sender: " + formataddr((account.display_name or "", account.address), charset="utf-8")]

    async def _check_relayed_author(self, origin: Origin, sender: str, authors: list[str]) -> None:
        envelope_organisation = await self._organisation_of(sender.rpartition("@")[2]) if sender else None
        for address in authors:
            domain = address.rpartition("@")[2]
            if await self.directory.is_local_domain(domain):
                raise MailRefusal(codes.FROM_DOMAIN_IS_LOCAL.format(domain=domain))
            organisation = await self._organisation_of(domain)
            if sender:
                if organisation is None or organisation != envelope_organisation:
                    raise MailRefusal(codes.FROM_NOT_ALIGNED.format(
                        domain=domain, organisation=envelope_organisation or sender.rpartition("@")[2]))
            elif organisation is None or not certificate_speaks_for(origin.tls, organisation):
                raise MailRefusal(codes.FROM_NOT_SPOKEN_FOR.format(domain=domain, names=_names(origin.tls)))

    async def _organisation_of(self, domain: str) -> str | None:
        """The trusted domain ``domain`` is or lies under (the trust list, not a public-suffix guess, says
        what an organisation is in the MSSanté space: all operators share mssante.fr)."""
        labels = domain.split(".")
        for start in range(len(labels) - 1):
            candidate = ".".join(labels[start:])
            if await self.directory.is_trusted_domain(candidate):
                return candidate
        return None

    # ----------------------------------------------------------------- the message

    def conversation_changes(self, origin: Origin, sender: str, recipients: Sequence[AcceptedRecipient],
                             facts: MessageFacts) -> list[ConversationChange]:
        """A professional writing to our patients opens (or, with FIN, closes) the conversation."""
        if not sender or origin.is_patient:
            return []
        ending = ends_conversation(facts)
        return [ConversationChange(sender, r.route.mailbox_id, ending) for r in recipients
                if isinstance(r.route, LocalRoute) and r.route.type == "PAT"]


def _refusal(route: RefusedRoute) -> MailRefusal:
    reply = ROUTE_REFUSALS[route.reason]
    return MailRefusal(reply.format(address=route.address, domain=route.address.rpartition("@")[2], detail=route.text),
                       detail=route.text)


def _authors(facts: MessageFacts) -> list[str]:
    """The one From field's mailboxes, canonical (RFC 5322 3.6: exactly one From, a mailbox-list)."""
    fields = facts.all("From")
    if not fields:
        raise MailRefusal(codes.FROM_MISSING)
    if len(fields) > 1:
        raise MailRefusal(codes.FROM_REPEATED.format(count=len(fields)))
    authors = parse_mailbox_list(fields[0])
    if authors.group:
        raise MailRefusal(codes.FROM_GROUP)
    if authors.problem is not None:
        raise MailRefusal(codes.FROM_NO_MAILBOX.format(detail=authors.problem))
    return [_canonical_header_address(address, "From") for address in authors.addresses]


def _single_mailbox(value: str, name: str) -> str:
    parsed = parse_mailbox_list(value)
    if parsed.group or parsed.problem is not None or len(parsed.addresses) != 1:
        raise MailRefusal(codes.FROM_NO_MAILBOX.with_text(f"{name}: header must name one mailbox (RFC 5322 3.6.2)"))
    return _canonical_header_address(parsed.addresses[0], name)


def _canonical_header_address(address: str, name: str) -> str:
    try:
        return normalise_address(address)
    except UserError as exc:
        raise MailRefusal(codes.FROM_NO_MAILBOX.with_text(f"{name}: header address {address!r} is malformed: {exc}")) \
            from None


def _names(tls: TlsInfo | None) -> str:
    return ", ".join(tls.peer_names) if tls and tls.peer_names else "no certificate"

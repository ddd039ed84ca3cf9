"""Why a local delivery did not happen, and whether to try again.

Local delivery ends like remote delivery (RFC 5321 4.5.4.1: a message is not
retried forever): each failure is classified once, here, as

- **permanent** at once: the mailbox was deleted, disabled, or its patient
  closed or opposed their space after the message was accepted (the route the
  directory gives now, RFC 3463 X.1.1 / X.2.1); the store says the mailbox is
  not hosted here;
- **temporary** until ``smtp.local_queue_lifetime_hours`` after arrival: the
  mailbox is over quota (4.2.2, which becomes 5.2.2, RFC 3463 3.3 "Mailbox
  full"), the store is busy or failed (4.3.0, which becomes 5.4.7, RFC 3463 3.5
  "Delivery time expired").

A final failure is reported to the sender by an RFC 3464 DSN (gateway.queue.local_delivery).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.directory.service import RefusedRoute, RouteRefusal
from gateway.errors import UserError
from gateway.mail import codes
from gateway.mail.codes import Reply
from gateway.mailstore.errors import MailboxNotHosted, QuotaExceeded

STORE_ERROR = Reply(451, "4.3.0", "Local delivery failed: {detail}")            # RFC 3463 3.4 (X.3.0)
# RFC 3463 3.4 X.3.2 "System not accepting network messages" (excessive load): local delivery is behind by
# smtp.local_backlog_limit messages; the client keeps its copy and tries again (RFC 5321 4.2.5, 451).
BACKLOG_FULL = Reply(451, "4.3.2", "Local delivery is behind; message not accepted now, try again later")
LIFETIME_EXPIRED = "5.4.7"                                                       # RFC 3463 3.5: delivery time expired

# Why the directory refuses an address, as a reply: at RCPT time (gateway.pipeline.policy) and again before
# each local delivery attempt, when the mailbox changed since acceptance (refused_route below).
ROUTE_REFUSALS: dict[RouteRefusal, Reply] = {
    RouteRefusal.UNKNOWN_MAILBOX: codes.UNKNOWN_MAILBOX,
    RouteRefusal.MAILBOX_DISABLED: codes.MAILBOX_DISABLED,
    RouteRefusal.PATIENT_OPPOSED: codes.PATIENT_OPPOSED,
    RouteRefusal.PATIENT_CLOSED: codes.PATIENT_CLOSED,
    RouteRefusal.DOMAIN_NOT_TRUSTED: codes.DOMAIN_NOT_TRUSTED,
    RouteRefusal.MALFORMED: codes.MALFORMED_ADDRESS,
}


@dataclass(frozen=True)
class LocalFailure:
    """One failed local delivery attempt: the reply that describes it and whether it is final."""

    reply: Reply
    permanent: bool

    @property
    def status(self) -> str:
        """The RFC 3463 code for the DSN's Status field (RFC 3464 2.3.4)."""
        return self.reply.enhanced

    @property
    def diagnostic(self) -> str:
        """As an SMTP reply line, for Diagnostic-Code (RFC 3464 2.3.6) and the queue's last error."""
        return f"{self.reply.code} {self.reply.enhanced} {self.reply.text}"

    def expired(self, hours: float) -> "LocalFailure":
        """The temporary failure made final by the queue lifetime: 4.2.2 -> 552 5.2.2, others -> 5.4.7."""
        if self.permanent:
            return self
        if self.reply.enhanced == codes.MAILBOX_FULL.enhanced:
            reply = Reply(552, "5.2.2", f"{self.reply.text}; still so after {hours:g} h, delivery abandoned")
        else:
            reply = Reply(554, LIFETIME_EXPIRED, f"{self.reply.text}; not delivered within {hours:g} h, abandoned")
        return LocalFailure(reply, permanent=True)


def refused_route(route: RefusedRoute) -> LocalFailure:
    """The directory no longer routes the address to a mailbox here: permanent, with the RCPT-time reply."""
    reply = ROUTE_REFUSALS[route.reason]
    return LocalFailure(reply.format(address=route.address, domain=route.address.rpartition("@")[2],
                                     detail=route.text), permanent=True)


def mailbox_gone(address: str) -> LocalFailure:
    """The recipient's mailbox row was deleted after acceptance (its queue row lost the mailbox id)."""
    return LocalFailure(codes.UNKNOWN_MAILBOX.format(address=address), permanent=True)


def store_error(address: str, exc: BaseException) -> LocalFailure:
    """A refusal or failure of the mail store while filing the message."""
    if isinstance(exc, QuotaExceeded):
        return LocalFailure(codes.MAILBOX_FULL.format(address=address), permanent=False)
    if isinstance(exc, MailboxNotHosted):
        return LocalFailure(codes.UNKNOWN_MAILBOX.format(address=address), permanent=True)
    detail = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return LocalFailure(STORE_ERROR.format(detail=" ".join(detail.split())[:300]), permanent=False)

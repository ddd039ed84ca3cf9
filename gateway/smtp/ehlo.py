"""The EHLO reply: every extension we offer, declared once, with its RFC.

What is offered depends on the connection (TLS or not, a verified client
certificate, the listener kind) and on configuration; ``disabled`` switches an
extension off by keyword, to work around a client quirk without a code change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EhloContext:
    """What the offer depends on, computed by the protocol layer for one EHLO."""

    tls_active: bool
    starttls_possible: bool
    max_message_size: int
    auth_mechanisms: tuple[str, ...]    # mechanisms usable now (empty: do not offer AUTH)


@dataclass(frozen=True)
class Extension:
    keyword: str
    rfc: str
    offered: Callable[[EhloContext], bool]
    render: Callable[[EhloContext], str]


def _always(_: EhloContext) -> bool:
    return True


def _plain(keyword: str) -> Callable[[EhloContext], str]:
    return lambda _: keyword


EXTENSIONS: tuple[Extension, ...] = (
    # RFC 1870 4: SIZE with the fixed maximum, so clients refuse big messages before sending them.
    Extension("SIZE", "RFC 1870", _always, lambda ctx: f"SIZE {ctx.max_message_size}"),
    Extension("8BITMIME", "RFC 6152", _always, _plain("8BITMIME")),
    Extension("SMTPUTF8", "RFC 6531", _always, _plain("SMTPUTF8")),
    Extension("PIPELINING", "RFC 2920", _always, _plain("PIPELINING")),
    Extension("ENHANCEDSTATUSCODES", "RFC 2034", _always, _plain("ENHANCEDSTATUSCODES")),
    Extension("DSN", "RFC 3461", _always, _plain("DSN")),
    # RFC 3207 4: STARTTLS is not offered again once TLS is active.
    Extension("STARTTLS", "RFC 3207", lambda ctx: ctx.starttls_possible and not ctx.tls_active, _plain("STARTTLS")),
    # RFC 4954 4 + our rule: AUTH only over TLS; EXTERNAL (RFC 4422 A) only with a verified
    # client certificate; OAUTHBEARER (RFC 7628) / XOAUTH2 only with a token verifier.
    Extension("AUTH", "RFC 4954", lambda ctx: bool(ctx.auth_mechanisms),
              lambda ctx: "AUTH " + " ".join(ctx.auth_mechanisms)),
    Extension("HELP", "RFC 5321 4.1.1.8", _always, _plain("HELP")),
)


def ehlo_keywords(context: EhloContext, disabled: frozenset[str] = frozenset()) -> list[str]:
    """The extension lines of the EHLO reply, in declaration order."""
    return [ext.render(context) for ext in EXTENSIONS if ext.keyword not in disabled and ext.offered(context)]

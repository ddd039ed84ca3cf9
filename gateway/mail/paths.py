"""The reverse-path and forward-path of MAIL FROM and RCPT TO (RFC 5321 4.1.2).

This module only reads the grammar; it never decides. It reports what a policy
needs to refuse relay tricks: a source route (``<@a,@b:user@c>``, RFC 5321
4.1.1.3 and appendix C), a quoted local part (RFC 5321 4.1.2 Quoted-string),
an address literal (``user@[192.0.2.1]``, RFC 5321 4.1.3), and the characters
``%`` and ``!`` that the old percent hack and UUCP bang paths rely on.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from gateway.mail.codes import MALFORMED_ADDRESS, SYNTAX_PARAMS, MailRefusal

# RFC 5321 4.1.2: atext characters of a Dot-string (RFC 6531 3.3 adds UTF-8 non-ASCII).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_STRING = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_DOMAIN_LABEL = re.compile(r"^[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?$")
_AT_DOMAIN = re.compile(r"^@[^\s,:@<>]+$")
MAX_LOCAL_PART = 64      # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255         # RFC 5321 4.5.3.1.2
MAX_PATH = 256           # RFC 5321 4.5.3.1.3
POSTMASTER = "postmaster"  # RFC 5321 4.5.1: case-insensitive, with or without a domain


@dataclass(frozen=True)
class SmtpPath:
    """A parsed path. ``local_part`` keeps its quotes out; ``quoted`` says it had them."""

    local_part: str
    domain: str
    source_route: tuple[str, ...] = ()
    quoted: bool = False
    address_literal: bool = False

    @functools.cached_property
    def address(self) -> str:
        """``local-part@domain`` (quoted as it came), made once: the server, the policy and the queue ask it."""
        local = f'"{self.local_part}"' if self.quoted else self.local_part
        return f"{local}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()

    @property
    def has_percent_hack(self) -> bool:
        return "%" in self.local_part

    @property
    def has_bang_path(self) -> bool:
        return "!" in self.local_part

    @property
    def is_bare_postmaster(self) -> bool:
        """``RCPT TO:<Postmaster>`` without a domain (RFC 5321 4.1.1.3, 4.5.1): the postmaster of this server."""
        return self.domain == "" and self.local_part == POSTMASTER


def split_path_argument(argument: str) -> tuple[str, str]:
    """Split ``<path> params`` into the path text (with brackets) and the rest.

    Clients sometimes omit the angle brackets; a bare path runs to the first space.
    """
    text = argument.lstrip()
    if not text.startswith("<"):
        path, _, rest = text.partition(" ")
        return path, rest.strip()
    if '"' not in text:                                  # no quoted local part: the path ends at the first '>'
        end = text.find(">")
        if end >= 0:
            return text[: end + 1], text[end + 1:].strip()
    in_quotes = False
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return text[: index + 1], text[index + 1:].strip()
    raise MailRefusal(SYNTAX_PARAMS.format(detail="path has no closing '>'"))


def parse_path(path_text: str, *, allow_null: bool, allow_postmaster: bool = False) -> SmtpPath | None:
    """Parse ``<...>`` (or a bare mailbox). ``None`` is the null reverse-path ``<>``; with
    ``allow_postmaster`` (RCPT TO), ``<Postmaster>`` in any case is a path without a domain.

    A path parsed before is answered from a bounded cache: a client sends the same MAIL FROM and RCPT TO
    transaction after transaction, and ``SmtpPath`` is immutable. A refusal is not cached (raised again)."""
    return _parse_path_cached(path_text, allow_null, allow_postmaster)


@functools.lru_cache(maxsize=4096)
def _parse_path_cached(path_text: str, allow_null: bool, allow_postmaster: bool) -> SmtpPath | None:
    return _parse_path(path_text, allow_null=allow_null, allow_postmaster=allow_postmaster)


def _parse_path(path_text: str, *, allow_null: bool, allow_postmaster: bool = False) -> SmtpPath | None:
    inner = path_text[1:-1] if path_text.startswith("<") and path_text.endswith(">") else path_text
    if inner == "":
        if allow_null:
            return None  # RFC 5321 4.5.5: the null reverse-path of notifications
        raise MailRefusal(MALFORMED_ADDRESS.format(detail="empty path"))
    if allow_postmaster and inner.lower() == POSTMASTER:
        return SmtpPath(local_part=POSTMASTER, domain="")   # RFC 5321 4.1.1.3: "RCPT TO:<Postmaster>"
    if len(inner) > MAX_PATH:
        raise MailRefusal(MALFORMED_ADDRESS.format(detail=f"path longer than {MAX_PATH} octets"))
    route, mailbox = _split_source_route(inner)
    local, quoted, domain = _split_mailbox(mailbox)
    literal = domain.startswith("[") and domain.endswith("]")
    if not literal:
        _check_domain(domain)
    return SmtpPath(local_part=local, domain=domain, source_route=route, quoted=quoted, address_literal=literal)


def _split_source_route(inner: str) -> tuple[tuple[str, ...], str]:
    """RFC 5321 4.1.2: A-d-l = At-domain *( "," At-domain ), followed by ":" and the mailbox."""
    if not inner.startswith("@"):
        return (), inner
    route_text, colon, mailbox = inner.partition(":")
    hops = tuple(hop.strip() for hop in route_text.split(","))
    if not colon or not all(_AT_DOMAIN.match(hop) for hop in hops):
        raise MailRefusal(MALFORMED_ADDRESS.format(detail="bad source route"))
    return tuple(hop[1:] for hop in hops), mailbox


def _split_mailbox(mailbox: str) -> tuple[str, bool, str]:
    if mailbox.startswith('"'):
        local, rest = _read_quoted_string(mailbox)
        if not rest.startswith("@"):
            raise MailRefusal(MALFORMED_ADDRESS.format(detail="missing @domain"))
        return local, True, rest[1:]
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise MailRefusal(MALFORMED_ADDRESS.format(detail="expected local-part@domain"))
    if len(local.encode()) > MAX_LOCAL_PART or not _DOT_STRING.match(local):
        raise MailRefusal(MALFORMED_ADDRESS.format(detail=f"local part {local!r} is not a dot-string (RFC 5321 4.1.2)"))
    return local, False, domain


def _read_quoted_string(text: str) -> tuple[str, str]:
    """RFC 5321 4.1.2 Quoted-string: DQUOTE *QcontentSMTP DQUOTE, with backslash pairs."""
    chars: list[str] = []
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            chars.append(text[index + 1])
            index += 2
            continue
        if char == '"':
            return "".join(chars), text[index + 1:]
        chars.append(char)
        index += 1
    raise MailRefusal(MALFORMED_ADDRESS.format(detail="unterminated quoted local part"))


def _check_domain(domain: str) -> None:
    labels = domain.rstrip(".").split(".")
    if len(domain) > MAX_DOMAIN or len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise MailRefusal(MALFORMED_ADDRESS.format(detail=f"{domain!r} is not a domain name"))

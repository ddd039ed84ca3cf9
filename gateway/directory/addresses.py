"""Mail addresses and domain names in their canonical, comparable form.

Domains are compared as lower-case A-labels (IDNA 2008, UTS #46 mapping), so
``hôpital.mssante.fr`` and ``xn--hpital-6ua.mssante.fr`` are the same domain
(ANS whitelist names may be Unicode). Local parts keep their case on the wire
but are compared lower-cased: MSSanté addresses are case-insensitive in practice.
"""

from __future__ import annotations

import re
from functools import lru_cache

import idna

from gateway.errors import UserError


class AddressError(UserError):
    """A malformed address or domain name."""


_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# RFC 5321 4.1.2 dot-string local part (we do not host quoted local parts).
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


@lru_cache(maxsize=4096)  # bulk imports and routing see the same few domains again and again
def normalise_domain(name: str, *, field: str = "domain") -> str:
    """The lower-case A-label form of ``name``; AddressError if it is not a valid host name."""
    raw = name.strip().rstrip(".")
    if not raw:
        raise AddressError("empty domain name", field=field)
    try:
        ascii_name = idna.encode(raw, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise AddressError(f"{name!r} is not a valid domain name: {exc}", field=field) from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"{name!r} is not a valid domain name (at least two labels of letters, digits and hyphens)", field=field)
    return ascii_name


def display_domain(ascii_name: str) -> str:
    """The Unicode form for people (xn--hpital-6ua -> hôpital)."""
    try:
        return idna.decode(ascii_name)
    except idna.IDNAError:
        return ascii_name


def split_address(address: str, *, field: str = "address") -> tuple[str, str]:
    """(local part, canonical domain) of ``local@domain``; AddressError when malformed."""
    value = address.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    local, at, domain = value.rpartition("@")
    if not at or not local:
        raise AddressError(f"{address!r} is not a mail address (local@domain)", field=field)
    if len(local) > 64 or not _LOCAL.match(local):
        raise AddressError(f"{address!r}: the local part {local!r} is not a plain dot-string (RFC 5321 4.1.2)", field=field)
    return local, normalise_domain(domain, field=field)


@lru_cache(maxsize=4096)  # every MAIL FROM and RCPT TO asks it, for the same few addresses (a refusal is not kept)
def normalise_address(address: str, *, field: str = "address") -> str:
    """The canonical form used as the directory key: lower-case local part @ A-label domain."""
    local, domain = split_address(address, field=field)
    return f"{local.lower()}@{domain}"

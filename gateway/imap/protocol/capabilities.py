"""The one list of IMAP capabilities we announce (RFC 3501 7.2.1), each with its RFC.

The list depends on the connection's state: before TLS only STARTTLS and
LOGINDISABLED matter (RFC 3501 6.2.1, 6.2.3: no plaintext passwords); after TLS
the SASL mechanisms; after login the extensions.  Any entry can be switched off
by name (configuration) to work around a client quirk, as mox does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionState:
    """What the capability list depends on."""

    tls: bool = False
    authenticated: bool = False
    client_certificate: bool = False      # a verified TLS client certificate was presented


@dataclass(frozen=True)
class CapabilityEntry:
    name: str
    rfc: str
    when: Callable[[ConnectionState], bool]


def _always(state: ConnectionState) -> bool:
    return True


def _before_tls(state: ConnectionState) -> bool:
    return not state.tls and not state.authenticated


def _tls_unauthenticated(state: ConnectionState) -> bool:
    return state.tls and not state.authenticated


def _with_client_certificate(state: ConnectionState) -> bool:
    return _tls_unauthenticated(state) and state.client_certificate


def _authenticated(state: ConnectionState) -> bool:
    return state.authenticated


CAPABILITIES: tuple[CapabilityEntry, ...] = (
    CapabilityEntry("IMAP4rev1", "RFC 3501", _always),
    CapabilityEntry("STARTTLS", "RFC 3501 6.2.1", _before_tls),
    CapabilityEntry("LOGINDISABLED", "RFC 3501 6.2.3", _before_tls),
    CapabilityEntry("AUTH=PLAIN", "RFC 4616", _tls_unauthenticated),
    CapabilityEntry("AUTH=EXTERNAL", "RFC 4422 appendix A", _with_client_certificate),
    CapabilityEntry("SASL-IR", "RFC 4959", _tls_unauthenticated),
    CapabilityEntry("LITERAL+", "RFC 7888", _always),
    CapabilityEntry("ID", "RFC 2971", _always),
    CapabilityEntry("ENABLE", "RFC 5161", _authenticated),
    CapabilityEntry("IDLE", "RFC 2177", _authenticated),
    CapabilityEntry("UIDPLUS", "RFC 4315", _authenticated),
    CapabilityEntry("MOVE", "RFC 6851", _authenticated),
    CapabilityEntry("NAMESPACE", "RFC 2342", _authenticated),
    CapabilityEntry("UNSELECT", "RFC 3691", _authenticated),
    CapabilityEntry("CHILDREN", "RFC 3348", _authenticated),
    CapabilityEntry("LIST-EXTENDED", "RFC 5258", _authenticated),
    CapabilityEntry("LIST-STATUS", "RFC 5819", _authenticated),
    CapabilityEntry("SPECIAL-USE", "RFC 6154", _authenticated),
    CapabilityEntry("CREATE-SPECIAL-USE", "RFC 6154 3", _authenticated),
    CapabilityEntry("CONDSTORE", "RFC 7162", _authenticated),
    CapabilityEntry("ESEARCH", "RFC 4731", _authenticated),
    CapabilityEntry("QUOTA", "RFC 9208", _authenticated),
    CapabilityEntry("QUOTA=RES-STORAGE", "RFC 9208 5.1", _authenticated),
    CapabilityEntry("UTF8=ACCEPT", "RFC 6855", _authenticated),
)

KNOWN_NAMES = frozenset(entry.name.upper() for entry in CAPABILITIES)
# RFC 5161 3.1: the capabilities a client may ENABLE.
ENABLEABLE = frozenset({"CONDSTORE", "UTF8=ACCEPT"})


def compute_capabilities(state: ConnectionState, disabled: Iterable[str] = ()) -> tuple[str, ...]:
    """The CAPABILITY list for this state, in declaration order, minus ``disabled`` names."""
    off = {name.upper() for name in disabled}
    return tuple(entry.name for entry in CAPABILITIES
                 if entry.name.upper() not in off and entry.when(state))


def unknown_names(names: Iterable[str]) -> list[str]:
    """Names in a ``disabled`` configuration that match no capability (to warn at start-up)."""
    return [name for name in names if name.upper() not in KNOWN_NAMES]

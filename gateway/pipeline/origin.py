"""Where a message comes from: the door, the client, its TLS session and who it authenticated as.

Every door (SMTP submission, SMTPS, inter-operator relay, later the webmail)
describes its client with an ``Origin``; the pipeline's rules read only this.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from enum import Enum
from typing import cast

from gateway.directory.service import Account


class Door(str, Enum):
    SUBMISSION = "submission"       # RFC 6409 (587, STARTTLS)
    SUBMISSIONS = "submissions"     # RFC 8314 (465, implicit TLS)
    RELAY = "relay"                 # RFC 5321 between operators (25), mutual TLS
    WEBMAIL = "webmail"

    @property
    def is_submission(self) -> bool:
        return self is not Door.RELAY


@dataclass(frozen=True)
class TlsInfo:
    """The negotiated TLS session, for Received and Authentication-Results and for policy."""

    version: str
    cipher: str
    bits: int
    peer_certificate_sha256: str | None = None
    peer_dns_names: tuple[str, ...] = ()
    peer_common_name: str | None = None

    @classmethod
    def from_ssl_object(cls, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> "TlsInfo":
        name, _, bits = ssl_object.cipher() or ("unknown", "", 0)
        der = ssl_object.getpeercert(binary_form=True)
        parsed = ssl_object.getpeercert() if der else None   # a dict only for a verified certificate
        alt_names = cast(tuple[tuple[str, str], ...], (parsed or {}).get("subjectAltName", ()))
        subject = cast(tuple[tuple[tuple[str, str], ...], ...], (parsed or {}).get("subject", ()))
        dns_names = tuple(value.lower() for kind, value in alt_names if kind == "DNS")
        common_name = next((value for rdn in subject for kind, value in rdn if kind == "commonName"), None)
        return cls(
            version=ssl_object.version() or "unknown", cipher=name, bits=int(bits or 0),
            peer_certificate_sha256=hashlib.sha256(der).hexdigest() if der and parsed else None,
            peer_dns_names=dns_names, peer_common_name=common_name,
        )

    @property
    def peer_names(self) -> tuple[str, ...]:
        """RFC 6125 6.4.4: the DNS names of the SAN, else the CN."""
        if self.peer_dns_names:
            return self.peer_dns_names
        return (self.peer_common_name.lower(),) if self.peer_common_name else ()

    def describe(self) -> str:
        return f"{self.version} with cipher {self.cipher} ({self.bits} bits)"


@dataclass(frozen=True)
class Origin:
    door: Door
    client_address: str
    client_port: int | None = None
    helo: str | None = None
    tls: TlsInfo | None = None
    account: Account | None = None
    auth_mechanism: str | None = None

    @property
    def is_patient(self) -> bool:
        return self.account is not None and self.account.type == "PAT"

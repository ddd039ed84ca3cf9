"""DKIM (RFC 6376) over dkimpy: keys per local domain, signing what leaves, verifying what arrives.

- Keys: RSA 2048 (RFC 8301 3.2: at least 1024, 2048 recommended), one file per
  domain and selector, ``<key_dir>/<domain>/<selector>.key``, mode 0600. The
  public half is published as ``<selector>._domainkey.<domain> TXT
  "v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>"`` (RFC 6376 3.6.1).
- Signing: rsa-sha256, relaxed/relaxed canonicalisation (RFC 6376 3.4.2,
  3.4.4), over From, To, Cc, Subject, Date, Message-ID and the MIME fields
  that are present; From and Subject are signed once more than they occur so
  that adding another one breaks the signature (RFC 6376 8.15).
- Verification: every DKIM-Signature, the key fetched through the configured
  resolver (dnsmasq in tests), reported as an RFC 8601 2.7.1 result:
  ``dkim=pass header.d=... header.s=...``, ``dkim=fail (reason)``,
  ``dkim=temperror``/``permerror``, or ``dkim=none`` without a signature.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import dkim
import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import DkimSettings, OutboundSettings, Settings
from gateway.errors import UserError

log = logging.getLogger("gateway.dkim")
KEY_BITS = 2048
SELECTOR_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")     # one DNS label (RFC 6376 3.1)
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}$")
SIGNED_FIELDS = ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "in-reply-to",
                 "references", "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
                 "x-mss-nil", "x-mss-codecda", "x-mss-ins", "x-mss-mes")
OVERSIGNED = ("from", "subject")


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    path: Path
    txt_record: str            # the TXT value to publish

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def zone_line(self) -> str:
        """A zone-file line; long values are split into 255-octet strings (RFC 1035 3.3.14, RFC 6376 3.6.2.2)."""
        chunks = [self.txt_record[i:i + 255] for i in range(0, len(self.txt_record), 255)]
        return f'{self.dns_name}. IN TXT ( ' + " ".join(f'"{chunk}"' for chunk in chunks) + " )"


def key_directory(settings: Settings) -> Path:
    return Path(settings.dkim.key_dir).expanduser().resolve() if settings.dkim.key_dir else settings.data_path / "dkim"


def _check_names(domain: str, selector: str) -> tuple[str, str]:
    domain = domain.strip().lower().rstrip(".")
    if not DOMAIN_RE.match(domain):
        raise UserError(f"{domain!r} is not a domain name", field="domain")
    if not SELECTOR_RE.match(selector):
        raise UserError(f"{selector!r} is not a valid selector (one DNS label)", field="selector")
    return domain, selector


def public_txt_record(private_pem: bytes) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"      # RFC 6376 3.6.1


class DkimKeys:
    """The key directory: one private key per (domain, selector)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, domain: str, selector: str) -> Path:
        domain, selector = _check_names(domain, selector)
        return self.root / domain / f"{selector}.key"

    def generate(self, domain: str, selector: str, *, replace: bool = False) -> DkimKey:
        path = self.path_of(domain, selector)
        if path.exists() and not replace:
            raise UserError(f"a key for {selector}._domainkey.{domain} already exists ({path}); use --replace",
                            field="selector")
        private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        # dkimpy reads PKCS#1 ("RSA PRIVATE KEY") PEM.
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        _write_private(path, pem)
        return DkimKey(path.parent.name, selector, path, public_txt_record(pem))

    def load(self, domain: str, selector: str) -> DkimKey | None:
        path = self.path_of(domain, selector)
        if not path.is_file():
            return None
        return DkimKey(path.parent.name, selector, path, public_txt_record(path.read_bytes()))

    def for_domain(self, domain: str, preferred_selector: str) -> DkimKey | None:
        """The key to sign ``domain``'s mail with: the preferred selector's, else the newest one."""
        try:
            chosen = self.load(domain, preferred_selector)
        except UserError:
            return None
        if chosen is not None:
            return chosen
        candidates = sorted((self.root / domain.lower()).glob("*.key"), key=lambda p: p.stat().st_mtime, reverse=True)
        return self.load(domain, candidates[0].stem) if candidates else None

    def list(self) -> list[DkimKey]:
        found = []
        for path in sorted(self.root.glob("*/*.key")):
            found.append(DkimKey(path.parent.name, path.stem, path, public_txt_record(path.read_bytes())))
        return found


def _write_private(path: Path, pem: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- signing

class DkimSigner:
    def __init__(self, keys: DkimKeys, settings: DkimSettings) -> None:
        self.keys = keys
        self.settings = settings

    def signature_for(self, message: bytes) -> str | None:
        """The ``DKIM-Signature`` field (CRLF-terminated) for ``message``, or None when its From
        domain has no key here (not ours) or signing is off."""
        if not self.settings.sign:
            return None
        domain = from_domain(message)
        key = self.keys.for_domain(domain, self.settings.selector) if domain else None
        if key is None:
            return None
        signer = dkim.DKIM(message)
        present = {name.lower().decode("ascii", "replace") for name, _ in signer.headers}
        fields = [name for name in SIGNED_FIELDS if name in present]
        fields += [name for name in OVERSIGNED if name in present]      # RFC 6376 8.15: sign one more than present
        header = signer.sign(key.selector.encode(), key.domain.encode(), key.path.read_bytes(),
                             canonicalize=(b"relaxed", b"relaxed"), include_headers=[f.encode() for f in fields])
        text: str = header.decode("ascii")
        return text if text.endswith("\r\n") else text.rstrip("\r\n") + "\r\n"

    async def signature_for_stream(self, open_message: Callable[[], BinaryIO]) -> str | None:
        """Sign a spooled message read through ``open_message`` (the spool's decrypting reader)."""
        if not self.settings.sign:
            return None

        def read_and_sign() -> str | None:
            with open_message() as handle:
                return self.signature_for(handle.read())

        return await asyncio.to_thread(read_and_sign)

    async def signature_for_file(self, path: Path) -> str | None:
        """Sign a spooled message (dkimpy needs the whole message: read in a thread, once per message)."""
        if not self.settings.sign:
            return None
        return await asyncio.to_thread(lambda: self.signature_for(path.read_bytes()))


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From address in the header section (RFC 5322 3.6.2)."""
    header_end = re.search(rb"\r?\n\r?\n", message)
    header = message[: header_end.start()] if header_end else message
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", header)
    match = re.search(rb"^from:(.*)$", unfolded, re.IGNORECASE | re.MULTILINE)
    if match is None:
        return None
    addresses = re.findall(rb"[^\s<>,;:\"]+@([A-Za-z0-9.-]+)", match.group(1))
    return addresses[0].decode("ascii").lower().rstrip(".") if addresses else None


# --------------------------------------------------------------------------- verification

class DnsTxtLookup:
    """dkimpy's ``dnsfunc``: TXT records through the configured resolver (synchronous, run in a thread)."""

    def __init__(self, settings: OutboundSettings) -> None:
        self.resolver = dns.resolver.Resolver(configure=not settings.nameserver)
        if settings.nameserver:
            self.resolver.nameservers = [settings.nameserver]
            self.resolver.port = settings.nameserver_port
        self.resolver.lifetime = settings.dns_timeout_seconds

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = self.resolver.resolve(name.decode("ascii").rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None                                          # dkimpy: no key -> permerror below
        except dns.exception.DNSException as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        for record in answer:
            return b"".join(record.strings)                      # RFC 6376 3.6.2.2: strings concatenated
        return None


class DkimVerifier:
    def __init__(self, settings: OutboundSettings) -> None:
        self.lookup = DnsTxtLookup(settings)

    async def verify(self, message: bytes) -> str:
        """RFC 8601 result fragment(s) for every DKIM-Signature, joined by "; "; ``dkim=none`` without one."""
        return await asyncio.to_thread(self._verify_all, message)

    def _verify_all(self, message: bytes) -> str:
        try:
            verifier = dkim.DKIM(message, timeout=5)
        except dkim.MessageFormatError as exc:
            return f"dkim=permerror ({_reason(exc)})"
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        if count == 0:
            return "dkim=none"                                   # RFC 8601 2.7.1
        return "; ".join(self._verify_one(message, index) for index in range(count))

    def _verify_one(self, message: bytes, index: int) -> str:
        verifier = dkim.DKIM(message, timeout=5)
        verifier.pk = None
        try:
            ok = verifier.verify(idx=index, dnsfunc=self.lookup)
        except dkim.DnsTimeoutError as exc:
            return _result("temperror", verifier, f"key lookup: {_reason(exc)}")
        except dkim.ValidationError as exc:
            return _result("fail", verifier, _reason(exc))
        except dkim.DKIMException as exc:
            return _result("permerror", verifier, _reason(exc))
        if not ok and getattr(verifier, "pk", None) is None:
            # dkimpy logs a missing or unusable key and returns False: RFC 6376 6.1.2 makes that a PERMFAIL.
            return _result("permerror", verifier, "no usable public key in DNS")
        return _result("pass" if ok else "fail", verifier, None if ok else "signature did not verify")


def _result(outcome: str, verifier: dkim.DKIM, reason: str | None) -> str:
    fields = verifier.signature_fields or {}
    comment = f" ({reason})" if reason else ""
    properties = ""
    if b"d" in fields:
        properties += f" header.d={fields[b'd'].decode('ascii', 'replace')}"
    if b"s" in fields:
        properties += f" header.s={fields[b's'].decode('ascii', 'replace')}"
    if b"b" in fields:
        # RFC 6008 2: header.b identifies the signature when there are several (first 8 characters).
        properties += f" header.b={re.sub(rb'[^A-Za-z0-9+/=]', b'', fields[b'b'])[:8].decode('ascii')}"
    return f"dkim={outcome}{comment}{properties}"


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"\(got b'[^']*', expected b'[^']*'\)", "", text).strip()     # no hashes in the comment
    return text.replace("(", "[").replace(")", "]")[:200] or type(exc).__name__


async def verify_dkim(message_bytes: bytes, *, settings: OutboundSettings | None = None) -> str:
    """The Authentication-Results fragment for ``message_bytes`` (RFC 8601 2.7.1), resolving keys
    through ``settings.nameserver`` (default: the system resolver)."""
    return await DkimVerifier(settings or OutboundSettings()).verify(message_bytes)

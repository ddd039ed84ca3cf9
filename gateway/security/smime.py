"""S/MIME (RFC 8551) as pure functions over message bytes.

Incoming mail takes one linear, explainable path (the order of the Direct
project's ``DefaultNHINDAgent.processMessage``)::

    decrypt (if enveloped and we hold a key)
      -> verify the signature (multipart/signed or opaque signed-data)
      -> validate the signer's certificate path to the trust anchors
      -> check the signer's address against From
      -> IncomingResult with the unwrapped content and an
         Authentication-Results fragment (RFC 7281 "smime" method)

Outgoing mail is signed first, then encrypted (RFC 8551 3.7), keeping the
routing headers (From, To, Subject, Date, Message-ID...) on the outer message.

The CMS work lives in :mod:`gateway.security.cms`, path validation in
:mod:`gateway.security.certpath`; this module only speaks MIME.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.utils
import quopri
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from cryptography import x509

from gateway.security.certpath import PathResult, Purpose, address_matches, describe_certificate, validate_path
from gateway.security.cms import (
    ContentCipher,
    KeyTransport,
    RecipientKey,
    SignatureResult,
    SigningIdentity,
    SmimeError,
    SmimeFailure,
    build_enveloped_data,
    build_signed_data,
    content_type_of,
    open_enveloped_data,
    verify_signed_data,
)

__all__ = [
    "ContentCipher",
    "DecryptionResult",
    "IncomingResult",
    "KeyTransport",
    "OutgoingOptions",
    "RecipientKey",
    "SignatureResult",
    "SigningIdentity",
    "SmimeError",
    "SmimeFailure",
    "SmimeStatus",
    "encrypt_entity",
    "process_incoming",
    "process_outgoing",
    "sign_entity",
]

CRLF = b"\r\n"
# Nesting allowed when unwrapping (RFC 8551 3.7: e.g. signed, then encrypted, then signed).
MAX_LAYERS = 4
_MICALG = {"sha1": "sha-1", "sha224": "sha-224", "sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}
_PKCS7_MIME = {"application/pkcs7-mime", "application/x-pkcs7-mime"}
_PKCS7_SIGNATURE = {"application/pkcs7-signature", "application/x-pkcs7-signature"}


# ---------------------------------------------------------------------------
# A minimal, byte-exact MIME entity model
# ---------------------------------------------------------------------------


def canonicalize(data: bytes) -> bytes:
    """RFC 8551 3.1.1: canonical line endings are CRLF; bare LF and bare CR become CRLF."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data)


@dataclass(frozen=True)
class HeaderField:
    name: str
    raw: bytes  # the whole field as transmitted, folded lines included, without the final CRLF

    @property
    def value(self) -> str:
        text = self.raw.split(b":", 1)[1] if b":" in self.raw else b""
        return re.sub(r"\r\n[ \t]", " ", text.decode("utf-8", "replace")).strip()

    @property
    def is_content_field(self) -> bool:
        return self.name.lower().startswith("content-")


@dataclass(frozen=True)
class Entity:
    """A MIME entity split into header fields and a body, bytes kept as they came."""

    fields: tuple[HeaderField, ...]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((f.value for f in self.fields if f.name.lower() == wanted), None)

    def content_type(self) -> tuple[str, email.message.Message]:
        parsed = email.message.Message()
        parsed["Content-Type"] = self.header("Content-Type") or "text/plain"
        return parsed.get_content_type(), parsed

    def param(self, name: str) -> str | None:
        value = self.content_type()[1].get_param(name)
        if value is None:
            return None
        return str(email.utils.collapse_rfc2231_value(value))

    def to_bytes(self) -> bytes:
        return render(self.fields, self.body)


def render(fields: Sequence[HeaderField], body: bytes) -> bytes:
    return b"".join(f.raw + CRLF for f in fields) + CRLF + body


def parse_entity(data: bytes) -> Entity:
    """Split canonical (CRLF) bytes into header fields and body (RFC 5322 2.1, 2.2.3)."""
    if data.startswith(CRLF):
        return Entity((), data[2:])
    head, separator, body = data.partition(CRLF + CRLF)
    if not separator:
        head, body = data.rstrip(CRLF), b""
    return Entity(tuple(_header_fields(head)), body)


def _header_fields(head: bytes) -> list[HeaderField]:
    fields: list[HeaderField] = []
    for line in head.split(CRLF):
        if line[:1] in (b" ", b"\t") and fields:
            previous = fields.pop()
            fields.append(HeaderField(previous.name, previous.raw + CRLF + line))
        elif b":" in line:
            fields.append(HeaderField(line.split(b":", 1)[0].decode("ascii", "replace").strip(), line))
        elif line.strip():
            raise SmimeError(SmimeFailure.MALFORMED_MIME, f"header line without a colon: {line[:40]!r}")
    return fields


def field_line(name: str, value: str) -> HeaderField:
    return HeaderField(name, f"{name}: {value}".encode("ascii"))


def base64_lines(data: bytes) -> bytes:
    """Base64 in 76-character CRLF lines (RFC 2045 6.8)."""
    encoded = base64.b64encode(data)
    return b"".join(encoded[i:i + 76] + CRLF for i in range(0, len(encoded), 76))


def decode_body(entity: Entity) -> bytes:
    """The body with its Content-Transfer-Encoding removed."""
    encoding = (entity.header("Content-Transfer-Encoding") or "7bit").strip().lower()
    try:
        if encoding == "base64":
            return base64.b64decode(b"".join(entity.body.split()), validate=True)
        if encoding == "quoted-printable":
            return quopri.decodestring(entity.body)
    except (binascii.Error, ValueError) as exc:
        raise SmimeError(SmimeFailure.MALFORMED_MIME, f"undecodable {encoding} body: {exc}") from exc
    return entity.body


def split_multipart(entity: Entity) -> list[bytes]:
    """The body parts of a multipart entity, byte-exact (RFC 2046 5.1.1).

    The CRLF before each delimiter belongs to the delimiter, so a part is
    everything between the CRLF ending one delimiter line and the CRLF that
    starts the next.
    """
    boundary = entity.param("boundary")
    if not boundary:
        raise SmimeError(SmimeFailure.MALFORMED_MIME, "multipart entity without a boundary parameter")
    delimiter = re.compile(rb"(?:^|\r\n)--" + re.escape(boundary.encode("ascii", "replace")) + rb"(--)?[ \t]*(?=\r\n|$)")
    parts: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(entity.body):
        if start is not None:
            parts.append(entity.body[start:match.start()])
        if match.group(1):
            return parts
        start = match.end() + 2
    raise SmimeError(SmimeFailure.MALFORMED_MIME, "multipart body has no closing delimiter")


# ---------------------------------------------------------------------------
# Outgoing: sign, then encrypt
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingOptions:
    """How to sign and encrypt; defaults follow RFC 8551 2 and what peers accept."""

    detached: bool = True  # multipart/signed, readable by clients without S/MIME
    digest: str = "sha256"
    rsa_pss: bool = False
    cipher: ContentCipher = ContentCipher.AES256_CBC
    key_transport: KeyTransport = KeyTransport.PKCS1V15
    signing_time: datetime | None = None


def _boundary() -> str:
    return "----=_smime_" + secrets.token_hex(12)


def sign_entity(
    entity: bytes,
    identity: SigningIdentity,
    *,
    detached: bool = True,
    digest: str = "sha256",
    rsa_pss: bool = False,
    signing_time: datetime | None = None,
) -> bytes:
    """Sign a MIME entity; returns the signed entity (headers and body)."""
    content = canonicalize(entity)
    der = build_signed_data(content, identity, detached=detached, digest_name=digest, rsa_pss=rsa_pss, signing_time=signing_time)
    if not detached:
        # RFC 8551 3.5.2: opaque signed-data as application/pkcs7-mime.
        return _pkcs7_mime_entity(der, "signed-data")
    boundary = _boundary()
    while boundary.encode() in content:
        boundary = _boundary()
    # RFC 8551 3.5.3: protocol and micalg parameters are required.
    header = field_line(
        "Content-Type",
        f'multipart/signed; protocol="application/pkcs7-signature"; micalg={_MICALG[digest]}; boundary="{boundary}"',
    )
    signature_part = render([
        field_line("Content-Type", 'application/pkcs7-signature; name="smime.p7s"'),
        field_line("Content-Transfer-Encoding", "base64"),
        field_line("Content-Disposition", 'attachment; filename="smime.p7s"'),
        field_line("Content-Description", "S/MIME Cryptographic Signature"),
    ], base64_lines(der))
    marker = f"--{boundary}".encode()
    body = (
        b"This is an S/MIME signed message" + CRLF + CRLF
        + marker + CRLF + content + CRLF
        + marker + CRLF + signature_part + CRLF
        + marker + b"--" + CRLF
    )
    return render([header], body)


def encrypt_entity(
    entity: bytes,
    recipients: Sequence[x509.Certificate],
    *,
    cipher: ContentCipher = ContentCipher.AES256_CBC,
    key_transport: KeyTransport = KeyTransport.PKCS1V15,
) -> bytes:
    """Encrypt a MIME entity to ``recipients``; returns the application/pkcs7-mime entity."""
    der = build_enveloped_data(canonicalize(entity), _unique(recipients), cipher=cipher, key_transport=key_transport)
    # RFC 8551 3.3 / 3.4: smime-type enveloped-data, or authEnveloped-data for AuthEnvelopedData.
    return _pkcs7_mime_entity(der, "authEnveloped-data" if cipher.authenticated else "enveloped-data")


def _unique(certificates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    unique: list[x509.Certificate] = []
    for certificate in certificates:
        if certificate not in unique:
            unique.append(certificate)
    return unique


def _pkcs7_mime_entity(der: bytes, smime_type: str) -> bytes:
    return render([
        field_line("Content-Type", f'application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"'),
        field_line("Content-Transfer-Encoding", "base64"),
        field_line("Content-Disposition", 'attachment; filename="smime.p7m"'),
        field_line("Content-Description", "S/MIME Encrypted Message" if "enveloped" in smime_type.lower() else "S/MIME Signed Message"),
    ], base64_lines(der))


def _needs_transfer_encoding(entity: Entity) -> bool:
    # RFC 8551 3.1.2: signed content must survive 7-bit transport unchanged.
    encoding = (entity.header("Content-Transfer-Encoding") or "7bit").strip().lower()
    if encoding in {"base64", "quoted-printable"} or entity.content_type()[0].startswith("multipart/"):
        return False
    too_long = any(len(line) > 998 for line in entity.body.split(CRLF))
    return too_long or any(byte > 127 or byte == 0 for byte in entity.body)


def _inner_entity(message: Entity, seven_bit: bool) -> Entity:
    fields = [f for f in message.fields if f.is_content_field]
    if not any(f.name.lower() == "content-type" for f in fields):
        fields.insert(0, field_line("Content-Type", "text/plain; charset=us-ascii"))  # RFC 2045 5.2 default
    inner = Entity(tuple(fields), message.body)
    if seven_bit and _needs_transfer_encoding(inner):
        kept = tuple(f for f in fields if f.name.lower() != "content-transfer-encoding")
        inner = Entity((*kept, field_line("Content-Transfer-Encoding", "base64")), base64_lines(message.body))
    return inner


def process_outgoing(
    raw_message: bytes,
    *,
    sign_with: SigningIdentity | None = None,
    encrypt_to: Sequence[x509.Certificate] = (),
    sender_certificate: x509.Certificate | None = None,
    options: OutgoingOptions = OutgoingOptions(),
) -> bytes:
    """Sign and/or encrypt a whole message, keeping its routing headers outside.

    ``sender_certificate``, when given and the message is encrypted, is added to
    the recipients so the sender can read the copy in their Sent folder.
    """
    if sign_with is None and not encrypt_to:
        return raw_message
    message = parse_entity(canonicalize(raw_message))
    entity = _inner_entity(message, seven_bit=sign_with is not None).to_bytes()
    if sign_with is not None:
        entity = sign_entity(entity, sign_with, detached=options.detached, digest=options.digest,
                             rsa_pss=options.rsa_pss, signing_time=options.signing_time)
    if encrypt_to:
        recipients = [*encrypt_to, *([sender_certificate] if sender_certificate is not None else [])]
        entity = encrypt_entity(entity, recipients, cipher=options.cipher, key_transport=options.key_transport)
    wrapped = parse_entity(entity)
    outer = [f for f in message.fields if not f.is_content_field and f.name.lower() != "mime-version"]
    return render([*outer, field_line("MIME-Version", "1.0"), *wrapped.fields], wrapped.body)


# ---------------------------------------------------------------------------
# Incoming: decrypt -> verify -> trust -> address
# ---------------------------------------------------------------------------


class SmimeStatus(StrEnum):
    """RFC 7281 result values of the Authentication-Results "smime" method."""

    NONE = "none"          # no S/MIME signature
    PASS = "pass"          # valid signature, trusted signer, address matches From
    FAIL = "fail"          # bad signature or untrusted/invalid certificate path
    POLICY = "policy"      # cryptographically valid, refused by policy (address, weak digest)
    NEUTRAL = "neutral"    # encrypted for someone else: nothing could be checked
    PERMERROR = "permerror"  # the S/MIME structure is unreadable


@dataclass(frozen=True)
class DecryptionResult:
    decrypted: bool
    failure: SmimeFailure | None = None
    detail: str = ""
    cipher: str | None = None
    key_management: str | None = None
    recipient: x509.Certificate | None = None


@dataclass(frozen=True)
class IncomingResult:
    """What the pipeline learnt about one incoming message."""

    status: SmimeStatus
    content: bytes  # outer routing headers + innermost entity; the raw message when it could not be opened
    from_address: str | None
    decryption: DecryptionResult | None = None
    signatures: tuple[SignatureResult, ...] = ()
    path: PathResult | None = None
    signer_matches_from: bool | None = None
    reasons: tuple[str, ...] = ()
    summary: str = "smime=none"

    @property
    def signature(self) -> SignatureResult | None:
        return self.signatures[0] if self.signatures else None

    @property
    def encrypted(self) -> bool:
        return self.decryption is not None

    @property
    def trusted(self) -> bool:
        return self.status is SmimeStatus.PASS


@dataclass
class _Walk:
    """State carried down the layers of one incoming message."""

    outer: Entity
    entity: Entity
    keys: Sequence[RecipientKey]
    decryption: DecryptionResult | None = None
    signatures: list[SignatureResult] = field(default_factory=list)
    error: SmimeError | None = None


def _from_address(message: Entity) -> str | None:
    value = message.header("From")
    if value is None:
        return None
    addresses = [address for _, address in email.utils.getaddresses([value]) if "@" in address]
    return addresses[0] if len(addresses) == 1 else None


def _classify(entity: Entity) -> tuple[str, bytes, bytes | None] | None:
    """``(kind, der, detached_content)`` for an S/MIME entity, None for anything else."""
    content_type, _ = entity.content_type()
    if content_type == "multipart/signed":
        if (entity.param("protocol") or "").lower() not in _PKCS7_SIGNATURE:
            return None  # e.g. PGP/MIME: not ours to judge
        parts = split_multipart(entity)
        if len(parts) != 2:
            raise SmimeError(SmimeFailure.MALFORMED_MIME, f"multipart/signed has {len(parts)} parts, expected 2 (RFC 1847 2.1)")
        return "signed", decode_body(parse_entity(parts[1])), parts[0]
    name = (entity.param("name") or "").lower()
    if content_type in _PKCS7_MIME or (content_type == "application/octet-stream" and name.endswith(".p7m")):
        der = decode_body(entity)
        kind = content_type_of(der)
        return ("signed" if kind == "signed_data" else "enveloped"), der, None
    return None


def _peel(walk: _Walk) -> bool:
    """Remove one S/MIME layer; False when the entity is not S/MIME any more."""
    classified = _classify(walk.entity)
    if classified is None:
        return False
    kind, der, detached = classified
    if kind == "enveloped":
        opened = open_enveloped_data(der, walk.keys)
        walk.decryption = DecryptionResult(True, cipher=opened.cipher, key_management=opened.key_management,
                                           recipient=opened.recipient)
        walk.entity = parse_entity(canonicalize(opened.content))
        return True
    signature = verify_signed_data(der, detached)
    walk.signatures.append(signature)
    walk.entity = parse_entity(detached if detached is not None else canonicalize(signature.content))
    return True


def _unwrapped(outer: Entity, inner: Entity) -> bytes:
    # Inner header fields win (RFC 8551 3.1 lets the inner entity carry a full header); the
    # outer routing fields the inner entity lacks are kept.
    inner_names = {f.name.lower() for f in inner.fields}
    kept = [f for f in outer.fields if not f.is_content_field and f.name.lower() not in inner_names]
    return render([*kept, *inner.fields], inner.body)


def _walk_layers(walk: _Walk) -> None:
    try:
        for _ in range(MAX_LAYERS):
            if not _peel(walk):
                return
        raise SmimeError(SmimeFailure.MALFORMED_MIME, f"more than {MAX_LAYERS} nested S/MIME layers")
    except SmimeError as error:
        walk.error = error
        if error.reason in {SmimeFailure.NO_RECIPIENT_KEY, SmimeFailure.DECRYPTION_FAILED}:
            walk.decryption = DecryptionResult(False, error.reason, error.detail)


@dataclass(frozen=True)
class _Verdict:
    status: SmimeStatus
    reasons: tuple[str, ...]
    path: PathResult | None = None
    matches_from: bool | None = None


def _judge_signature(
    signature: SignatureResult,
    from_address: str | None,
    *,
    anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    now: datetime,
    require_revocation: bool,
) -> _Verdict:
    signer = signature.signer_certificate
    if not signature.valid or signer is None:
        return _Verdict(SmimeStatus.FAIL, signature.reasons)
    path = validate_path(signer, anchors=anchors, intermediates=[*signature.certificates, *intermediates],
                         crls=crls, now=now, purpose=Purpose.SIGNING, require_revocation=require_revocation)
    # RFC 8550 3: the From address must be one of the signer certificate's addresses.
    matches = from_address is not None and address_matches(signer, from_address)
    if not path.valid:
        return _Verdict(SmimeStatus.FAIL, tuple(str(f) for f in path.failures), path, matches)
    reasons = list(signature.reasons)
    if not matches:
        reasons.append(f"address-mismatch: From {from_address or '(none)'} is not in {describe_certificate(signer)} "
                       f"({', '.join(signature.signer_emails) or 'no address'})")
    status = SmimeStatus.POLICY if reasons else SmimeStatus.PASS
    return _Verdict(status, tuple(reasons), path, matches)


def _comment(text: str) -> str:
    # RFC 5322 3.2.2: a comment cannot hold unbalanced parentheses or line breaks.
    cleaned = re.sub(r"[()\\\r\n]+", " ", text)
    return re.sub(r"\s+", " ", cleaned).strip()[:200]


def _summary(status: SmimeStatus, reasons: Sequence[str], from_address: str | None, signature: SignatureResult | None) -> str:
    parts = [f"smime={status.value}"]
    if reasons and status is not SmimeStatus.PASS:
        parts.append(f"({_comment(reasons[0])})")
    if from_address:
        parts.append(f"header.from={from_address}")
    if signature is not None and signature.signer_emails:
        parts.append(f"body.smime-identifier={signature.signer_emails[0]}")  # RFC 7281 3
    return " ".join(parts)


def _error_status(error: SmimeError) -> SmimeStatus:
    if error.reason is SmimeFailure.NO_RECIPIENT_KEY:
        return SmimeStatus.NEUTRAL
    return SmimeStatus.PERMERROR


def process_incoming(
    raw_message: bytes,
    *,
    keys: Sequence[RecipientKey] = (),
    trust_anchors: Sequence[x509.Certificate] = (),
    crls: Sequence[x509.CertificateRevocationList] = (),
    now: datetime,
    intermediates: Sequence[x509.Certificate] = (),
    require_revocation: bool = False,
) -> IncomingResult:
    """Decrypt, verify, validate and check one incoming message. Never raises for bad input.

    ``now`` (timezone-aware) is the moment certificates and CRLs are judged at.
    """
    outer = parse_entity_safely(raw_message)
    if outer is None:
        reason = "malformed-mime: unreadable header"
        return IncomingResult(SmimeStatus.PERMERROR, raw_message, None, reasons=(reason,), summary=f"smime=permerror ({reason})")
    from_address = _from_address(outer)
    walk = _Walk(outer=outer, entity=outer, keys=keys)
    _walk_layers(walk)
    verdicts = [
        _judge_signature(s, from_address, anchors=trust_anchors, intermediates=intermediates, crls=crls, now=now,
                         require_revocation=require_revocation)
        for s in walk.signatures
    ]
    return _incoming_result(raw_message, walk, verdicts, from_address)


def parse_entity_safely(raw_message: bytes) -> Entity | None:
    try:
        return parse_entity(canonicalize(raw_message))
    except SmimeError:
        return None


def _incoming_result(raw_message: bytes, walk: _Walk, verdicts: list[_Verdict], from_address: str | None) -> IncomingResult:
    content = raw_message if walk.entity is walk.outer else _unwrapped(walk.outer, walk.entity)
    if walk.error is not None:
        status = _error_status(walk.error)
        reasons: tuple[str, ...] = (str(walk.error),)
    elif verdicts:
        worst = max(verdicts, key=lambda v: _SEVERITY[v.status])
        status, reasons = worst.status, worst.reasons
    else:
        status, reasons = SmimeStatus.NONE, ()
    first = verdicts[0] if verdicts else None
    signature = walk.signatures[0] if walk.signatures else None
    return IncomingResult(
        status=status,
        content=content,
        from_address=from_address,
        decryption=walk.decryption,
        signatures=tuple(walk.signatures),
        path=first.path if first else None,
        signer_matches_from=first.matches_from if first else None,
        reasons=reasons,
        summary=_summary(status, reasons, from_address, signature),
    )


_SEVERITY = {
    SmimeStatus.PASS: 0,
    SmimeStatus.NONE: 1,
    SmimeStatus.NEUTRAL: 2,
    SmimeStatus.POLICY: 3,
    SmimeStatus.FAIL: 4,
    SmimeStatus.PERMERROR: 5,
}

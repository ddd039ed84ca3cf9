"""Cryptographic Message Syntax (RFC 5652) over bytes: sign, verify, envelope, open.

This module knows DER and keys, not MIME: :mod:`gateway.security.smime` wraps it
in mail. Every function takes and returns bytes or plain dataclasses, and every
way a hostile or broken structure can fail ends in a :class:`SmimeError` whose
``reason`` is a stable :class:`SmimeFailure` code.

Algorithms:

* signatures: RSA PKCS#1 v1.5 and RSASSA-PSS (RFC 4056), ECDSA (RFC 5753 7.1.3)
  with SHA-256/384/512; SHA-1 and SHA-224 are verified but reported as weak
  (RFC 8551 2.1);
* key management: RSA PKCS#1 v1.5 and RSAES-OAEP key transport (RFC 3560),
  ephemeral-static ECDH with the X9.63 KDF and AES key wrap (RFC 5753 3.1);
* content: AES-CBC in EnvelopedData (RFC 3565) and AES-GCM in
  AuthEnvelopedData (RFC 5083, RFC 5084).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum

from asn1crypto import algos, cms, core, keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, keywrap, padding as symmetric_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.security.certpath import certificate_emails

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# Exceptions asn1crypto raises while lazily decoding a hostile structure (AttributeError: a mutated
# tag can turn a field into another universal type, e.g. ObjectDescriptor, which has no .native).
_DECODING_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


class SmimeFailure(StrEnum):
    """Why a CMS or S/MIME operation failed: stable codes for logs and results."""

    MALFORMED = "malformed-cms"
    MALFORMED_MIME = "malformed-mime"
    UNSUPPORTED_ALGORITHM = "unsupported-algorithm"
    UNSUPPORTED_CONTENT = "unsupported-content-type"
    NO_SIGNER = "no-signer-info"
    SIGNER_CERTIFICATE_MISSING = "signer-certificate-missing"
    CONTENT_MISSING = "signed-content-missing"
    CONTENT_TYPE_MISMATCH = "content-type-attribute-mismatch"
    DIGEST_MISMATCH = "message-digest-mismatch"
    BAD_SIGNATURE = "bad-signature"
    NO_RECIPIENT_KEY = "no-recipient-key"
    DECRYPTION_FAILED = "decryption-failed"
    KEY_MISMATCH = "key-does-not-match-certificate"


class SmimeError(Exception):
    """A CMS/S/MIME failure with a stable reason code and a human detail."""

    def __init__(self, reason: SmimeFailure, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@contextmanager
def malformed_guard(what: str) -> Iterator[None]:
    """Turn asn1crypto's decoding exceptions into ``SmimeError(MALFORMED)``."""
    try:
        yield
    except SmimeError:
        raise
    except _DECODING_ERRORS as exc:
        raise SmimeError(SmimeFailure.MALFORMED, f"{what}: {exc}") from exc


# ---------------------------------------------------------------------------
# Algorithm tables
# ---------------------------------------------------------------------------

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# RFC 8551 2.1: SHA-1 is historic for signatures; we verify but flag it.
WEAK_DIGESTS = frozenset({"sha1", "sha224"})

# Signature algorithm names (asn1crypto) that imply a digest.
_SIGNATURE_DIGEST: dict[str, str] = {
    "sha1_rsa": "sha1", "sha224_rsa": "sha224", "sha256_rsa": "sha256",
    "sha384_rsa": "sha384", "sha512_rsa": "sha512",
    "sha1_ecdsa": "sha1", "sha224_ecdsa": "sha224", "sha256_ecdsa": "sha256",
    "sha384_ecdsa": "sha384", "sha512_ecdsa": "sha512",
}
_RSA_SIGNATURES = frozenset({"rsassa_pkcs1v15", "sha1_rsa", "sha224_rsa", "sha256_rsa", "sha384_rsa", "sha512_rsa"})
_ECDSA_SIGNATURES = frozenset({"ecdsa", "sha1_ecdsa", "sha224_ecdsa", "sha256_ecdsa", "sha384_ecdsa", "sha512_ecdsa"})


class ContentCipher(StrEnum):
    """Content-encryption algorithms (RFC 3565 AES-CBC, RFC 5084 AES-GCM)."""

    AES128_CBC = "aes128_cbc"
    AES256_CBC = "aes256_cbc"
    AES128_GCM = "aes128_gcm"
    AES256_GCM = "aes256_gcm"

    @property
    def key_size(self) -> int:
        return 16 if self.value.startswith("aes128") else 32

    @property
    def authenticated(self) -> bool:
        return self.value.endswith("gcm")


class KeyTransport(StrEnum):
    """RSA key transport padding (RFC 5652 6.2.1, RFC 3560)."""

    PKCS1V15 = "rsaes_pkcs1v15"
    OAEP = "rsaes_oaep"


# RFC 5753 7.1.4 / RFC 8418: dhSinglePass-stdDH-*kdf-scheme identifiers.
_ECDH_SCHEMES: dict[str, str] = {
    "1.3.133.16.840.63.0.2": "sha1",
    "1.3.132.1.11.0": "sha224",
    "1.3.132.1.11.1": "sha256",
    "1.3.132.1.11.2": "sha384",
    "1.3.132.1.11.3": "sha512",
}
_ECDH_SHA256_SCHEME = "1.3.132.1.11.1"
_WRAP_KEY_SIZES = {"aes128_wrap": 16, "aes192_wrap": 24, "aes256_wrap": 32}


def hash_for(name: str) -> hashes.HashAlgorithm:
    """The hash object for an asn1crypto digest name, or UNSUPPORTED_ALGORITHM."""
    try:
        return _HASHES[name]()
    except KeyError:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"digest algorithm {name}") from None


def digest(data: bytes, name: str) -> bytes:
    hasher = hashes.Hash(hash_for(name))
    hasher.update(data)
    return hasher.finalize()


class GcmParameters(core.Sequence):
    """RFC 5084 3.2: GCMParameters ::= SEQUENCE { aes-nonce, aes-ICVlen DEFAULT 12 }."""

    _fields = [
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


class EccCmsSharedInfo(core.Sequence):
    """RFC 5753 7.2: the SharedInfo input of the X9.63 KDF."""

    _fields = [
        ("key_info", cms.KeyEncryptionAlgorithm),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def load_content_info(der: bytes) -> cms.ContentInfo:
    """Parse a ContentInfo, rejecting anything that does not decode fully."""
    if not der:
        raise SmimeError(SmimeFailure.MALFORMED, "empty CMS structure")
    with malformed_guard("ContentInfo"):
        info = cms.ContentInfo.load(der)
        content_type = info["content_type"].native
        content = info["content"]
        # Force a full decode now so truncation shows up here, not later.
        content.native
    if content_type not in {"signed_data", "enveloped_data", "authenticated_enveloped_data"}:
        raise SmimeError(SmimeFailure.UNSUPPORTED_CONTENT, f"CMS content type {content_type}")
    return info


def content_type_of(der: bytes) -> str:
    """``signed_data``, ``enveloped_data`` or ``authenticated_enveloped_data``."""
    return str(load_content_info(der)["content_type"].native)


def _to_cryptography(certificate: cms.CertificateChoices) -> x509.Certificate | None:
    if certificate.name != "certificate":
        return None
    try:
        return x509.load_der_x509_certificate(certificate.chosen.dump())
    except (ValueError, x509.InvalidVersion):
        return None  # RFC 5652 5.1: unusable certificates are skipped, not fatal


def _ski(certificate: x509.Certificate) -> bytes | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _issuer_and_serial_matches(ias: cms.IssuerAndSerialNumber, certificate: x509.Certificate) -> bool:
    with malformed_guard("issuerAndSerialNumber"):
        if ias["serial_number"].native != certificate.serial_number:
            return False
        issuer = asn1_x509.Name.load(certificate.issuer.public_bytes())
        return bool(ias["issuer"] == issuer)


def identifier_matches(identifier: core.Choice, certificate: x509.Certificate) -> bool:
    """RFC 5652 5.3/6.2: SignerIdentifier / RecipientIdentifier against a certificate."""
    with malformed_guard("certificate identifier"):
        name = identifier.name
        chosen = identifier.chosen
        if name == "issuer_and_serial_number":
            return _issuer_and_serial_matches(chosen, certificate)
        if name in {"subject_key_identifier", "r_key_id"}:
            key_id = chosen.native if name == "subject_key_identifier" else chosen["subject_key_identifier"].native
            return key_id is not None and key_id == _ski(certificate)
    return False


def issuer_and_serial(certificate: x509.Certificate) -> cms.IssuerAndSerialNumber:
    return cms.IssuerAndSerialNumber({
        "issuer": asn1_x509.Name.load(certificate.issuer.public_bytes()),
        "serial_number": certificate.serial_number,
    })


# ---------------------------------------------------------------------------
# Signing (RFC 5652 5)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningIdentity:
    """A signer: certificate, its private key, and the chain to send along."""

    certificate: x509.Certificate
    private_key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()


def _signature_algorithm(identity: SigningIdentity, digest_name: str, rsa_pss: bool) -> cms.SignedDigestAlgorithm:
    key = identity.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        # RFC 5753 7.1.3 / RFC 5758 3.2: ecdsa-with-SHAxxx, parameters absent.
        return cms.SignedDigestAlgorithm({"algorithm": f"{digest_name}_ecdsa"})
    if rsa_pss:
        # RFC 4056 2.2: RSASSA-PSS with explicit parameters; salt = hash length.
        return cms.SignedDigestAlgorithm({
            "algorithm": "rsassa_pss",
            "parameters": algos.RSASSAPSSParams({
                "hash_algorithm": {"algorithm": digest_name},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": digest_name}},
                "salt_length": hash_for(digest_name).digest_size,
            }),
        })
    # RFC 3370 3.2: rsaEncryption with NULL parameters, the digest in digestAlgorithm.
    return cms.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()})


def _sign_bytes(key: PrivateKey, data: bytes, digest_name: str, rsa_pss: bool) -> bytes:
    algorithm = hash_for(digest_name)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(algorithm))
    if isinstance(key, rsa.RSAPrivateKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(hash_for(digest_name)), salt_length=algorithm.digest_size)
            if rsa_pss else padding.PKCS1v15()
        )
        return key.sign(data, pad, algorithm)
    raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"signing key type {type(key).__name__}")


def signed_attributes_der(signed_attrs: cms.CMSAttributes) -> bytes:
    """RFC 5652 5.4: the signature covers signedAttrs encoded with a SET OF tag, not [0]."""
    encoded = signed_attrs.dump()
    return b"\x31" + encoded[1:]


def _smime_capabilities() -> cms.CMSAttribute:
    # RFC 8551 2.5.2: announce the content ciphers we decrypt, strongest first.
    capabilities = [{"capability_id": name} for name in ("aes256_gcm", "aes128_gcm", "aes256_cbc", "aes128_cbc")]
    return cms.CMSAttribute({"type": "smime_capabilities", "values": [capabilities]})


def build_signed_data(
    content: bytes,
    identity: SigningIdentity,
    *,
    detached: bool,
    digest_name: str = "sha256",
    rsa_pss: bool = False,
    signing_time: datetime | None = None,
) -> bytes:
    """A DER ContentInfo(SignedData) over ``content`` (RFC 5652 5.1-5.4)."""
    if digest_name not in _HASHES or digest_name in WEAK_DIGESTS:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"refusing to sign with {digest_name}")
    if identity.certificate.public_key() != identity.private_key.public_key():
        raise SmimeError(SmimeFailure.KEY_MISMATCH, "the private key does not match the signer certificate")
    moment = (signing_time or datetime.now(timezone.utc)).replace(microsecond=0)
    # RFC 5652 11.1-11.3: content-type, message-digest and signing-time attributes.
    signed_attrs = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [cms.Time({"utc_time": moment})]}),
        cms.CMSAttribute({"type": "message_digest", "values": [digest(content, digest_name)]}),
        _smime_capabilities(),
    ])
    signer_info = cms.SignerInfo({
        "version": "v1",  # RFC 5652 5.3: v1 with issuerAndSerialNumber
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": issuer_and_serial(identity.certificate)}),
        "digest_algorithm": {"algorithm": digest_name},
        "signed_attrs": signed_attrs,
        "signature_algorithm": _signature_algorithm(identity, digest_name, rsa_pss),
        "signature": b"",
    })
    to_sign = signed_attributes_der(signer_info["signed_attrs"])
    signer_info["signature"] = _sign_bytes(identity.private_key, to_sign, digest_name, rsa_pss)
    certificates = [identity.certificate, *identity.chain]
    signed_data = cms.SignedData({
        "version": "v1",  # RFC 5652 5.1: no attribute certificates, eContentType id-data
        "digest_algorithms": [{"algorithm": digest_name}],
        "encap_content_info": {"content_type": "data", "content": None if detached else content},
        "certificates": [cms.CertificateChoices({"certificate": _asn1_certificate(c)}) for c in certificates],
        "signer_infos": [signer_info],
    })
    return cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()


def _asn1_certificate(certificate: x509.Certificate) -> core.Asn1Value:
    return asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))


# ---------------------------------------------------------------------------
# Verification (RFC 5652 5.6)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureResult:
    """The cryptographic verdict on one SignedData (trust is judged separately)."""

    valid: bool
    signer_certificate: x509.Certificate | None
    signer_emails: tuple[str, ...]
    signing_time: datetime | None
    digest_algorithm: str | None
    signature_algorithm: str | None
    reasons: tuple[str, ...]
    failure: SmimeFailure | None = None
    weak_algorithm: bool = False
    certificates: tuple[x509.Certificate, ...] = field(default=(), repr=False)
    content: bytes = field(default=b"", repr=False)

    @property
    def algorithm(self) -> str | None:
        """``rsassa_pss/sha256``: the signature algorithm and the digest, together."""
        if not self.signature_algorithm:
            return None
        return f"{self.signature_algorithm}/{self.digest_algorithm}"


@dataclass(frozen=True)
class _SignerCheck:
    certificate: x509.Certificate | None
    digest_name: str | None
    signature_name: str | None
    signing_time: datetime | None
    failure: SmimeFailure | None
    detail: str


def verify_signed_data(der: bytes, detached_content: bytes | None = None) -> SignatureResult:
    """Check a SignedData: digest, signed attributes and signature (no trust decision).

    ``detached_content`` is the canonical MIME entity of a multipart/signed
    message; for opaque signed-data the content comes from eContent.
    Raises ``SmimeError`` only when the structure itself is unreadable.
    """
    info = load_content_info(der)
    if info["content_type"].native != "signed_data":
        raise SmimeError(SmimeFailure.UNSUPPORTED_CONTENT, f"expected signed-data, got {info['content_type'].native}")
    with malformed_guard("SignedData"):
        signed_data = info["content"]
        certificates = tuple(c for c in (_to_cryptography(choice) for choice in (signed_data["certificates"] or [])) if c)
        content = _signed_content(signed_data, detached_content)
        e_content_type = signed_data["encap_content_info"]["content_type"].dotted
        checks = [_check_signer(si, content, e_content_type, certificates) for si in signed_data["signer_infos"]]
    if not checks:
        return _result_from(None, certificates, content, SmimeFailure.NO_SIGNER, "SignedData has no SignerInfo")
    chosen = next((check for check in checks if check.failure is None), checks[0])
    return _result_from(chosen, certificates, content, chosen.failure, chosen.detail)


def _result_from(
    check: _SignerCheck | None,
    certificates: tuple[x509.Certificate, ...],
    content: bytes,
    failure: SmimeFailure | None,
    detail: str,
) -> SignatureResult:
    signer = check.certificate if check else None
    emails = certificate_emails(signer) if signer is not None else ()
    digest_name = check.digest_name if check else None
    weak = digest_name in WEAK_DIGESTS
    reasons = [f"{failure}: {detail}"] if failure else []
    if weak:
        reasons.append(f"weak-algorithm: {digest_name} is no longer acceptable for signatures (RFC 8551 2.1)")
    return SignatureResult(
        valid=failure is None,
        signer_certificate=signer,
        signer_emails=emails,
        signing_time=check.signing_time if check else None,
        digest_algorithm=digest_name,
        signature_algorithm=check.signature_name if check else None,
        reasons=tuple(reasons),
        failure=failure,
        weak_algorithm=weak,
        certificates=certificates,
        content=content,
    )


def _signed_content(signed_data: cms.SignedData, detached_content: bytes | None) -> bytes:
    encapsulated = signed_data["encap_content_info"]["content"]
    if detached_content is not None:
        return detached_content
    if encapsulated.native is None:
        raise SmimeError(SmimeFailure.CONTENT_MISSING, "detached signature but no signed content was given")
    # RFC 5652 5.2: eContent is an OCTET STRING (possibly constructed in BER).
    value = encapsulated.native
    return value if isinstance(value, bytes) else encapsulated.contents


def _check_signer(
    signer_info: cms.SignerInfo,
    content: bytes,
    e_content_type: str,
    certificates: tuple[x509.Certificate, ...],
) -> _SignerCheck:
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    signature_name = signer_info["signature_algorithm"]["algorithm"].native
    certificate = next((c for c in certificates if identifier_matches(signer_info["sid"], c)), None)
    signing_time = _signing_time(signer_info)

    def outcome(failure: SmimeFailure | None, detail: str = "") -> _SignerCheck:
        return _SignerCheck(certificate, digest_name, signature_name, signing_time, failure, detail)

    if certificate is None:
        return outcome(SmimeFailure.SIGNER_CERTIFICATE_MISSING, "no certificate in the message matches the signer identifier")
    try:
        signed_bytes = _bytes_covered_by_signature(signer_info, content, e_content_type, digest_name)
        _verify_signature(certificate, signer_info, signed_bytes, digest_name)
    except SmimeError as error:
        return outcome(error.reason, error.detail)
    return outcome(None)


def _signing_time(signer_info: cms.SignerInfo) -> datetime | None:
    for attribute in signer_info["signed_attrs"] or []:
        if attribute["type"].native == "signing_time":
            value = attribute["values"][0].native
            return value if isinstance(value, datetime) else None
    return None


def _attribute(signer_info: cms.SignerInfo, name: str) -> core.Asn1Value | None:
    matches = [a for a in signer_info["signed_attrs"] if a["type"].native == name]
    if len(matches) > 1 or (matches and len(matches[0]["values"]) != 1):
        # RFC 5652 11.1/11.2: exactly one attribute with exactly one value.
        raise SmimeError(SmimeFailure.MALFORMED, f"{name} attribute must appear once with one value")
    return matches[0]["values"][0] if matches else None


def _bytes_covered_by_signature(
    signer_info: cms.SignerInfo, content: bytes, e_content_type: str, digest_name: str
) -> bytes:
    content_digest = digest(content, digest_name)
    if not signer_info["signed_attrs"]:
        # RFC 5652 5.4: without signed attributes the signature covers the content itself.
        return content
    message_digest = _attribute(signer_info, "message_digest")
    content_type = _attribute(signer_info, "content_type")
    if message_digest is None or content_type is None:
        raise SmimeError(SmimeFailure.MALFORMED, "signed attributes lack content-type or message-digest (RFC 5652 5.3)")
    if content_type.dotted != e_content_type:
        raise SmimeError(SmimeFailure.CONTENT_TYPE_MISMATCH, f"content-type attribute {content_type.dotted} != {e_content_type}")
    if not hmac.compare_digest(message_digest.native, content_digest):
        raise SmimeError(SmimeFailure.DIGEST_MISMATCH, "the content was changed after signing (message-digest differs)")
    return signed_attributes_der(signer_info["signed_attrs"])


def public_key_of(certificate: x509.Certificate) -> CertificatePublicKeyTypes:
    """The certificate's key, or UNSUPPORTED_ALGORITHM for key types we cannot use."""
    try:
        return certificate.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"certificate public key: {exc}") from None


def _verify_signature(certificate: x509.Certificate, signer_info: cms.SignerInfo, data: bytes, digest_name: str) -> None:
    public_key = public_key_of(certificate)
    algorithm = signer_info["signature_algorithm"]
    name = algorithm["algorithm"].native
    signature = signer_info["signature"].native
    try:
        if name == "rsassa_pss" and isinstance(public_key, rsa.RSAPublicKey):
            pss_padding, pss_hash = _pss_from_parameters(algorithm["parameters"])
            public_key.verify(signature, data, pss_padding, pss_hash)
        elif name in _RSA_SIGNATURES and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hash_for(_SIGNATURE_DIGEST.get(name, digest_name)))
        elif name in _ECDSA_SIGNATURES and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hash_for(_SIGNATURE_DIGEST.get(name, digest_name))))
        else:
            raise SmimeError(
                SmimeFailure.UNSUPPORTED_ALGORITHM,
                f"signature algorithm {name} with a {type(public_key).__name__} key",
            )
    except InvalidSignature:
        raise SmimeError(SmimeFailure.BAD_SIGNATURE, f"the {name} signature does not verify with the signer's key") from None
    except UnsupportedAlgorithm as exc:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, str(exc)) from None


def _pss_from_parameters(parameters: algos.RSASSAPSSParams) -> tuple[padding.PSS, hashes.HashAlgorithm]:
    # RFC 4055 3.1 / RFC 4056 2.2: parameters name the hash, MGF1's hash and the salt length.
    hash_name = parameters["hash_algorithm"]["algorithm"].native
    mgf = parameters["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"PSS mask generation {mgf['algorithm'].native}")
    mgf_hash = mgf["parameters"]["algorithm"].native
    if parameters["trailer_field"].native not in (1, "trailer_field_bc"):
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, "PSS trailer field other than 1")
    salt_length = int(parameters["salt_length"].native)
    return padding.PSS(mgf=padding.MGF1(hash_for(mgf_hash)), salt_length=salt_length), hash_for(hash_name)


# ---------------------------------------------------------------------------
# Enveloping (RFC 5652 6, RFC 5083)
# ---------------------------------------------------------------------------


def build_enveloped_data(
    content: bytes,
    recipients: Sequence[x509.Certificate],
    *,
    cipher: ContentCipher = ContentCipher.AES256_CBC,
    key_transport: KeyTransport = KeyTransport.PKCS1V15,
) -> bytes:
    """A DER ContentInfo of EnvelopedData (CBC) or AuthEnvelopedData (GCM)."""
    if not recipients:
        raise SmimeError(SmimeFailure.NO_RECIPIENT_KEY, "no recipient certificate to encrypt to")
    content_key = os.urandom(cipher.key_size)
    recipient_infos = [_recipient_info(certificate, content_key, cipher, key_transport) for certificate in recipients]
    if cipher.authenticated:
        return _auth_enveloped(content, content_key, cipher, recipient_infos)
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    padder = symmetric_padding.PKCS7(128).padder()  # RFC 5652 6.3 content padding
    ciphertext = encryptor.update(padder.update(content) + padder.finalize()) + encryptor.finalize()
    # RFC 5652 6.1: version 0 only when every RecipientInfo is a v0 KeyTransRecipientInfo.
    version = "v0" if all(ri.name == "ktri" for ri in recipient_infos) else "v2"
    enveloped = cms.EnvelopedData({
        "version": version,
        "recipient_infos": recipient_infos,
        "encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": cipher.value, "parameters": iv},
            "encrypted_content": ciphertext,
        },
    })
    return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()


def _auth_enveloped(
    content: bytes, content_key: bytes, cipher: ContentCipher, recipient_infos: list[cms.RecipientInfo]
) -> bytes:
    # RFC 5084 3.2: a 12-octet nonce and a 16-octet tag; RFC 5083 2.1: no authAttrs means empty AAD.
    nonce = os.urandom(12)
    sealed = AESGCM(content_key).encrypt(nonce, content, None)
    ciphertext, tag = sealed[:-16], sealed[-16:]
    parameters = GcmParameters({"aes_nonce": nonce, "aes_icvlen": 16})
    auth_enveloped = cms.AuthEnvelopedData({
        "version": "v0",  # RFC 5083 2.1: version is always 0
        "recipient_infos": recipient_infos,
        "auth_encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": cipher.value, "parameters": core.Any.load(parameters.dump())},
            "encrypted_content": ciphertext,
        },
        "mac": tag,
    })
    return cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": auth_enveloped}).dump()


def _recipient_info(
    certificate: x509.Certificate, content_key: bytes, cipher: ContentCipher, key_transport: KeyTransport
) -> cms.RecipientInfo:
    public_key = public_key_of(certificate)
    if isinstance(public_key, rsa.RSAPublicKey):
        return _key_transport_info(certificate, public_key, content_key, key_transport)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _key_agreement_info(certificate, public_key, content_key, cipher)
    raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"recipient key type {type(public_key).__name__}")


def _oaep() -> padding.OAEP:
    # RFC 8551 2.3 / RFC 3560 3: RSAES-OAEP with SHA-256 and MGF1-SHA-256.
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _key_transport_info(
    certificate: x509.Certificate, public_key: rsa.RSAPublicKey, content_key: bytes, key_transport: KeyTransport
) -> cms.RecipientInfo:
    if key_transport is KeyTransport.OAEP:
        algorithm = cms.KeyEncryptionAlgorithm({
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams({
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            }),
        })
        encrypted_key = public_key.encrypt(content_key, _oaep())
    else:
        algorithm = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15", "parameters": core.Null()})
        encrypted_key = public_key.encrypt(content_key, padding.PKCS1v15())
    return cms.RecipientInfo({"ktri": {
        "version": "v0",  # RFC 5652 6.2.1: v0 with issuerAndSerialNumber
        "rid": {"issuer_and_serial_number": issuer_and_serial(certificate)},
        "key_encryption_algorithm": algorithm,
        "encrypted_key": encrypted_key,
    }})


def _wrap_algorithm(cipher: ContentCipher) -> str:
    # RFC 5753 7.2 / RFC 3565: a key-wrap at least as strong as the content cipher.
    return "aes128_wrap" if cipher.key_size == 16 else "aes256_wrap"


def _kdf(shared_secret: bytes, hash_name: str, wrap: cms.KeyEncryptionAlgorithm, ukm: bytes | None) -> bytes:
    key_size = _WRAP_KEY_SIZES[wrap["algorithm"].native]
    # RFC 5753 7.2: SharedInfo = ECC-CMS-SharedInfo { keyInfo, entityUInfo, suppPubInfo = key bits }.
    shared_info = EccCmsSharedInfo({
        "key_info": {"algorithm": wrap["algorithm"].native},
        "entity_u_info": ukm,
        "supp_pub_info": (key_size * 8).to_bytes(4, "big"),
    })
    return X963KDF(algorithm=hash_for(hash_name), length=key_size, sharedinfo=shared_info.dump()).derive(shared_secret)


def _key_agreement_info(
    certificate: x509.Certificate, public_key: ec.EllipticCurvePublicKey, content_key: bytes, cipher: ContentCipher
) -> cms.RecipientInfo:
    # RFC 5753 3.1.1: ephemeral-static ECDH; originator is a fresh key on the recipient's curve.
    ephemeral = ec.generate_private_key(public_key.curve)
    wrap = cms.KeyEncryptionAlgorithm({"algorithm": _wrap_algorithm(cipher)})
    kek = _kdf(ephemeral.exchange(ec.ECDH(), public_key), "sha256", wrap, None)
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    originator_key = keys.PublicKeyInfo({
        "algorithm": {"algorithm": "ec"},  # RFC 5753 3.1.1: id-ecPublicKey, parameters absent
        "public_key": keys.ECPointBitString(point),
    })
    return cms.RecipientInfo({"kari": {
        "version": "v3",  # RFC 5652 6.2.2: always 3
        "originator": {"originator_key": originator_key},
        "key_encryption_algorithm": {"algorithm": _ECDH_SHA256_SCHEME, "parameters": wrap},
        "recipient_encrypted_keys": [{
            "rid": {"issuer_and_serial_number": issuer_and_serial(certificate)},
            "encrypted_key": keywrap.aes_key_wrap(kek, content_key),
        }],
    }})


# ---------------------------------------------------------------------------
# Opening (RFC 5652 6.2, RFC 5083, RFC 5753 3.1.2)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientKey:
    """A certificate we can be encrypted to, with its private key."""

    certificate: x509.Certificate
    private_key: PrivateKey


@dataclass(frozen=True)
class Opened:
    """Decrypted content and how it was protected."""

    content: bytes
    cipher: str
    key_management: str
    recipient: x509.Certificate


def open_enveloped_data(der: bytes, keys_held: Sequence[RecipientKey]) -> Opened:
    """Decrypt EnvelopedData/AuthEnvelopedData with one of ``keys_held``.

    Raises ``SmimeError(NO_RECIPIENT_KEY)`` when no RecipientInfo names a key we
    hold, ``DECRYPTION_FAILED`` when the key is ours but the content will not open.
    """
    info = load_content_info(der)
    kind = info["content_type"].native
    if kind not in {"enveloped_data", "authenticated_enveloped_data"}:
        raise SmimeError(SmimeFailure.UNSUPPORTED_CONTENT, f"expected enveloped-data, got {kind}")
    with malformed_guard("EnvelopedData"):
        envelope = info["content"]
        authenticated = kind == "authenticated_enveloped_data"
        content_info = envelope["auth_encrypted_content_info" if authenticated else "encrypted_content_info"]
        cipher_name = content_info["content_encryption_algorithm"]["algorithm"].native
        content_key, method, recipient = _recover_content_key(envelope["recipient_infos"], keys_held)
        if authenticated:
            plaintext = _open_gcm(content_info, content_key, envelope)
        else:
            plaintext = _open_cbc(content_info, content_key)
    return Opened(plaintext, cipher_name, method, recipient)


def _recover_content_key(
    recipient_infos: cms.RecipientInfos, keys_held: Sequence[RecipientKey]
) -> tuple[bytes, str, x509.Certificate]:
    last_error: SmimeError | None = None
    for recipient_info in recipient_infos:
        for key in keys_held:
            try:
                recovered = _try_recipient(recipient_info, key)
            except SmimeError as error:
                last_error = error
                continue
            if recovered is not None:
                return recovered, _method_name(recipient_info), key.certificate
    if last_error is not None:
        raise last_error
    raise SmimeError(SmimeFailure.NO_RECIPIENT_KEY, "the message is encrypted for other recipients only")


def _method_name(recipient_info: cms.RecipientInfo) -> str:
    if recipient_info.name == "ktri":
        return str(recipient_info.chosen["key_encryption_algorithm"]["algorithm"].native)
    if recipient_info.name == "kari":
        return "ecdh:" + recipient_info.chosen["key_encryption_algorithm"]["algorithm"].dotted
    return recipient_info.name


def _try_recipient(recipient_info: cms.RecipientInfo, key: RecipientKey) -> bytes | None:
    if recipient_info.name == "ktri" and identifier_matches(recipient_info.chosen["rid"], key.certificate):
        return _unwrap_key_transport(recipient_info.chosen, key)
    if recipient_info.name == "kari":
        for encrypted_key in recipient_info.chosen["recipient_encrypted_keys"]:
            if identifier_matches(encrypted_key["rid"], key.certificate):
                return _unwrap_key_agreement(recipient_info.chosen, encrypted_key["encrypted_key"].native, key)
    return None


def _unwrap_key_transport(ktri: cms.KeyTransRecipientInfo, key: RecipientKey) -> bytes:
    private_key = key.private_key
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, "key transport needs an RSA key")
    algorithm = ktri["key_encryption_algorithm"]
    name = algorithm["algorithm"].native
    try:
        if name == "rsaes_pkcs1v15":
            return private_key.decrypt(ktri["encrypted_key"].native, padding.PKCS1v15())
        if name == "rsaes_oaep":
            return private_key.decrypt(ktri["encrypted_key"].native, _oaep_from_parameters(algorithm["parameters"]))
    except ValueError:
        raise SmimeError(SmimeFailure.DECRYPTION_FAILED, f"{name}: the content key does not decrypt") from None
    raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"key transport {name}")


def _oaep_from_parameters(parameters: algos.RSAESOAEPParams) -> padding.OAEP:
    # RFC 3560 3 / RFC 4055 4.1: defaults are SHA-1 and MGF1-SHA-1 with an empty label.
    hash_name = parameters["hash_algorithm"]["algorithm"].native
    mgf_hash = parameters["mask_gen_algorithm"]["parameters"]["algorithm"].native
    label = parameters["p_source_algorithm"]["parameters"].native or None
    return padding.OAEP(mgf=padding.MGF1(hash_for(mgf_hash)), algorithm=hash_for(hash_name), label=label)


def _unwrap_key_agreement(kari: cms.KeyAgreeRecipientInfo, wrapped_key: bytes, key: RecipientKey) -> bytes:
    private_key = key.private_key
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, "key agreement needs an EC key")
    scheme = kari["key_encryption_algorithm"]["algorithm"].dotted
    if scheme not in _ECDH_SCHEMES:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"key agreement scheme {scheme}")
    originator = kari["originator"]
    if originator.name != "originator_key":
        # RFC 5753 3.1.1: ephemeral-static requires originatorKey; static-static (1-pass MQV etc.) is not offered.
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"ECDH originator {originator.name}")
    point = originator.chosen["public_key"].native
    wrap = cms.KeyEncryptionAlgorithm.load(kari["key_encryption_algorithm"]["parameters"].dump())
    if wrap["algorithm"].native not in _WRAP_KEY_SIZES:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"key wrap {wrap['algorithm'].native}")
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, point)
        shared_secret = private_key.exchange(ec.ECDH(), ephemeral)
    except ValueError:
        raise SmimeError(SmimeFailure.DECRYPTION_FAILED, "the originator key is not a point on our curve") from None
    ukm = kari["ukm"].native if kari["ukm"] else None
    kek = _kdf(shared_secret, _ECDH_SCHEMES[scheme], wrap, ukm)
    try:
        return keywrap.aes_key_unwrap(kek, wrapped_key)
    except keywrap.InvalidUnwrap:
        raise SmimeError(SmimeFailure.DECRYPTION_FAILED, "AES key unwrap failed (RFC 3394 integrity check)") from None


def _encrypted_bytes(content_info: cms.EncryptedContentInfo) -> bytes:
    value = content_info["encrypted_content"].native
    if not isinstance(value, bytes):
        raise SmimeError(SmimeFailure.MALFORMED, "encryptedContent is absent")
    return value


def _open_cbc(content_info: cms.EncryptedContentInfo, content_key: bytes) -> bytes:
    algorithm = content_info["content_encryption_algorithm"]
    name = algorithm["algorithm"].native
    if name not in {"aes128_cbc", "aes192_cbc", "aes256_cbc"}:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"content encryption {name}")
    iv = algorithm["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != 16 or len(content_key) * 8 != int(name[3:6]):
        raise SmimeError(SmimeFailure.DECRYPTION_FAILED, f"{name}: wrong IV or content key length")
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
    ciphertext = _encrypted_bytes(content_info)
    if len(ciphertext) % 16:
        raise SmimeError(SmimeFailure.MALFORMED, "CBC ciphertext is not a whole number of blocks")
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = symmetric_padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise SmimeError(SmimeFailure.DECRYPTION_FAILED, f"{name}: bad padding (wrong key or damaged content)") from None


def _open_gcm(content_info: cms.EncryptedContentInfo, content_key: bytes, envelope: cms.AuthEnvelopedData) -> bytes:
    algorithm = content_info["content_encryption_algorithm"]
    name = algorithm["algorithm"].native
    if name not in {"aes128_gcm", "aes192_gcm", "aes256_gcm"}:
        raise SmimeError(SmimeFailure.UNSUPPORTED_ALGORITHM, f"authenticated content encryption {name}")
    parameters = GcmParameters.load(algorithm["parameters"].dump())
    nonce = parameters["aes_nonce"].native
    tag = envelope["mac"].native
    if len(tag) != int(parameters["aes_icvlen"].native) or len(tag) < 12 or len(content_key) * 8 != int(name[3:6]):
        raise SmimeError(SmimeFailure.DECRYPTION_FAILED, f"{name}: wrong tag or content key length")
    # RFC 5083 2.1: when authAttrs are present, their DER (with a SET OF tag) is the AAD.
    aad = signed_attributes_der(envelope["auth_attrs"]) if envelope["auth_attrs"] else None
    try:
        if len(tag) == 16:
            return AESGCM(content_key).decrypt(nonce, _encrypted_bytes(content_info) + tag, aad)
        decryptor = Cipher(algorithms.AES(content_key), modes.GCM(nonce, tag, min_tag_length=len(tag))).decryptor()
        if aad:
            decryptor.authenticate_additional_data(aad)
        return decryptor.update(_encrypted_bytes(content_info)) + decryptor.finalize()
    except InvalidTag:
        raise SmimeError(SmimeFailure.DECRYPTION_FAILED, f"{name}: authentication tag mismatch (content altered)") from None


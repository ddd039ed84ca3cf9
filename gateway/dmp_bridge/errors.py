"""Errors of the DMP bridge's extraction half, and the CI-SIS integration codes.

Every refusal of a document (hostile XML, unsafe archive, not a CDA, broken
PDF) is a ``DocumentError``: callers catch that one family, tell the sender
why, and deliver the message anyway. ``code`` is the CI-SIS integration error
code reported in the MDN (``processed/Error: <code>^<label>``); anything that
is not an identification problem is 906 ("other").
"""

from __future__ import annotations

from enum import IntEnum

from gateway.errors import UserError


class IntegrationCode(IntEnum):
    """CI-SIS applicationErrorCondition codes (mssante.md §1.7, IG volet trans-lps-doc-cda-courriel-mss)."""

    WRONG_VERSION = 900
    AUTHOR_NOT_ALLOWED = 901
    UNKNOWN_PATIENT = 902
    INS_ABSENT = 903
    INS_MISMATCH = 904
    INS_INCOMPLETE = 905
    OTHER = 906

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS: dict[IntegrationCode, str] = {
    IntegrationCode.WRONG_VERSION: "Mauvaise version du document à remplacer ou supprimer",
    IntegrationCode.AUTHOR_NOT_ALLOWED: "Auteur non autorisé à remplacer ou supprimer le document",
    IntegrationCode.UNKNOWN_PATIENT: "Identifiant patient inconnu",
    IntegrationCode.INS_ABSENT: "INS absent du document",
    IntegrationCode.INS_MISMATCH: "INS ou traits d'identité ne correspondent pas",
    IntegrationCode.INS_INCOMPLETE: "INS incomplet (traits d'identité manquants)",
    IntegrationCode.OTHER: "Autre erreur",
}


class DocumentError(UserError):
    """A document or container that cannot be read safely or is not what it claims to be."""

    code: IntegrationCode = IntegrationCode.OTHER


class XmlSecurityError(DocumentError):
    """XML refused for safety: DTD, entity, size, depth or text-node limit."""


class MalformedXmlError(DocumentError):
    """XML that is not well-formed (syntax, encoding, invalid UTF-8)."""


class NotACdaError(DocumentError):
    """Well-formed XML whose root is not an HL7 CDA R2 ClinicalDocument."""


class CdaContentError(DocumentError):
    """A CDA whose header or body breaks a rule we rely on (bad base64, oversized body...)."""


class XdmError(DocumentError):
    """An IHE XDM package that is malformed (layout, METADATA, missing document)."""


class ArchiveSecurityError(XdmError):
    """A zip refused for safety: traversal, symlink, duplicate, encryption, bomb, lying header."""


class IntegrityError(XdmError):
    """A document whose bytes do not match the hash or size declared in METADATA."""


class PdfError(DocumentError):
    """Bytes that are not a sane PDF (magic, end marker, size)."""

"""The MSSanté document headers ``X-MSS-CODECDA`` and ``X-MSS-INS`` (Ref#2 ECO.2.4.1/2.4.2, mssante.md §1.6).

Both exist only when the message carries at least one CDA inside an IHE_XDM
archive; otherwise they are absent (``None``).
- ``X-MSS-CODECDA``: the CDA header ``code/@code`` values, comma-separated,
  in order of appearance, each listed once (``34112-3,PRESC-BIO,15508-5``).
- ``X-MSS-INS``: ``O`` when a qualified INS (matricule + INS OID + birth
  family name, first given name, birth date, sex) is present, else ``N``.
  Decision: with several CDAs, ``O`` only when every one of them carries a
  qualified INS, since a receiver reads ``O`` as "this can be integrated
  automatically". The header describes the content, so a production INS
  counts whatever our own filing policy is.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

from gateway.dmp_bridge.extract import DEFAULT_EXTRACTION_LIMITS, ExtractionLimits, ExtractionResult, extract_documents
from gateway.dmp_bridge.patient import is_qualified_ins

CODECDA_HEADER = "X-MSS-CODECDA"
INS_HEADER = "X-MSS-INS"


@dataclass(frozen=True)
class MssDocumentHeaders:
    codecda: str | None
    ins: str | None  # "O" or "N"

    def items(self) -> list[tuple[str, str]]:
        """The headers to set, absent ones left out."""
        pairs = ((CODECDA_HEADER, self.codecda), (INS_HEADER, self.ins))
        return [(name, value) for name, value in pairs if value is not None]


def compute_mss_headers(result: ExtractionResult) -> MssDocumentHeaders:
    cdas = [d.cda for d in result.xdm_cda_documents if d.cda is not None]
    if not cdas:
        return MssDocumentHeaders(None, None)
    codes = list(dict.fromkeys(cda.code.code for cda in cdas if cda.code is not None))
    qualified = all(is_qualified_ins(cda.patient) for cda in cdas)
    return MssDocumentHeaders(",".join(codes) or None, "O" if qualified else "N")


def mss_headers_for_message(message: EmailMessage, *, limits: ExtractionLimits = DEFAULT_EXTRACTION_LIMITS) -> MssDocumentHeaders:
    return compute_mss_headers(extract_documents(message, limits=limits))


def apply_mss_headers(message: EmailMessage, headers: MssDocumentHeaders, *, overwrite: bool = False) -> None:
    """Set the computed headers. By default a value the sender already gave is preserved;
    with ``overwrite`` both headers are replaced, and removed when the content calls for none."""
    if overwrite:
        del message[CODECDA_HEADER]
        del message[INS_HEADER]
    for name, value in headers.items():
        if name not in message:
            message[name] = value

"""X-MSS-CODECDA and X-MSS-INS from the CDAs inside IHE_XDM archives (Ref#2 ECO.2.4.1/2.4.2)."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from tests.dmp_bridge.xdm_builder import Entry, build_xdm

from gateway.dmp_bridge.extract import extract_documents
from gateway.dmp_bridge.mss_headers import MssDocumentHeaders, apply_mss_headers, compute_mss_headers, mss_headers_for_message

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
XDM_SUBJECT = "XDM/1.0/DDM+2 documents PAT-TROIS DOMINIQUE 28/03/1979"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def xdm_message(*names: str, bare: str | None = None) -> EmailMessage:
    draft = EmailMessage()
    draft["Subject"] = XDM_SUBJECT
    draft.set_content("Documents joints.")
    if names:
        entries = [Entry(f"DOC{i:04d}", f"DOC{i:04d}.XML", sample(name)) for i, name in enumerate(names, start=1)]
        draft.add_attachment(build_xdm(entries), maintype="application", subtype="zip", filename="IHE_XDM.ZIP")
    if bare:
        draft.add_attachment(sample(bare), maintype="text", subtype="xml", filename=bare)
    parsed = message_from_bytes(draft.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_codes_in_order_and_qualified_ins() -> None:
    headers = mss_headers_for_message(xdm_message("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml", "BIO-CR-BIO_2021.01_Microbiologie_V1.xml", "BIO-CR-BIO_2021.01_Microbiologie_V2.xml"))
    assert headers == MssDocumentHeaders("18748-4,11502-2", "O")
    assert headers.items() == [("X-MSS-CODECDA", "18748-4,11502-2"), ("X-MSS-INS", "O")]


def test_cda_without_ins_gives_n() -> None:
    assert mss_headers_for_message(xdm_message("sampleccd.xml")) == MssDocumentHeaders("34133-9", "N")


def test_one_cda_without_ins_makes_the_whole_message_n() -> None:
    assert mss_headers_for_message(xdm_message("LDL-SES_2022.01.xml", "sampleccd.xml")).ins == "N"


def test_production_ins_with_a_wrong_key_is_not_qualified() -> None:
    assert mss_headers_for_message(xdm_message("CSE-MDE_2023.01.xml")).ins == "N"


def test_absent_without_a_cda_in_an_xdm() -> None:
    headers = mss_headers_for_message(xdm_message(bare="VAC-NOTE_2023.01.xml"))
    assert headers == MssDocumentHeaders(None, None) and headers.items() == []


def test_the_direct_sample_counts_as_a_cda_in_an_xdm() -> None:
    draft = EmailMessage()
    draft["Subject"] = "XDM/1.0/DDM"
    draft.add_attachment(sample("samplexdm.zip"), maintype="application", subtype="zip", filename="IHE_XDM.zip")
    parsed = message_from_bytes(draft.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert compute_mss_headers(extract_documents(parsed)) == MssDocumentHeaders("34133-9", "N")


def test_apply_preserves_the_sender_values_unless_told_otherwise() -> None:
    message = EmailMessage()
    message["X-MSS-INS"] = "N"
    apply_mss_headers(message, MssDocumentHeaders("11502-2", "O"))
    assert (message["X-MSS-CODECDA"], message["X-MSS-INS"]) == ("11502-2", "N")
    apply_mss_headers(message, MssDocumentHeaders("18748-4", "O"), overwrite=True)
    assert (message["X-MSS-CODECDA"], message["X-MSS-INS"]) == ("18748-4", "O")
    assert len(message.get_all("X-MSS-INS") or []) == 1
    apply_mss_headers(message, MssDocumentHeaders(None, None), overwrite=True)
    assert "X-MSS-CODECDA" not in message and "X-MSS-INS" not in message

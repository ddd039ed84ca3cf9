"""Finding the documents of a delivered message: XDM, bare CDA, PDF; failures collected, never raised."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from tests.dmp_bridge.xdm_builder import CDA_BYTES, Entry, build_xdm, metadata_xml

from gateway.dmp_bridge.errors import IntegrationCode
from gateway.dmp_bridge.extract import ExtractionLimits, extract_documents

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
PDF = b"%PDF-1.4\n1 0 obj\n<< >>\nendobj\ntrailer\n<< >>\n%%EOF\n"
XDM_SUBJECT = "XDM/1.0/DDM+CR d'examens biologiques PAT-TROIS DOMINIQUE 28/03/1979"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def message(subject: str = "Compte rendu", attachments: list[tuple[bytes, str, str, str]] | None = None) -> EmailMessage:
    """A message as the pipeline sees it: serialised, then parsed with the default policy."""
    draft = EmailMessage()
    draft["From"] = "labo@labo.mssante.fr"
    draft["To"] = "279035121518989@patient.mssante.fr"
    draft["Subject"] = subject
    draft.set_content("Veuillez trouver ci-joint le compte rendu.")
    for content, maintype, subtype, filename in attachments or []:
        draft.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    parsed = message_from_bytes(draft.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@needs_samples
def test_xdm_with_a_ci_sis_cda_and_its_pdf_rendering() -> None:
    cda = sample("BIO-CR-BIO_2021.01_Microbiologie_V1.xml")
    xdm = build_xdm([Entry("DOC0001", "DOC0001.XML", cda, unique_id="1.2.250.1.213.1.1.1.55.2021.6.1")])
    result = extract_documents(message(XDM_SUBJECT, [(xdm, "application", "zip", "IHE_XDM.ZIP"), (PDF, "application", "pdf", "20210104_CR.pdf")]))
    assert result.failures == ()
    xdm_document, pdf_document = result.documents
    assert xdm_document.source == "xdm" and xdm_document.attachment == "IHE_XDM.ZIP"
    assert xdm_document.filename == "IHE_XDM/SUBSET01/DOC0001.XML" and xdm_document.content == cda
    assert xdm_document.cda is not None and xdm_document.cda.code is not None and xdm_document.cda.code.code == "11502-2"
    assert xdm_document.xdm_entry is not None and xdm_document.xdm_submission_set is not None
    assert xdm_document.warnings == ()  # METADATA and CDA agree on uniqueId and INS
    assert pdf_document.source == "pdf" and pdf_document.pdf is not None and pdf_document.accompanies_structured
    assert len(result.packages) == 1 and len(result.xdm_cda_documents) == 1


@needs_samples
def test_metadata_disagreeing_with_the_cda_is_reported() -> None:
    cda = sample("VAC-NOTE_2023.01.xml")
    entries = [Entry("DOC0001", "DOC0001.XML", cda, unique_id="1.2.3.999")]
    xdm = build_xdm(entries, metadata=metadata_xml(entries, patient_id="179035121518990^^^&1.2.250.1.213.1.4.10&ISO^NH"))
    [document] = extract_documents(message(XDM_SUBJECT, [(xdm, "application", "zip", "IHE_XDM.ZIP")])).documents
    assert any("uniqueId" in w for w in document.warnings)
    assert any("patientId" in w for w in document.warnings)


def test_any_zip_is_xdm_when_the_subject_says_so() -> None:
    xdm = build_xdm([Entry("DOC0001", "DOC0001.XML", CDA_BYTES)])
    with_marker = extract_documents(message(XDM_SUBJECT.lower(), [(xdm, "application", "zip", "envoi.zip")]))
    assert [d.source for d in with_marker.documents] == ["xdm"]
    without_marker = extract_documents(message("Photos", [(xdm, "application", "zip", "envoi.zip")]))
    assert without_marker.documents == () and without_marker.failures == ()


def test_attachment_name_is_compared_without_case() -> None:
    xdm = build_xdm([Entry("DOC0001", "DOC0001.XML", CDA_BYTES)])
    result = extract_documents(message("no marker", [(xdm, "application", "octet-stream", "ihe_xdm.zip")]))
    assert [d.source for d in result.documents] == ["xdm"]


@needs_samples
def test_bare_cda_level_1_and_plain_pdf() -> None:
    cda = sample("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml")
    result = extract_documents(message(attachments=[(cda, "text", "xml", "CR_IMG.xml"), (PDF, "application", "octet-stream", "scan")]))
    cda_document, pdf_document = result.documents
    assert cda_document.source == "cda" and cda_document.filename == "CR_IMG.xml" and cda_document.mime_type == "text/xml"
    assert cda_document.cda is not None and cda_document.cda.body is not None
    assert cda_document.cda.body.content is not None and cda_document.cda.body.content.startswith(b"%PDF")
    assert pdf_document.source == "pdf" and pdf_document.accompanies_structured


def test_plain_pdf_alone_is_not_a_companion() -> None:
    [document] = extract_documents(message(attachments=[(PDF, "application", "pdf", "cr.pdf")])).documents
    assert document.source == "pdf" and not document.accompanies_structured


@needs_samples
def test_bad_attachments_are_collected_and_the_good_ones_kept() -> None:
    hostile_xml = b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><ClinicalDocument xmlns="urn:hl7-org:v3">&x;</ClinicalDocument>'
    result = extract_documents(
        message(
            XDM_SUBJECT,
            [
                (sample("xdm.zip"), "application", "zip", "IHE_XDM.ZIP"),
                (hostile_xml, "application", "xml", "evil.xml"),
                (b"%PDF-1.4 truncated", "application", "pdf", "broken.pdf"),
                (b"<Bundle xmlns='http://hl7.org/fhir'/>", "application", "xml", "bundle.xml"),
                (sample("VAC-NOTE_2023.01.xml"), "application", "xml", "vac.xml"),
            ],
        )
    )
    assert [d.attachment for d in result.documents] == ["vac.xml"]
    reasons = {f.attachment: f.reason for f in result.failures}
    assert set(reasons) == {"IHE_XDM.ZIP", "evil.xml", "broken.pdf"}
    assert "'/' missing" in reasons["IHE_XDM.ZIP"] and "DTD" in reasons["evil.xml"] and "%%EOF" in reasons["broken.pdf"]
    assert all(f.code is IntegrationCode.OTHER for f in result.failures)
    assert result.notes == ("bundle.xml: XML whose root is <Bundle>, not a CDA document; not filed",)


def test_corrupt_document_inside_a_package_fails_alone() -> None:
    xdm = build_xdm([Entry("GOOD", "GOOD.XML", CDA_BYTES), Entry("BAD", "BAD.XML", b"<ClinicalDocument xmlns='urn:hl7-org:v3'><title>no id</title></ClinicalDocument>")])
    result = extract_documents(message(XDM_SUBJECT, [(xdm, "application", "zip", "IHE_XDM.ZIP")]))
    assert [d.filename for d in result.documents] == ["IHE_XDM/SUBSET01/GOOD.XML"]
    [failure] = result.failures
    assert failure.attachment == "IHE_XDM.ZIP: IHE_XDM/SUBSET01/BAD.XML" and "document id" in failure.reason


def test_signature_documents_are_marked() -> None:
    entries = [Entry("DOC0001", "DOC0001.XML", CDA_BYTES), Entry("SIG", "SIG.XML", b"<Signature/>", format_code="http://www.w3.org/2000/09/xmldsig#")]
    xdm = build_xdm(entries, metadata=metadata_xml(entries, signs=("SIG", "SubmissionSet01")))
    result = extract_documents(message(XDM_SUBJECT, [(xdm, "application", "zip", "IHE_XDM.ZIP")]))
    signature = next(d for d in result.documents if d.xdm_entry is not None and d.xdm_entry.entry_id == "SIG")
    assert signature.is_signature and signature.cda is None


def test_attached_messages_are_not_entered() -> None:
    inner = message(attachments=[(PDF, "application", "pdf", "cr.pdf")])
    outer = EmailMessage()
    outer["Subject"] = "Fwd"
    outer.set_content("see attached")
    outer.add_attachment(inner)
    parsed = message_from_bytes(outer.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert extract_documents(parsed).documents == ()


def nested(depth: int) -> EmailMessage:
    leaf = EmailMessage()
    leaf.set_content(PDF, maintype="application", subtype="pdf", filename="deep.pdf")
    current = leaf
    for _ in range(depth):
        wrapper = EmailMessage()
        wrapper.make_mixed()
        wrapper.attach(current)
        current = wrapper
    current["Subject"] = "deep"
    parsed = message_from_bytes(current.as_bytes(), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_mime_depth_is_bounded() -> None:
    assert len(extract_documents(nested(3)).documents) == 1
    result = extract_documents(nested(12), limits=ExtractionLimits(max_mime_depth=5))
    assert result.documents == ()
    assert any("deeper than 5" in f.reason for f in result.failures)


def test_part_count_is_bounded() -> None:
    many = message(attachments=[(PDF, "application", "pdf", f"cr{i}.pdf") for i in range(20)])
    result = extract_documents(many, limits=ExtractionLimits(max_parts=10))
    assert 0 < len(result.documents) < 20
    assert any("more than 10 MIME parts" in f.reason for f in result.failures)


def test_oversized_attachment_is_a_failure() -> None:
    result = extract_documents(message(attachments=[(PDF, "application", "pdf", "cr.pdf")]), limits=ExtractionLimits(max_attachment_bytes=10))
    assert result.documents == () and "limit is 10 bytes" in result.failures[0].reason


def test_plain_message_has_nothing() -> None:
    result = extract_documents(message())
    assert (result.documents, result.failures, result.packages, result.notes) == ((), (), (), ())

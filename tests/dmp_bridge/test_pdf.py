"""PDF recognition and cheap Info-dictionary reading."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dmp_bridge.cda import parse_cda
from gateway.dmp_bridge.errors import PdfError
from gateway.dmp_bridge.pdf import inspect_pdf, looks_like_pdf

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")


def pdf_with_info(info: bytes, *, trailer_extra: bytes = b"") -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"
        b"7 0 obj\n" + info + b"\nendobj\n"
        b"trailer\n<< /Root 1 0 R /Info 7 0 R " + trailer_extra + b">>\nstartxref\n0\n%%EOF\n"
    )


@needs_samples
def test_pdf_embedded_in_the_level_1_sample() -> None:
    body = parse_cda((SAMPLES / "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml").read_bytes()).body
    assert body is not None and body.content is not None
    info = inspect_pdf(body.content)
    assert info.version == "1.7" and info.size == len(body.content) and not info.encrypted
    assert info.creation_date == datetime(2023, 11, 8, 15, 33, 45, tzinfo=timezone(timedelta(hours=1)))
    assert info.title is None  # that PDF's Info dictionary has no /Title


def test_literal_title_with_escapes_and_nesting() -> None:
    info = inspect_pdf(pdf_with_info(rb"<< /Title (CR \(biologie\) \351t\351 (v2)\\x) /CreationDate (D:20210104160527Z) >>"))
    assert info.title == "CR (biologie) été (v2)\\x"
    assert info.creation_date == datetime(2021, 1, 4, 16, 5, 27, tzinfo=timezone.utc)


def test_hex_utf16_title_and_negative_offset() -> None:
    title = "Compte rendu é".encode("utf-16-be")
    info = inspect_pdf(pdf_with_info(b"<< /Title <FEFF" + title.hex().upper().encode() + b"> /CreationDate (D:20210104160527-05'30') >>"))
    assert info.title == "Compte rendu é"
    assert info.creation_date == datetime(2021, 1, 4, 16, 5, 27, tzinfo=timezone(-timedelta(hours=5, minutes=30)))


def test_info_in_a_compressed_object_stream_is_skipped() -> None:
    data = b"%PDF-1.7\ntrailer\n<< /Info 12 0 R >>\n%%EOF"
    info = inspect_pdf(data)
    assert (info.title, info.creation_date) == (None, None)


def test_encrypted_pdf_metadata_is_not_read() -> None:
    info = inspect_pdf(pdf_with_info(b"<< /Title (secret) >>", trailer_extra=b"/Encrypt 9 0 R "))
    assert info.encrypted and info.title is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a", "does not start with %PDF-"),
        (b"%PDF-1.4\n1 0 obj", "no %%EOF"),
        (b"%PDF-1.4\n%%EOF" + b" " * 2000, "no %%EOF"),
    ],
)
def test_not_a_sane_pdf(data: bytes, message: str) -> None:
    with pytest.raises(PdfError, match=message):
        inspect_pdf(data)


def test_size_is_bounded() -> None:
    with pytest.raises(PdfError, match="limit is 10 bytes"):
        inspect_pdf(b"%PDF-1.4\n%%EOF", max_bytes=10)


def test_magic_detection() -> None:
    assert looks_like_pdf(b"%PDF-2.0")
    assert not looks_like_pdf(b" %PDF-1.4") and not looks_like_pdf(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024))
def test_random_bytes_raise_only_pdf_errors(data: bytes) -> None:
    for candidate in (data, b"%PDF-1.4\n" + data + b"\n%%EOF"):
        try:
            inspect_pdf(candidate)
        except PdfError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_info_dictionaries_never_crash(info: bytes) -> None:
    inspect_pdf(pdf_with_info(b"<< /Title (" + info + b" /CreationDate (D:" + info + b") >>"))
    inspect_pdf(pdf_with_info(b"<< /Title <" + info + b"> >>"))

"""A filed document's human-readable part: the real CI-SIS samples, and hostile narratives that must stay inert."""

from __future__ import annotations

import base64

import pytest

from gateway.dmp_bridge.narrative import ReadableKind, human_readable, sanitise
from tests.dmp_bridge.filing_world import SAMPLES, sample

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")

CDA_HEAD = """<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <id root="1.2.3.4" extension="doc1"/>
  <title>Compte rendu &lt;b&gt;test&lt;/b&gt;</title>
"""


def _structured(text: str, *, nested: str = "") -> bytes:
    return (CDA_HEAD + f"""<component><structuredBody><component><section>
      <title>Résultats</title><text>{text}</text>{nested}</section></component></structuredBody></component>
</ClinicalDocument>""").encode("utf-8")


def _unstructured(media_type: str, payload: bytes) -> bytes:
    encoded = base64.b64encode(payload).decode("ascii")
    return (CDA_HEAD + f"""<component><nonXMLBody><text mediaType="{media_type}" representation="B64">{encoded}</text>
</nonXMLBody></component></ClinicalDocument>""").encode("utf-8")


def test_a_level_three_report_gives_its_sections_as_tables() -> None:
    readable = human_readable(sample("BIO-CR-BIO_2021.01_Microbiologie_V2.xml"))
    assert readable.kind == ReadableKind.SECTIONS and readable.title == "Compte rendu d'examens biologiques"
    [section] = readable.sections
    assert section.title == "Examen cytobactériologique des urines (ECBU)"
    assert "<table>" in section.html and "<th>Prélèvement</th>" in section.html and "paille" in section.html
    assert "ID=" not in section.html and "content" not in section.html


def test_a_discharge_letter_gives_every_section_in_order() -> None:
    readable = human_readable(sample("LDL-SES_2022.01.xml"))
    titles = [section.title for section in readable.sections]
    assert len(titles) == 9 and titles[:2] == ["Statut du document", "Motif de l'hospitalisation"]


def test_a_level_one_report_gives_its_embedded_pdf() -> None:
    readable = human_readable(sample("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"))
    assert readable.kind == ReadableKind.PDF and readable.pdf is not None and readable.pdf.startswith(b"%PDF-")
    assert readable.title is not None and readable.title.startswith("CR d")


def test_a_bare_pdf_is_a_pdf() -> None:
    assert human_readable(b"%PDF-1.4\n%%EOF\n").kind == ReadableKind.PDF


def test_level_one_text_is_text_and_html_is_never_rendered() -> None:
    text = human_readable(_unstructured("text/plain", "Tension 12/8 <ok>".encode()))
    assert text.kind == ReadableKind.TEXT and text.text == "Tension 12/8 <ok>"
    hostile = human_readable(_unstructured("text/html", b"<script>alert(1)</script>"))
    assert hostile.kind == ReadableKind.NONE and hostile.text is None


def test_narrative_markup_maps_to_the_allowed_subset() -> None:
    readable = human_readable(_structured(
        '<paragraph>Résultat <content styleCode="Bold Italics">normal</content><sup>2</sup><br/>fin</paragraph>'
        '<list listType="ordered"><item>un</item><item>deux</item></list>'
        '<table><tbody><tr><td colspan="2" rowspan="999999">x</td></tr></tbody></table>',
        nested='<component><section><title>Détail</title><text>sous-section</text></section></component>'))
    first, nested = readable.sections
    assert first.html == ('<p>Résultat <em><strong>normal</strong></em><sup>2</sup><br>fin</p>'
                          '<ol><li>un</li><li>deux</li></ol>'
                          '<table><tbody><tr><td colspan="2">x</td></tr></tbody></table>')
    assert (nested.title, nested.html, nested.depth) == ("Détail", "sous-section", 2)


@pytest.mark.parametrize("hostile", [
    '<paragraph onmouseover="alert(1)">a</paragraph>',
    '<linkHtml href="javascript:alert(1)">cliquez</linkHtml>',
    '<xhtml:script xmlns:xhtml="http://www.w3.org/1999/xhtml">alert(1)</xhtml:script>',
    '<xhtml:img xmlns:xhtml="http://www.w3.org/1999/xhtml" src="x" onerror="alert(1)"/>',
    '&lt;script&gt;alert(1)&lt;/script&gt;',
    '<content styleCode="Bold&quot; onclick=&quot;alert(1)">a</content>',
    '<renderMultiMedia referencedObject="img1"/>',
    '<table onload="alert(1)" style="background:url(javascript:alert(1))"><tr><td>a</td></tr></table>',
])
def test_a_script_in_a_filed_document_stays_text(hostile: str) -> None:
    [section] = human_readable(_structured(hostile)).sections
    lowered = section.html.lower()
    assert "<script" not in lowered and "<img" not in lowered and "<a " not in lowered
    assert "onmouseover=" not in lowered and "onerror=" not in lowered and "onclick=" not in lowered
    assert "onload=" not in lowered and "javascript:" not in lowered
    assert "href=" not in lowered and "src=" not in lowered and "style=" not in lowered


def test_titles_are_plain_text() -> None:
    readable = human_readable(_structured("x"))
    assert readable.title == "Compte rendu <b>test</b>", "escaped by the template, never marked safe"


def test_sanitise_is_the_last_word() -> None:
    assert sanitise('<p onclick="x">a</p><script>b</script><a href="https://x">c</a>') == "<p>a</p>c"

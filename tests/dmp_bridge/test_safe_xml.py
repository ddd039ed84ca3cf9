"""The hardened XML entry point: DTDs, entities, limits and malformed input are refused with our errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dmp_bridge.errors import DocumentError, MalformedXmlError, XmlSecurityError
from gateway.dmp_bridge.safe_xml import XmlLimits, local_name, namespace_of, parse_xml

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&lol4;</title></ClinicalDocument>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&xxe;</title></ClinicalDocument>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/evil.dtd"> %remote;]>
<a/>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?><!DOCTYPE a SYSTEM "http://127.0.0.1:9/a.dtd"><a/>"""


@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY, EXTERNAL_DTD], ids=["billion-laughs", "xxe", "parameter-entity", "external-dtd"])
def test_dtds_and_entities_are_refused(document: bytes) -> None:
    with pytest.raises(XmlSecurityError, match="DTD"):
        parse_xml(document)


def test_undefined_entity_reference_is_malformed() -> None:
    with pytest.raises(MalformedXmlError, match="undefined entity"):
        parse_xml(b"<a>&nowhere;</a>")


def test_deep_nesting_is_refused() -> None:
    deep = b"<a>" * 200 + b"</a>" * 200
    with pytest.raises(XmlSecurityError, match="deeper than 128"):
        parse_xml(deep)


def test_nesting_at_the_limit_is_accepted() -> None:
    limits = XmlLimits(max_depth=10)
    root = parse_xml(b"<a>" * 10 + b"</a>" * 10, limits=limits)
    assert root.tag == "a"


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(XmlSecurityError, match="limit is 100 bytes"):
        parse_xml(b"<a>" + b"x" * 200 + b"</a>", limits=XmlLimits(max_bytes=100))


def test_huge_text_node_is_refused_even_when_split_by_the_parser() -> None:
    # Character references make expat deliver the text in several pieces.
    text = b"x&#65;" * 5000
    with pytest.raises(XmlSecurityError, match="text node longer than 1000"):
        parse_xml(b"<a>" + text + b"</a>", limits=XmlLimits(max_text_chars=1000))


def test_too_many_elements_and_attributes_are_refused() -> None:
    with pytest.raises(XmlSecurityError, match="more than 50 elements"):
        parse_xml(b"<a>" + b"<b/>" * 100 + b"</a>", limits=XmlLimits(max_elements=50))
    attributes = b" ".join(b'a%d="1"' % i for i in range(20))
    with pytest.raises(XmlSecurityError, match="20 attributes"):
        parse_xml(b"<a " + attributes + b"/>", limits=XmlLimits(max_attributes=10))


def test_invalid_utf8_is_refused() -> None:
    with pytest.raises(MalformedXmlError, match="invalid token"):
        parse_xml(b'<?xml version="1.0" encoding="UTF-8"?><title>caf\xe9 \xff\xfe</title>')


def test_not_well_formed_and_empty_inputs_are_refused() -> None:
    for document in (b"", b"<a>", b"<a></b>", b"just text", b"<a/><b/>"):
        with pytest.raises(MalformedXmlError):
            parse_xml(document)


def test_namespaces_are_in_clark_notation() -> None:
    root = parse_xml(b'<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:x="urn:x"><x:id x:root="1"/></ClinicalDocument>')
    assert root.tag == "{urn:hl7-org:v3}ClinicalDocument"
    assert root[0].tag == "{urn:x}id" and root[0].get("{urn:x}root") == "1"
    assert local_name(root.tag) == "ClinicalDocument" and namespace_of(root.tag) == "urn:hl7-org:v3"
    assert namespace_of("plain") is None


def test_undeclared_prefix_is_malformed_but_readable_without_namespaces() -> None:
    fragment = b'<ns3:SubmitObjectsRequest xmlns="urn:rim"><RegistryObjectList><ns2:Slot name="x"/></RegistryObjectList></ns3:SubmitObjectsRequest>'
    with pytest.raises(MalformedXmlError, match="unbound prefix"):
        parse_xml(fragment)
    root = parse_xml(fragment, namespace_aware=False)
    assert root.tag == "SubmitObjectsRequest"
    assert root[0][0].tag == "Slot" and root[0][0].attrib == {"name": "x"}


def test_namespace_agnostic_mode_still_refuses_dtds() -> None:
    with pytest.raises(XmlSecurityError):
        parse_xml(BILLION_LAUGHS, namespace_aware=False)


def test_comments_and_processing_instructions_are_dropped() -> None:
    root = parse_xml(b'<?xml-stylesheet href="x.xsl"?><a><!-- note --><b>t</b></a>')
    assert [child.tag for child in root] == ["b"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_document_errors(data: bytes) -> None:
    try:
        parse_xml(data)
    except DocumentError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/=\"'&;!?[]%: abxmlns-#0123DOCTYPEENTITY\n")), max_size=300), st.booleans())
def test_random_markup_raises_only_document_errors(text: str, namespace_aware: bool) -> None:
    try:
        parse_xml(text.encode(), namespace_aware=namespace_aware)
    except DocumentError:
        pass

"""The hardened XML entry point: DTDs, entities, limits and malformed input are refused with our errors."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dmp_bridge.errors import DocumentError, MalformedXmlError, XmlSecurityError
from gateway.dmp_bridge.safe_xml import XmlLimits, _BoundedTreeBuilder, _fast_parse, local_name, namespace_of, parse_xml

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"

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


# -- the fast path (ElementTree's C parser) accepts only what the reference parser accepts, with the same tree


def _reference(data: bytes, limits: XmlLimits) -> bytes | DocumentError:
    try:
        return ET.tostring(_BoundedTreeBuilder(limits, True).parse(data))
    except DocumentError as error:
        return error


def _assert_fast_path_agrees(data: bytes, limits: XmlLimits = XmlLimits()) -> ET.Element | None:
    fast = _fast_parse(data, limits)
    if fast is not None:
        reference = _reference(data, limits)
        assert not isinstance(reference, DocumentError), f"fast path accepted what the reference refuses: {reference}"
        assert ET.tostring(fast) == reference
    return fast


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
@pytest.mark.parametrize("sample", sorted(SAMPLES.glob("*.xml")), ids=lambda path: path.name)
def test_the_cda_samples_take_the_fast_path_with_the_reference_tree(sample: Path) -> None:
    assert _assert_fast_path_agrees(sample.read_bytes()) is not None


UTF16_BILLION_LAUGHS = BILLION_LAUGHS.replace(b'version="1.0"', b'version="1.0" encoding="UTF-16"').decode().encode("utf-16")
LATIN1_XXE = EXTERNAL_ENTITY.replace(b'version="1.0"', b'version="1.0" encoding="ISO-8859-1"')


@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY, EXTERNAL_DTD, UTF16_BILLION_LAUGHS,
                                      LATIN1_XXE, BILLION_LAUGHS.replace(b'<?xml version="1.0"?>\n', b"\xef\xbb\xbf")],
                         ids=["billion-laughs", "xxe", "parameter-entity", "external-dtd", "utf16-billion-laughs",
                              "latin1-xxe", "bom-billion-laughs"])
def test_documents_with_a_dtd_never_take_the_fast_path_and_are_refused(document: bytes) -> None:
    assert _fast_parse(document, XmlLimits()) is None
    with pytest.raises(XmlSecurityError, match="DTD"):
        parse_xml(document)


@pytest.mark.parametrize("document, limits, refusal", [
    (b"<a>" * 200 + b"</a>" * 200, XmlLimits(), "deeper than 128"),
    (b"<a " + b" ".join(b'a%d="1"' % i for i in range(20)) + b"/>", XmlLimits(max_attributes=10), "20 attributes"),
    (b"<a>" + b"<b/>" * 100 + b"</a>", XmlLimits(max_elements=50), "more than 50 elements"),
    (b"<a>" + b"x" * 2000 + b"</a>", XmlLimits(max_text_chars=1000), "text node longer than 1000"),
], ids=["depth", "attributes", "elements", "text"])
def test_limits_breached_without_a_dtd_are_refused_by_the_reference_parser(document: bytes, limits: XmlLimits,
                                                                            refusal: str) -> None:
    assert _fast_parse(document, limits) is None
    with pytest.raises(XmlSecurityError, match=refusal):
        parse_xml(document, limits=limits)


@pytest.mark.parametrize("document", [
    b'<?xml version="1.0" encoding="ISO-8859-1"?><a>caf\xe9</a>',  # Latin-1 declared: the reference parser reads it
    b'<?xml version="1.0" encoding="utf8"?><a/>',  # a name expat does not know
    '<?xml version="1.0" encoding="UTF-16"?><a>é</a>'.encode("utf-16"),
    b"\xef\xbb\xbf<a>t</a>",
    b" <?xml version='1.0'?><a/>",  # a declaration not at the start
    b"<a><!-- <!DOCTYPE a> --></a>",
    b'<a xmlns:p="urn:p" p:x="1" y="&lt;&#65;"><p:b>t<![CDATA[<c>]]>u</p:b>tail</a>',
    b"<p:a/>",
])
def test_the_fast_path_agrees_with_the_reference_parser_on_edge_cases(document: bytes) -> None:
    _assert_fast_path_agrees(document)
    reference = _reference(document, XmlLimits())
    if isinstance(reference, DocumentError):
        with pytest.raises(DocumentError):
            parse_xml(document)
    else:
        assert ET.tostring(parse_xml(document)) == reference


_MARKUP = st.sampled_from(["<a>", "</a>", "<b/>", "<p:c xmlns:p='urn:p'>", "</p:c>", ' x="1"', " y='&amp;'", "&lt;",
                           "&#65;", "&#0;", "text", " ", "\r\n", "<!-- c -->", "<![CDATA[<z>]]>", "<?pi x?>", "é",
                           '<?xml version="1.0" encoding="UTF-8"?>', '<?xml version="1.0"?>', "<!DOCTYPE a>", ">", "<",
                           "&nowhere;", '<d xmlns="urn:d">', "</d>", "\ufeff", "\x00"])
_TEXT = st.lists(st.sampled_from(["t", "é", "&lt;", "&#65;", "&#x1F600;", " ", "\r\n", "<!-- c -->", "<![CDATA[<z>&]]>",
                                  "<?pi x?>", "\t"]), max_size=4).map("".join)
_NAME = st.sampled_from(["a", "b", "p:c", "q:d", "id", "ClinicalDocument"])
_ATTRIBUTE = st.tuples(st.sampled_from(["x", "y", "p:z", "xml:lang", "xmlns", "xmlns:p", "xmlns:q"]),
                       st.sampled_from(["1", "urn:p", "&amp;", "&#65;b", "", "urn:hl7-org:v3"]))


def _element(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def build(name: str, attributes: list[tuple[str, str]], text: str, inner: list[str]) -> str:
        attribute_text = "".join(f' {key}="{value}"' for key, value in dict(attributes).items())
        return f"<{name}{attribute_text}>{text}{''.join(inner)}</{name}>"
    return st.builds(build, _NAME, st.lists(_ATTRIBUTE, max_size=3), _TEXT, st.lists(children, max_size=3))


_DOCUMENT = st.tuples(st.sampled_from(["", '<?xml version="1.0"?>', "<?xml version='1.0' encoding='utf-8'?>\r\n",
                                       "\ufeff", '<?xml version="1.0" encoding="ISO-8859-1"?>', "<!-- prolog -->"]),
                      st.recursive(_element(_TEXT), _element, max_leaves=12), _TEXT)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MARKUP, max_size=40), st.sampled_from([XmlLimits(), XmlLimits(max_depth=2, max_attributes=1, max_elements=4)]))
def test_the_fast_path_accepts_only_what_the_reference_parser_accepts(pieces: list[str], limits: XmlLimits) -> None:
    _assert_fast_path_agrees("".join(pieces).encode(), limits)


@settings(max_examples=300, deadline=None)
@given(_DOCUMENT, st.sampled_from([XmlLimits(), XmlLimits(max_depth=3, max_attributes=2, max_elements=6)]),
       st.sampled_from(["utf-8", "latin-1"]))
def test_the_fast_path_builds_the_reference_tree_of_well_formed_documents(document: tuple[str, str, str], limits: XmlLimits,
                                                                           encoding: str) -> None:
    prolog, root, trailer = document
    data = (prolog + root + ("" if "<" in trailer or "&" in trailer else trailer.strip())).encode(encoding, "replace")
    _assert_fast_path_agrees(data, limits)

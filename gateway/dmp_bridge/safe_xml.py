"""The one XML entry point of the DMP bridge: hardened, bounded, no network.

Everything we parse (CDA documents, XDM METADATA) comes from strangers, so:
- any DTD is refused (``<!DOCTYPE`` stops the parse at once): no internal
  entities (billion laughs), no external entities (XXE), nothing fetched;
- the input size, element depth, element count, attributes per element and
  the length of one text node are bounded (``XmlLimits``);
- not well-formed input, unknown encodings and invalid UTF-8 are refused.

The reference parser is built on expat directly (not
``xml.etree.ElementTree.XMLParser``) so that every refusal happens inside a
handler, before any expansion, and so that METADATA fragments with undeclared
prefixes (the DRIMbox ``ns3:`` case, mssante.md §3.2) can be read in a
namespace-agnostic mode where names keep only their local part.

Its Python handlers cost about 1.3 ms for a 24 KB CDA, most of a document's
extraction, so a namespace-aware parse first tries a fast path (``_fast_parse``):
the same expat, driven by ElementTree's C parser and tree builder (no Python
per element), taken only for input that cannot reach anything the reference
parser refuses inside a handler, as read from the bytes before parsing:
- no ``<!DOCTYPE`` and no ``<!ENTITY`` anywhere (XML 1.0 §2.8: a DTD starts with
  those literal characters), in an encoding where they are those bytes: UTF-8
  only (no declaration, or ``encoding="UTF-8"``; no NUL byte, which every
  UTF-16 document has), parsed with the encoding forced to UTF-8;
  without a DTD there is no entity to expand or fetch (§4.1: only the five
  predefined ones and character references);
- at most ``max_elements`` ``<`` characters (every element starts with one),
  and not more bytes than ``max_text_chars`` (a text node has at most one
  character per byte), so the tree is bounded before it is built;
- depth and attributes per element are checked on the built tree (its size is
  bounded by the element count above).
Anything else, and every refusal (a malformed document, a breached limit), goes
to the reference parser, whose verdict and message are the answer: the fast
path only ever accepts what the reference parser accepts, with the same tree.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from xml.parsers import expat

from gateway.dmp_bridge.errors import MalformedXmlError, XmlSecurityError


@dataclass(frozen=True)
class XmlLimits:
    """Upper bounds for one XML document; the defaults fit CDA documents with an embedded PDF."""

    max_bytes: int = 32 * 1024 * 1024
    max_depth: int = 128
    max_elements: int = 500_000
    max_attributes: int = 256
    # A level-1 CDA carries its whole PDF as one base64 text node.
    max_text_chars: int = 24 * 1024 * 1024


DEFAULT_XML_LIMITS = XmlLimits()


def local_name(tag: str) -> str:
    """``{urn:hl7-org:v3}id`` -> ``id``; a name without namespace is returned unchanged."""
    return tag.rsplit("}", 1)[-1]


def namespace_of(tag: str) -> str | None:
    """``{urn:hl7-org:v3}id`` -> ``urn:hl7-org:v3``; ``None`` for a name without namespace."""
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else None


def parse_xml(data: bytes, *, limits: XmlLimits = DEFAULT_XML_LIMITS, namespace_aware: bool = True) -> ET.Element:
    """Parse ``data`` into an element tree or raise ``XmlSecurityError`` / ``MalformedXmlError``.

    With ``namespace_aware=False`` prefixes are dropped from element and
    attribute names (``ns3:SubmitObjectsRequest`` -> ``SubmitObjectsRequest``)
    and ``xmlns`` declarations are ignored, so undeclared prefixes are accepted.
    """
    if len(data) > limits.max_bytes:
        raise XmlSecurityError(f"XML of {len(data)} bytes refused: the limit is {limits.max_bytes} bytes")
    if namespace_aware:
        fast = _fast_parse(data, limits)
        if fast is not None:
            return fast
    return _BoundedTreeBuilder(limits, namespace_aware).parse(data)


# XML 1.0 §2.8 (XMLDecl, EncodingDecl): the declaration, only at the very start (after a UTF-8 BOM).
_XML_DECLARATION = re.compile(
    rb"(?:\xef\xbb\xbf)?<\?xml[ \t\r\n]+version[ \t\r\n]*=[ \t\r\n]*(?:\"1\.[0-9]+\"|'1\.[0-9]+')"
    rb"(?:[ \t\r\n]+encoding[ \t\r\n]*=[ \t\r\n]*(?:\"([A-Za-z][A-Za-z0-9._-]*)\"|'([A-Za-z][A-Za-z0-9._-]*)'))?")
_DECLARATION_START = re.compile(rb"(?:\xef\xbb\xbf)?<\?xml[ \t\r\n]")


def _fast_parse(data: bytes, limits: XmlLimits) -> ET.Element | None:
    """``data``'s tree by ElementTree's C parser when nothing in it can be refused by a handler of the
    reference parser (see the module's notes); None to let the reference parser decide."""
    if not _screened_for_fast_path(data, limits):
        return None
    parser = ET.XMLParser(encoding="utf-8")  # the C parser; the declaration was checked to say UTF-8
    try:
        parser.feed(data)
        root = parser.close()
    except ET.ParseError:
        return None  # the reference parser gives the refusal and its message
    if not _within_shape_limits(root, limits):
        return None
    return root


def _screened_for_fast_path(data: bytes, limits: XmlLimits) -> bool:
    """UTF-8 without a DTD, and too small to hold more elements or a longer text than the limits."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data or b"\x00" in data:
        return False
    if len(data) > limits.max_text_chars or data.count(b"<") > limits.max_elements:
        return False
    if _DECLARATION_START.match(data) is None:
        return True  # no declaration: UTF-8 (XML 1.0 §4.3.3, no BOM or NUL for anything else)
    declaration = _XML_DECLARATION.match(data)
    if declaration is None:
        return False  # a declaration this screen does not read: the reference parser judges it
    encoding = declaration.group(1) or declaration.group(2)
    return encoding is None or encoding.lower() == b"utf-8"


def _within_shape_limits(root: ET.Element, limits: XmlLimits) -> bool:
    """The depth and the attributes per element of a built tree, level by level (no recursion)."""
    level, depth = [root], 0
    while level:
        depth += 1
        if depth > limits.max_depth:
            return False
        for element in level:
            if len(element.attrib) > limits.max_attributes:
                return False
        level = [child for element in level for child in element]
    return True


class _BoundedTreeBuilder:
    """Feeds expat events into an ElementTree ``TreeBuilder`` while enforcing ``XmlLimits``."""

    def __init__(self, limits: XmlLimits, namespace_aware: bool) -> None:
        self._limits = limits
        self._namespace_aware = namespace_aware
        self._tree = ET.TreeBuilder()
        self._parser = self._make_parser()

    def parse(self, data: bytes) -> ET.Element:
        try:
            self._parser.Parse(data, True)
        except expat.ExpatError as error:
            raise MalformedXmlError(f"not well-formed XML: {expat.ErrorString(error.code)} (line {error.lineno}, column {error.offset})") from None
        return self._tree.close()

    def _make_parser(self) -> expat.XMLParserType:
        parser = expat.ParserCreate(namespace_separator=" " if self._namespace_aware else None)
        # Parameter entities would let an internal subset pull in external DTDs.
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.buffer_text = True
        parser.StartDoctypeDeclHandler = self._refuse_doctype
        parser.EntityDeclHandler = self._refuse_entity
        parser.UnparsedEntityDeclHandler = self._refuse_unparsed_entity
        parser.ExternalEntityRefHandler = self._refuse_external_entity
        parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = self._handlers()
        return parser

    def _handlers(self) -> tuple[Callable[[str, dict[str, str]], None], Callable[[str], None], Callable[[str], None]]:
        """The element and text handlers, as closures over the limits and the counters: they run once per
        element and text run of every document, so they avoid attribute look-ups and method calls."""
        max_depth, max_elements = self._limits.max_depth, self._limits.max_elements
        max_attributes, max_text_chars = self._limits.max_attributes, self._limits.max_text_chars
        tree_start, tree_end, tree_data = self._tree.start, self._tree.end, self._tree.data
        element_name: Callable[[str], str] = _clark if self._namespace_aware else self._element_name
        attributes_of = self._attributes
        depth = elements = text_run = 0

        def start(name: str, attributes: dict[str, str]) -> None:
            nonlocal depth, elements, text_run
            depth += 1
            elements += 1
            text_run = 0
            if depth > max_depth:
                raise XmlSecurityError(f"XML nested deeper than {max_depth} elements refused")
            if elements > max_elements:
                raise XmlSecurityError(f"XML with more than {max_elements} elements refused")
            if len(attributes) > max_attributes:
                raise XmlSecurityError(f"XML element <{name}> with {len(attributes)} attributes refused (limit {max_attributes})")
            tree_start(element_name(name), attributes_of(attributes))

        def end(name: str) -> None:
            nonlocal depth, text_run
            depth -= 1
            text_run = 0
            tree_end(element_name(name))

        def data(text: str) -> None:
            # expat may deliver one text node in several pieces: count the whole run.
            nonlocal text_run
            text_run += len(text)
            if text_run > max_text_chars:
                raise XmlSecurityError(f"XML text node longer than {max_text_chars} characters refused")
            tree_data(text)

        return start, end, data

    def _refuse_doctype(self, name: str, *_: object) -> None:
        raise XmlSecurityError(f"XML with a DTD (<!DOCTYPE {name}>) refused: DTDs and entities are not allowed")

    def _refuse_entity(self, name: str, *_: object) -> None:
        raise XmlSecurityError(f"XML entity declaration {name!r} refused: entities are not allowed")

    def _refuse_unparsed_entity(self, name: str, *_: object) -> None:
        raise XmlSecurityError(f"XML unparsed entity {name!r} refused: entities are not allowed")

    def _refuse_external_entity(self, context: str | None, base: str | None, system_id: str | None, public_id: str | None) -> int:
        raise XmlSecurityError(f"XML external entity {system_id or public_id!r} refused: nothing is fetched")

    def _element_name(self, name: str) -> str:
        if self._namespace_aware:
            return _clark(name)
        return name.rsplit(":", 1)[-1]

    def _attributes(self, attributes: dict[str, str]) -> dict[str, str]:
        if self._namespace_aware:
            for key in attributes:
                if " " in key:  # a namespaced attribute (``xsi:type``): expat's ``uri local``
                    return {_clark(key): value for key, value in attributes.items()}
            return attributes  # no namespace (``root``, ``code``...): the names are already ElementTree's
        return {key.rsplit(":", 1)[-1]: value for key, value in attributes.items() if key != "xmlns" and not key.startswith("xmlns:")}


_CLARK_NAMES: dict[str, str] = {}  # a CDA names a few dozen distinct elements hundreds of times
_CLARK_NAMES_MAX = 4096  # names come from strangers: forgotten all at once beyond this


def _clark(expat_name: str) -> str:
    """expat's ``uri local`` (separator " ") -> ElementTree's ``{uri}local``."""
    known = _CLARK_NAMES.get(expat_name)
    if known is not None:
        return known
    uri, _, local = expat_name.rpartition(" ")
    clark = f"{{{uri}}}{local}" if uri else local
    if len(_CLARK_NAMES) >= _CLARK_NAMES_MAX:
        _CLARK_NAMES.clear()
    _CLARK_NAMES[expat_name] = clark
    return clark
